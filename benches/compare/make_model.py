"""Random SmolLM2-135M-shaped Mistral checkpoint (f32 safetensors, tied embeddings) for the side-by-side
comparison, with the OpenChat fixture tokenizer so llama.cpp's converter accepts it.

Usage: python make_model.py OUT_DIR [VOCAB] [SHAPE]

SHAPE smollm (default): SmolLM2-135M's shapes, f32. SHAPE openchat4: OpenChat-3.5's (Mistral-7B's)
shapes with 4 layers, bf16, untied (1.13B parameters): every projection's rows and columns are whole
256-value blocks, so llama-quantize's Q4_K_M holds real Q4_K/Q6_K blocks (the smollm rows of 576 fall
back to q5_0/q8_0).

VOCAB 32002 (default) is the tokenizer's own size; a larger one (SmolLM2's real 49152) pads the
tokenizer with dummy added tokens up to it: the converter needs one entry per embedding row, and the
benchmarks never decode text.
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import MistralConfig, MistralForCausalLM

out = Path(sys.argv[1])
vocab = int(sys.argv[2]) if len(sys.argv) > 2 else 32002
shape = sys.argv[3] if len(sys.argv) > 3 else "smollm"
torch.manual_seed(0)
shapes = {
    "smollm": (torch.float32, dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, head_dim=64, max_position_embeddings=2048, rope_theta=100000.0,
                                   tie_word_embeddings=True)),
    "openchat4": (torch.bfloat16, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                                       num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rope_theta=10000.0,
                                       tie_word_embeddings=False)),
}
if shape not in shapes:
    sys.exit(f"make_model.py: unknown SHAPE {shape}: {' or '.join(shapes)}")
dtype, dims = shapes[shape]
cfg = MistralConfig(vocab_size=vocab, rms_norm_eps=1e-5, sliding_window=None, bos_token_id=1, eos_token_id=32000, **dims)
model = MistralForCausalLM(cfg).to(dtype)
model.save_pretrained(out, safe_serialization=True)
tok = Path(__file__).resolve().parents[2] / "tests/fixtures/openchat-tokenizer"
shutil.copy(tok / "tokenizer_config.json", out / "tokenizer_config.json")
spec = json.loads((tok / "tokenizer.json").read_text())
have = len(spec["model"]["vocab"]) + sum(1 for t in spec["added_tokens"] if t["id"] >= len(spec["model"]["vocab"]))
if vocab < have:
    sys.exit(f"make_model.py: VOCAB {vocab} is smaller than the tokenizer's {have} tokens")
for i in range(have, vocab):
    spec["added_tokens"].append({"id": i, "content": f"<dummy_{i}>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
(out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
print(out)
