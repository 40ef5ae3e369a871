#!/usr/bin/env bash
# Side by side on one random SmolLM2-135M-shaped Mistral checkpoint, same thread count:
# expanse (this build) vs llama.cpp's llama-bench vs Hugging Face transformers.
#
#   benches/compare/run.sh [THREADS] [P] [N] [REPS]
#
# Needs: a python env with torch/transformers/gguf (PY, default /work/venv/bin/python) and llama.cpp.
# LLAMA_DIR: a llama.cpp source tree (default: the one vendored in llama-cpp-python's sdist, fetched
# from PyPI with pip and built here with cmake at low priority; a heavy compile on 2 cores).
set -euo pipefail
THREADS=${1:-2}; P=${2:-128}; N=${3:-32}; REPS=${4:-5}
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../.." && pwd)
PY=${PY:-/work/venv/bin/python}
WORK=${WORK:-/tmp/expanse-compare}; mkdir -p "$WORK"
LLAMA_DIR=${LLAMA_DIR:-}
if [ -z "$LLAMA_DIR" ]; then
  cd "$WORK"
  if ! ls llama_cpp_python-*/vendor/llama.cpp >/dev/null 2>&1; then
    "$PY" -m pip install -q scikit-build-core cmake ninja
    "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation llama-cpp-python
    tar xzf llama_cpp_python-*.tar.gz
  fi
  LLAMA_DIR=$(ls -d "$WORK"/llama_cpp_python-*/vendor/llama.cpp | head -1)
fi
BENCH="$LLAMA_DIR/build/bin/llama-bench"
if [ ! -x "$BENCH" ]; then
  export PATH="$(dirname "$PY"):$PATH"
  nice -n 19 cmake -S "$LLAMA_DIR" -B "$LLAMA_DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  nice -n 19 cmake --build "$LLAMA_DIR/build" --target llama-bench -j 2 >/dev/null
fi
MODEL="$WORK/smollm2-135m-mistral"
[ -f "$MODEL/model.safetensors" ] || "$PY" "$HERE/make_model.py" "$MODEL" >/dev/null
for t in f32 f16 bf16; do
  [ -f "$MODEL-$t.gguf" ] || PYTHONPATH="$LLAMA_DIR/gguf-py" "$PY" "$LLAMA_DIR/convert_hf_to_gguf.py" "$MODEL" --outtype $t --outfile "$MODEL-$t.gguf" >/dev/null 2>&1
done
EXPANSE=${EXPANSE:-$ROOT/target/release/expanse}
echo -e "engine\tdtype\ttest\tmedian_tps\tmean_tps\tsd"
for t in f32 f16 bf16; do
  "$BENCH" -m "$MODEL-$t.gguf" -t "$THREADS" -p "$P" -n "$N" -r "$REPS" -o jsonl 2>/dev/null | "$PY" -c '
import json, sys, statistics
for line in sys.stdin:
    r = json.loads(line); s = r["samples_ts"]
    test = "pp%d" % r["n_prompt"] if r["n_prompt"] else "tg%d" % r["n_gen"]
    print("llama.cpp\t%s\t%s\t%.2f\t%.2f\t%.2f" % (sys.argv[1], test, statistics.median(s), r["avg_ts"], r["stddev_ts"]))
' "$t"
done
# EXPANSE_BEFORE=path/to/older/expanse adds its rows (labelled "expanse-before") to the same run.
for pair in "expanse=$EXPANSE" ${EXPANSE_BEFORE:+"expanse-before=$EXPANSE_BEFORE"}; do
 label=${pair%%=*}; bin=${pair#*=}
 for dt in f32 bf16; do
  RAYON_NUM_THREADS=$THREADS "$bin" bench --model "$MODEL" --expand none --variants base --device cpu --dtype $dt \
    -p "$P" -n "$N" -r "$REPS" --json 2>/dev/null | "$PY" -c '
import json, sys
r = json.load(sys.stdin)
for row in r["rows"]:
    print("%s\t%s\t%s\t%.2f\t%.2f\t%.2f" % (sys.argv[2], sys.argv[1], row["test"], row["median_tps"], row["mean_tps"], row["sd_tps"]))
' "$dt" "$label"
 done
done
for dt in float32 bfloat16; do
  "$PY" "$HERE/hf_bench.py" "$MODEL" $dt "$THREADS" "$P" "$N" "$REPS"
done
