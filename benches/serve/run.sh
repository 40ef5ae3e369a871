#!/usr/bin/env bash
# `expanse serve` beside llama.cpp's `llama-server` on one random SmolLM2-135M-shaped checkpoint, same
# thread count: throughput, time to first token and per-token latency for 1, 4 and 16 concurrent
# clients; then what the server costs over the engine: one client's decode rate against `expanse
# bench`'s tg, TTFT against `expanse generate`'s, and RSS after 100 and after 1,000 requests.
#
#   benches/serve/run.sh [THREADS] [DTYPE] [MAX_TOKENS]      (defaults: 2 f32 32)
#
# From a fresh clone: benches/compare/prepare.sh builds llama-server from the llama.cpp tree vendored in
# llama-cpp-python's PyPI sdist and makes the checkpoint and its GGUFs, once, in its cache folder
# (~/.cache/expanse-compare). EXPANSE=path overrides the binary (default: this tree's release build).
# Output: one JSON line per measurement, then a Markdown summary; everything also lands in $OUT.
set -euo pipefail
THREADS=${1:-2}; DTYPE=${2:-f32}; N=${3:-32}
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-${TMPDIR:-/tmp}/expanse-serve-bench}; mkdir -p "$OUT"
PORT_E=${PORT_E:-18080}; PORT_L=${PORT_L:-18081}
CTX=2048; TOTAL=16   # requests per concurrency level, shared among the clients

# The shared preparation (llama.cpp build, checkpoint, GGUFs); SKIP_LLAMA=1 with MODEL=DIR measures
# expanse alone without it.
if [ -z "${SKIP_LLAMA:-}" ] || [ -z "${MODEL:-}" ]; then
  eval "$(bash "${PREPARE:-$ROOT/benches/compare/prepare.sh}")"   # LLAMA_SERVER, MODEL_V32K, GGUF_V32K_<DTYPE>
fi
MODEL=${MODEL:-$MODEL_V32K}
EXPANSE=${EXPANSE:-}
if [ -z "$EXPANSE" ]; then (cd "$ROOT" && nice -n 10 cargo build --release -q); EXPANSE=$ROOT/target/release/expanse; fi
RESULTS="$OUT/results.jsonl"; : >"$RESULTS"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_health() {
  python3 - "$1" <<'EOF'
import sys, time, urllib.request
for _ in range(1500):
    try:
        if urllib.request.urlopen(sys.argv[1] + "/health", timeout=2).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit("no healthy server at " + sys.argv[1])
EOF
}
record() { tee -a "$RESULTS"; }
load() { python3 "$HERE/load.py" "$@" | record; }
stop() { kill -TERM "$1"; wait "$1" 2>/dev/null || true; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# The engine alone: generate's time to first token on load.py's first prompt, and bench's decode rate
# after a prompt of that length (-d), as the server decodes.
PROMPT="Request 0 of client 0. $(python3 -c 'print(" ".join("word%d" % (i % 50) for i in range(32)))')"
for i in 1 2 3 4 5; do
  RAYON_NUM_THREADS=$THREADS "$EXPANSE" generate --model "$MODEL" --expand none --device cpu --dtype "$DTYPE" --raw \
    --prompt "$PROMPT" --max-tokens 1 --temperature 0 --json 2>/dev/null | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))'
done | python3 -c '
import json, sys, statistics
runs = [json.loads(l) for l in sys.stdin]
t = [r["time_to_first_token_secs"] * 1e3 for r in runs]
print(json.dumps({"label": "expanse generate", "ttft_ms_median": statistics.median(t), "prompt_tokens": runs[0]["prompt_tokens"], "runs": len(t)}))' | record
DEPTH=$(tail -1 "$RESULTS" | python3 -c 'import json, sys; print(json.load(sys.stdin)["prompt_tokens"])')
RAYON_NUM_THREADS=$THREADS "$EXPANSE" bench --model "$MODEL" --expand none --variants base --device cpu --dtype "$DTYPE" \
  -p 0 -n "$N" -d "$DEPTH" -r 5 --json 2>/dev/null | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(json.dumps({"label": "expanse bench", "tg_tps_median": r["rows"][0]["median_tps"], "test": r["rows"][0]["test"]}))' | record
# The same prompt length on a warm engine (generate starts a fresh process per run: its first prompt
# also pays for first-touch page faults and the thread pool's start).
RAYON_NUM_THREADS=$THREADS "$EXPANSE" bench --model "$MODEL" --expand none --variants base --device cpu --dtype "$DTYPE" \
  -p "$DEPTH" -n 0 -r 5 --json 2>/dev/null | python3 -c '
import json, sys
r = json.load(sys.stdin)["rows"][0]
print(json.dumps({"label": "expanse bench prefill", "prefill_ms_median": 1e3 * int(r["test"][2:]) / r["median_tps"], "test": r["test"]}))' | record

# expanse serve.
RAYON_NUM_THREADS=$THREADS "$EXPANSE" serve --model "$MODEL" --expand none --device cpu --dtype "$DTYPE" \
  --port "$PORT_E" --ctx "$CTX" --temperature 0 2>"$OUT/expanse-serve.log" &
