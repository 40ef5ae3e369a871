#!/usr/bin/env bash
# expanse vs llama.cpp (llama-bench) vs Hugging Face transformers on the CPU, same checkpoint, same
# thread count, from a fresh clone: prepare.sh builds/creates what is missing in the cache folder
# (venv, llama.cpp, checkpoints, GGUFs), then every test runs ROUNDS times, alternating the engines,
# and one table is printed: tokens/s (median over rounds) and expanse ÷ llama.cpp (median of the
# per-round ratios), expanse ÷ transformers (one transformers run per test, its median).
#
#   benches/compare/run.sh [THREADS] [ROUNDS] [REPS]        (defaults 2 3 3)
#
# Env: EXPANSE (binary; default target/release/expanse, built if missing), EXPANSE_BEFORE (a second
# expanse binary alternated in the same rounds, labelled expanse-before), EXPANSE_TIERS (CPU kernel
# tiers, e.g. "avx2 avx512bf16": expanse run again under EXPANSE_CPU=<tier> in the same rounds,
# labelled expanse@<tier>; plain "expanse" is the tier it picks itself), SHAPES (default
# "v32k v49k"; oc4: OpenChat's shapes, 4 layers; smollm2: the real SmolLM2-135M-Instruct, GGUFs only),
# DTYPES ("f32 bf16"; q8_0, q4_k_m and q5_k_m run oc4's llama-quantize GGUFs in both engines, e.g.
# SHAPES=oc4 DTYPES="q8_0 q4_k_m"; smollm2 has f32 q4_1 q8_0 q4_k_m q5_k_m q6_k, e.g. SHAPES=smollm2
# DTYPES="q8_0 q4_k_m" NO_TRANSFORMERS=1), TESTS ("pp128 pp512 tg128 tg128@512"), NO_TRANSFORMERS=1,
# RAW (file that keeps the raw per-run rows; default $CACHE/last-run.tsv). REPS: repetitions inside
# each engine run (after one warm-up), whose median is that run's figure.
set -euo pipefail
THREADS=${1:-2}; ROUNDS=${2:-3}; REPS=${3:-3}
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../.." && pwd)
eval "$("$HERE/prepare.sh")"
EXPANSE=${EXPANSE:-$ROOT/target/release/expanse}
[ -x "$EXPANSE" ] || (cd "$ROOT" && cargo build --release >&2)
RAW=${RAW:-$CACHE/last-run.tsv}
: >"$RAW"
echo "run.sh: $(date -u '+%F %H:%M UTC'), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), threads $THREADS" >&2

# test → (prompt, gen, depth): pp128 → 128 0 0; tg128@512 → 0 128 512.
split_test() {
  local t=${1%@*} d=0
  [[ $1 == *@* ]] && d=${1#*@}
  case $t in pp*) echo "${t#pp} 0 $d" ;; tg*) echo "0 ${t#tg} $d" ;; *) echo "run.sh: unknown test $1" >&2; exit 2 ;; esac
}

# engine shape dtype test round → appends "engine shape dtype test round tok/s" to RAW.
run_one() {
  local engine=$1 shape=$2 dtype=$3 test=$4 round=$5 p n d tps model gguf
  read -r p n d <<<"$(split_test "$test")"
  model=MODEL_${shape^^}; gguf=GGUF_${shape^^}_${dtype^^}
  case $engine in
    llama.cpp)
      tps=$("$LLAMA_BENCH" -m "${!gguf}" -t "$THREADS" -p "$p" -n "$n" -d "$d" -r "$REPS" -o jsonl 2>/dev/null |
        "$PY" -c 'import json,sys,statistics; print(statistics.median(json.loads(sys.stdin.readline())["samples_ts"]))') ;;
    expanse*)
      local bin=$EXPANSE tier=
      [ "$engine" = expanse-before ] && bin=$EXPANSE_BEFORE
      [[ $engine == expanse@* ]] && tier=${engine#expanse@}
      # A quantized type runs the very GGUF llama.cpp runs (activations in f32, as llama.cpp's).
      local src=(--model "${!model:-}" --dtype "$dtype")
      [[ $dtype == q* || -z ${!model:-} ]] && src=(--model "${!gguf}" --dtype f32)
      tps=$(EXPANSE_CPU=$tier "$bin" bench "${src[@]}" --expand none --variants base --device cpu -t "$THREADS" \
        -p "$p" -n "$n" -d "$d" -r "$REPS" --json 2>/dev/null | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["rows"][0]["median_tps"])') ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$engine" "$shape" "$dtype" "$test" "$round" "$tps" >>"$RAW"
  echo "  $engine $shape $dtype $test round $round: $tps tok/s" >&2
}

ENGINES="expanse ${EXPANSE_BEFORE:+expanse-before }$(for t in ${EXPANSE_TIERS:-}; do printf 'expanse@%s ' "$t"; done)llama.cpp"
for shape in ${SHAPES:-v32k v49k}; do
  for dtype in ${DTYPES:-f32 bf16}; do
    for test in ${TESTS:-pp128 pp512 tg128 tg128@512}; do
      for round in $(seq 1 "$ROUNDS"); do
        for engine in $ENGINES; do run_one "$engine" "$shape" "$dtype" "$test" "$round"; done
      done
    done
    model=MODEL_${shape^^}
    if [ -z "${NO_TRANSFORMERS:-}" ] && [[ $dtype != q* ]] && [ -n "${!model:-}" ]; then
      "$PY" "$HERE/hf_bench.py" "${!model}" "$dtype" "$THREADS" "$REPS" ${TESTS:-pp128 pp512 tg128 tg128@512} |
        while read -r test tps; do printf 'transformers\t%s\t%s\t%s\t1\t%s\n' "$shape" "$dtype" "$test" "$tps" >>"$RAW"; echo "  transformers $shape $dtype $test: $tps tok/s" >&2; done
    fi
  done
done
echo "run.sh: done $(date -u '+%H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg); raw rows in $RAW" >&2
"$PY" "$HERE/table.py" "$RAW" "$THREADS"
