#!/usr/bin/env bash
# Peak RSS of `expanse expand --out` on the tiny fixture and on a ~1 GB random bf16 Mistral checkpoint
# (32 layers, hidden 1024, intermediate 3584, vocab 32000) built in a temporary folder.
# Runs from a fresh clone: builds expanse (release) when no binary is given, and makes the pinned
# reference Python (torch + safetensors) with scripts/python-reference-venv.sh when no python is given.
# Usage: benches/export_peak_memory.sh [path/to/expanse] [python]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -n "${1:-}" ]]; then BIN=$1; else cargo build --release --quiet; BIN=target/release/expanse; fi
PY=${2:-$(bash scripts/python-reference-venv.sh)}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

"$PY" - "$TMP/mid" <<'PY'
import json, os, sys, torch
from safetensors.torch import save_file
out = sys.argv[1]; os.makedirs(out)
V, H, I, L, NH, KV = 32000, 1024, 3584, 32, 16, 4
D = H // NH
cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": V, "hidden_size": H,
       "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": KV,
       "head_dim": D, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
       "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
       "eos_token_id": 2, "hidden_act": "silu"}
json.dump(cfg, open(f"{out}/config.json", "w"), indent=2, sort_keys=True)
g = torch.Generator().manual_seed(0)
r = lambda *s: (0.02 * torch.randn(*s, generator=g)).to(torch.bfloat16)
t = {"model.embed_tokens.weight": r(V, H), "lm_head.weight": r(V, H), "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}
for i in range(L):
    p = f"model.layers.{i}."
    t |= {p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
          p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
          p + "self_attn.q_proj.weight": r(NH * D, H), p + "self_attn.k_proj.weight": r(KV * D, H),
          p + "self_attn.v_proj.weight": r(KV * D, H), p + "self_attn.o_proj.weight": r(H, NH * D),
          p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H), p + "mlp.down_proj.weight": r(H, I)}
save_file(t, f"{out}/model.safetensors", metadata={"format": "pt"})
PY
ls -l "$TMP/mid/model.safetensors"

run() { # label model shard-size
  "$BIN" expand --model "$2" --expand every:4 --out "$TMP/out" --force --shard-size "$3" --json > "$TMP/r.json"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"| {sys.argv[2]} | {sys.argv[3]} | {r['tensor_bytes']/1e6:.1f} MB | {len(r['shards'])} | {r['peak_rss_bytes']/1e6:.1f} MB | {r['seconds']:.2f} s |\")" "$TMP/r.json" "$1" "$3"
}
echo "| model | --shard-size | written | shards | peak RSS | time |"
echo "|---|---|---:|---:|---:|---:|"
run "tiny-mistral-bf16 (8→10 layers)" tests/fixtures/tiny-mistral-bf16 5B
run "random 1 GB bf16 (32→40 layers)" "$TMP/mid" 5B
run "random 1 GB bf16 (32→40 layers)" "$TMP/mid" 200MB
