"""Random SmolLM2-135M-shaped Mistral checkpoint (f32 safetensors) for the side-by-side comparison.

Vocab is 32002 (not SmolLM2's 49152) so the fixture's OpenChat tokenizer can go with it: llama.cpp's
converter needs a real tokenizer. Usage: python make_model.py OUT_DIR
"""
import shutil
import sys
from pathlib import Path

import torch
from transformers import MistralConfig, MistralForCausalLM

out = Path(sys.argv[1])
torch.manual_seed(0)
cfg = MistralConfig(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, vocab_size=32002, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=100000.0, sliding_window=None, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=32000,
)
model = MistralForCausalLM(cfg).to(torch.float32)
model.save_pretrained(out, safe_serialization=True)
tok = Path(__file__).resolve().parents[2] / "tests/fixtures/openchat-tokenizer"
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(tok / f, out / f)
print(out)