E=$!; PIDS+=("$E")
wait_health "http://127.0.0.1:$PORT_E"
URL_E="http://127.0.0.1:$PORT_E"
load "$URL_E" --clients 1 --requests 2 --max-tokens 8 --label "warm-up" >/dev/null
load "$URL_E" --clients 1 --requests 5 --max-tokens "$N" --unique --label "expanse serve: one client, distinct prompts"
for C in 1 4 16; do
  load "$URL_E" --clients "$C" --requests $((TOTAL / C)) --max-tokens "$N" --unique --label "expanse serve"
done
load "$URL_E" --head-of-line 121 --max-tokens 8 --label "expanse serve: head of line"
load "$URL_E" --clients 4 --requests 25 --max-tokens 4 --prompt-words 4 --unique --label "expanse serve: requests 1-100"
R100=$(rss_kb "$E")
load "$URL_E" --clients 4 --requests 225 --max-tokens 4 --prompt-words 4 --unique --label "expanse serve: requests 101-1000"
R1000=$(rss_kb "$E")
echo "{\"label\": \"expanse serve RSS\", \"rss_kb_after_100\": $R100, \"rss_kb_after_1000\": $R1000}" | record
stop "$E"

gguf_var=GGUF_V32K_${DTYPE^^}; GGUF=${!gguf_var:-}
[ -n "${SKIP_LLAMA:-}" ] && NPS="" || NPS="1 16"
# llama-server: one slot (requests wait their turn, as in expanse), then 16 slots (continuous batching).
# It is told to ignore EOS so that every answer has MAX_TOKENS tokens; expanse's greedy answers on this
# random checkpoint run to max_tokens too (the token counts in the JSON lines show it).
for NP in $NPS; do
  "$LLAMA_SERVER" -m "$GGUF" -t "$THREADS" -tb "$THREADS" -c $((CTX * NP)) -np "$NP" --host 127.0.0.1 --port "$PORT_L" \
    >"$OUT/llama-server-np$NP.log" 2>&1 &
  L=$!; PIDS+=("$L")
  wait_health "http://127.0.0.1:$PORT_L"
  URL_L="http://127.0.0.1:$PORT_L"
  load "$URL_L" --clients 1 --requests 2 --max-tokens 8 --extra '{"ignore_eos": true}' --label "warm-up" >/dev/null
  for C in 1 4 16; do
    load "$URL_L" --clients "$C" --requests $((TOTAL / C)) --max-tokens "$N" --unique --extra '{"ignore_eos": true}' --label "llama-server -np $NP"
  done
  load "$URL_L" --head-of-line 121 --max-tokens 8 --extra '{"ignore_eos": true}' --label "llama-server -np $NP: head of line"
  stop "$L"
done

python3 - "$RESULTS" "$THREADS" "$DTYPE" "$N" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("\n%s threads, %s, %s tokens per answer, %s requests per level\n" % (sys.argv[2], sys.argv[3], sys.argv[4], 16))
print("| server | clients | tok/s (all clients) | TTFT p50 / p99 ms | per-token p50 / p99 ms | errors |")
print("|---|---|---|---|---|---|")
for r in rows:
    if "clients" in r and r["label"] in ("expanse serve", "llama-server -np 1", "llama-server -np 16"):
        print("| %s | %d | %.1f | %.1f / %.1f | %.1f / %.1f | %d |" % (r["label"], r["clients"], r["throughput_tps"],
              r["ttft_ms_p50"], r["ttft_ms_p99"], r["token_ms_p50"], r["token_ms_p99"], r["errors"]))
def get(label):
    return next(r for r in rows if r["label"] == label)
tg = get("expanse bench")["tg_tps_median"]
one = get("expanse serve: one client, distinct prompts")
gen = get("expanse generate")["ttft_ms_median"]
rss = get("expanse serve RSS")
print("\none client through HTTP: %.2f tok/s = %.3f x bench tg (%.2f tok/s)" % (one["decode_tps_per_request_median"], one["decode_tps_per_request_median"] / tg, tg))
print("TTFT through HTTP p50 %.1f ms vs generate %.1f ms: +%.1f ms" % (one["ttft_ms_p50"], gen, one["ttft_ms_p50"] - gen))
warm = get("expanse bench prefill")["prefill_ms_median"]
print("TTFT through HTTP p50 %.1f ms vs a warm engine's prefill of the same length (bench %s) %.1f ms: +%.1f ms" % (one["ttft_ms_p50"], get("expanse bench prefill")["test"], warm, one["ttft_ms_p50"] - warm))
for r in rows:
    if "head_of_line" in r:
        print("%s: %d tokens alone %.2f s, sent 1 s behind a %d-token answer %.2f s (%.2fx)" % (r["label"], r["short_tokens"], r["short_alone_s"], r["head_of_line"], r["short_behind_long_s"], r["ratio"]))
print("RSS after 100 requests %d kB, after 1000 %d kB: %+.2f%%" % (rss["rss_kb_after_100"], rss["rss_kb_after_1000"], 100 * (rss["rss_kb_after_1000"] / rss["rss_kb_after_100"] - 1)))
EOF
