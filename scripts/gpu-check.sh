#!/usr/bin/env bash
# Run expanse's CUDA checks on a GPU machine that has only the NVIDIA driver
# and the CUDA 13 runtime libraries (e.g. pip's nvidia-cublas / -cuda-runtime /
# -cuda-nvrtc). Made by scripts/gpu-bundle.sh, which copies this script into
# the bundle folder next to bin.tar.xz, fixtures.tar.xz and libcurand.so.10.xz.
#
#   usage: bash bundle/gpu-check.sh [LOG_DIR]
#          LOG_DIR default: $EXPANSE_GPU_LOG, else $OUT/gpu-check (device runs), else ./gpu-check-logs
#   env:   EXPANSE_GPU_BUDGET_S    whole-script budget in seconds (default 470, i.e. < 8 min)
#          EXPANSE_GPU_WORK        unpack folder (default /tmp/expanse-gpu)
#          EXPANSE_LOGITS_TOL      max |logit diff| cuda vs cpu accepted (default 0.5)
#          EXPANSE_VERIFY_MODELS   fixture dirs for `expanse verify --model`
#          EXPANSE_TEST_FILTER     substring filter passed to the test binaries (default: all)
#          EXPANSE_SKIP            space-separated step names to skip
#
# Steps (each with a timeout, output in LOG_DIR/<step>.{out,err}):
#   unpack, ldd, nvidia-smi, test:<binary> (all cuda test binaries), bandwidth
#   (an ignored test in the lib binary, if present), verify:<model>,
#   verify-synthetic, logits-cuda, logits-cpu, compare-logits, device-auto-fallback, device-ordinal, bench.
# A short summary table is printed last and written to LOG_DIR/summary.txt.
# Exit status: 0 if every step that ran passed, 1 otherwise.
set -uo pipefail

START=$SECONDS
BUDGET="${EXPANSE_GPU_BUDGET_S:-470}"
BUNDLE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
if [[ -n "${1:-}" ]]; then LOG_DIR="$1"
elif [[ -n "${EXPANSE_GPU_LOG:-}" ]]; then LOG_DIR="$EXPANSE_GPU_LOG"
elif [[ -n "${OUT:-}" ]]; then LOG_DIR="$OUT/gpu-check"
else LOG_DIR="$PWD/gpu-check-logs"; fi
mkdir -p "$LOG_DIR"
LOG_DIR="$(cd "$LOG_DIR" && pwd -P)"
WORK="${EXPANSE_GPU_WORK:-/tmp/expanse-gpu}"
export BUNDLE WORK  # used by the step functions, which run in child shells
LOGITS_TOL="${EXPANSE_LOGITS_TOL:-0.5}"
VERIFY_MODELS="${EXPANSE_VERIFY_MODELS:-tiny-mistral-bf16 tiny-mergekit-every4-bf16 tiny-finetuned-bf16}"
LOGITS_MODEL=tiny-mistral-bf16
IDS="1,415,2936,9060,285,1142,28705,28740,28750,28770,13,1014,2696,6153,754,272,17898,3914,28723,2,32000,32001,100,200"

log() { echo "[gpu-check $(( SECONDS - START ))s] $*" | tee -a "$LOG_DIR/gpu-check.log" >&2; }
remaining() { echo $(( BUDGET - (SECONDS - START) )); }

declare -a ROWS=()
FAILED=0
row() { ROWS+=("$(printf '%-34s %-5s %4s %6s  %s' "$1" "$2" "$3" "$4" "$5")"); }
skipped() { case " ${EXPANSE_SKIP:-} " in *" $1 "*) return 0 ;; esac; return 1; }

# run_step NAME TIMEOUT NOTE -- CMD...   (stdout -> NAME.out, stderr -> NAME.err)
run_step() {
  local name="$1" limit="$2" note="$3"; shift 4
  local file="${name//[^A-Za-z0-9._-]/_}"
  if skipped "$name"; then row "$name" skip - - "EXPANSE_SKIP"; return 0; fi
  local left; left=$(remaining)
  if (( left < 10 )); then row "$name" skip - - "out of time budget"; log "$name: skipped (budget)"; return 0; fi
  (( limit > left - 5 )) && limit=$(( left - 5 ))
  log "==> $name (timeout ${limit}s): $*"
  local t0=$SECONDS rc=0
  if declare -F "$1" >/dev/null; then
    # a shell function: run it in a child bash so that timeout can kill it
    timeout --kill-after=5 "$limit" bash -c "$(declare -f "$1"); \"\$@\"" _ "$@" \
      > "$LOG_DIR/$file.out" 2> "$LOG_DIR/$file.err" || rc=$?
  else
    timeout --kill-after=5 "$limit" "$@" > "$LOG_DIR/$file.out" 2> "$LOG_DIR/$file.err" || rc=$?
  fi
  local dt=$(( SECONDS - t0 )) status=ok
  if (( rc == 124 || rc == 137 )); then status=TIME; FAILED=1
  elif (( rc != 0 )); then status=FAIL; FAILED=1; fi
  [[ -n "$note" ]] || note="$(tail -n 1 "$LOG_DIR/$file.out" 2>/dev/null | cut -c1-60)"
  row "$name" "$status" "$rc" "${dt}s" "$note"
  log "    $name: $status (rc $rc, ${dt}s)"
  if [[ "$status" != ok ]]; then tail -n 15 "$LOG_DIR/$file.err" | sed 's/^/    | /' >&2; fi
  return $rc
}

print_summary() {
  {
    echo
    echo "==== expanse gpu-check summary ($(( SECONDS - START ))s, logs in $LOG_DIR) ===="
    printf '%-34s %-5s %4s %6s  %s\n' step stat rc time note
    printf '%s\n' "${ROWS[@]}"
    if (( FAILED )); then echo "RESULT: FAIL"; else echo "RESULT: PASS"; fi
  } | tee "$LOG_DIR/summary.txt"
}
trap print_summary EXIT

# ---- unpack -------------------------------------------------------------------------
unpack() {
  set -e
  rm -rf "$WORK"; mkdir -p "$WORK/lib"
  [[ -f "$BUNDLE/bin.tar.xz" ]] || { echo "missing $BUNDLE/bin.tar.xz (run scripts/gpu-bundle.sh)" >&2; return 1; }
  xz -dc "$BUNDLE/bin.tar.xz" | tar -x -C "$WORK"
  if [[ -f "$BUNDLE/fixtures.tar.xz" ]]; then
    xz -dc "$BUNDLE/fixtures.tar.xz" | tar -x -C "$WORK"
  elif [[ -d "$BUNDLE/../tests/fixtures" ]]; then
    # bundle made with GPU_BUNDLE_NO_FIXTURES=1 inside a repo checkout: use its fixtures
    mkdir -p "$WORK/tests" && cp -rL "$BUNDLE/../tests/fixtures" "$WORK/tests/"
  else
    echo "no fixtures.tar.xz in $BUNDLE and no ../tests/fixtures beside it" >&2; return 1
  fi
  if [[ -f "$BUNDLE/libcurand.so.10.xz" ]]; then
    xz -dc "$BUNDLE/libcurand.so.10.xz" > "$WORK/lib/libcurand.so.10"
  fi
  chmod +x "$WORK"/bin/* "$WORK"/testbin/*
  ls -la "$WORK/bin" "$WORK/testbin" "$WORK/lib" >&2
  echo "unpacked into $WORK"
}
run_step unpack 120 "" -- unpack || { log "cannot unpack the bundle; stopping"; exit 1; }

# ---- library path ---------------------------------------------------------------------
# Our libcurand first, then pip-installed nvidia wheels (CUDA 13: nvidia/cu13/lib,
# older layouts: nvidia/<pkg>/lib), then a system CUDA. The driver's libcuda.so.1
# comes from the system loader path. Never the build machine's libcuda stub.
LIBDIRS=("$WORK/lib")
SITES="$(python3 - 2>/dev/null <<'EOF'
import site, sys
paths = set(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
paths.add(site.getusersitepackages())
paths.update(p for p in sys.path if p.endswith("-packages"))
print("\n".join(sorted(p for p in paths if p)))
EOF
)"
while IFS= read -r sp; do
  [[ -d "$sp/nvidia" ]] || continue
  while IFS= read -r d; do LIBDIRS+=("$d"); done < <(find "$sp/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | sort)
done <<< "$SITES"
for d in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [[ -d "$d" ]] && LIBDIRS+=("$d")
done
LD_LIBRARY_PATH="$(IFS=:; echo "${LIBDIRS[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

check_ldd() {
  local missing
  ldd "$WORK/bin/expanse" >&2
  missing="$(ldd "$WORK/bin/expanse" | awk '/not found/ { print $1 }' | tr '\n' ' ')"
  if [[ -n "$missing" ]]; then echo "not found: $missing"; return 1; fi
  echo "all libraries resolved"
}
run_step ldd 20 "" -- check_ldd || log "some CUDA libraries are missing: the steps below will fail to start (rc 127)"

run_step nvidia-smi 30 "" -- nvidia-smi || true
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader > "$LOG_DIR/gpu.txt" 2>/dev/null || true
[[ -s "$LOG_DIR/gpu.txt" ]] && log "GPU: $(head -n1 "$LOG_DIR/gpu.txt")"

# Tests that embed the build machine's CARGO_MANIFEST_DIR look for fixtures
# there: point that path at the unpacked tree when it does not exist here.
MANIFEST_DIR="$(cat "$WORK/manifest-dir.txt" 2>/dev/null || true)"
if [[ -n "$MANIFEST_DIR" && ! -e "$MANIFEST_DIR" ]]; then
  if mkdir -p "$(dirname "$MANIFEST_DIR")" 2>/dev/null && ln -s "$WORK" "$MANIFEST_DIR" 2>/dev/null; then
    log "linked $MANIFEST_DIR -> $WORK (compile-time fixture paths)"
  fi
fi
export CARGO_MANIFEST_DIR="$WORK"
cd "$WORK"
EXPANSE="$WORK/bin/expanse"
FIX="$WORK/tests/fixtures"

# ---- test binaries --------------------------------------------------------------------
test_note() { grep -E '^test result:' "$LOG_DIR/$1.out" 2>/dev/null | tail -n1 | sed -E 's/^test result: //; s/; finished in.*//' | cut -c1-60; }
for t in "$WORK"/testbin/*; do
  name="test:$(basename "$t")"
  file="${name//[^A-Za-z0-9._-]/_}"
  args=()
  [[ -n "${EXPANSE_TEST_FILTER:-}" ]] && args+=("$EXPANSE_TEST_FILTER")
  run_step "$name" 200 "" -- "$t" "${args[@]}" || true
  note="$(test_note "$file")"
  [[ -n "$note" ]] && ROWS[-1]="$(printf '%s' "${ROWS[-1]}" | cut -c1-52)  $note"
done

# Bandwidth probe + kernel timings: an #[ignore]d test in the lib test binary
# (src/kernels/tests.rs, gpu::bench_probe). Skipped if that binary lacks it.
LIBTEST="$(ls "$WORK"/testbin/lib-* 2>/dev/null | head -n1 || true)"
if [[ -n "$LIBTEST" ]] && "$LIBTEST" --list --ignored 2>/dev/null | grep -q 'bench_probe'; then
  run_step bandwidth 90 "" -- "$LIBTEST" --ignored --exact kernels::tests::gpu::bench_probe --nocapture || true
  note="$(grep -hE '^PROBE ' "$LOG_DIR/bandwidth.out" "$LOG_DIR/bandwidth.err" 2>/dev/null | grep -m1 copy_bf16 | cut -c1-60)"
  [[ -n "$note" ]] && ROWS[-1]="$(printf '%s' "${ROWS[-1]}" | cut -c1-52)  $note"
else
  row bandwidth skip - - "no bench_probe test in the lib test binary"
fi

# ---- CLI ------------------------------------------------------------------------------
json_note() {  # first line of compact JSON fields worth showing
  python3 - "$1" <<'EOF' 2>/dev/null || true
import json, sys
try:
    txt = open(sys.argv[1]).read()
    start = txt.find("{")
    d = json.loads(txt[start:]) if start >= 0 else {}
except Exception:
    sys.exit(0)
keys = ["ok", "pass", "passed", "identical", "bit_exact", "max_abs_diff", "argmax_agreement", "steps", "tokens_per_s"]
out = []
def walk(x, prefix=""):
    if isinstance(x, dict):
        for k, v in x.items():
            if k in keys and not isinstance(v, (dict, list)):
                out.append("%s=%s" % (k, v))
            walk(v)
    elif isinstance(x, list):
        for v in x[:3]:
            walk(v)
walk(d)
print(" ".join(out)[:60])
EOF
}

for m in $VERIFY_MODELS; do
  if [[ ! -d "$FIX/$m" ]]; then row "verify:$m" skip - - "fixture missing"; continue; fi
  run_step "verify:$m" 60 "" -- "$EXPANSE" verify --model "$FIX/$m" --device cuda --dtype bf16 --steps 8 --json || true
  note="$(json_note "$LOG_DIR/verify_$m.out")"; [[ -n "$note" ]] && ROWS[-1]="$(printf '%s' "${ROWS[-1]}" | cut -c1-52)  $note"
done

run_step verify-synthetic 120 "" -- "$EXPANSE" verify --synthetic openchat-3.5-0106 --device cuda --steps 4 --json || true
note="$(json_note "$LOG_DIR/verify-synthetic.out")"; [[ -n "$note" ]] && ROWS[-1]="$(printf '%s' "${ROWS[-1]}" | cut -c1-52)  $note"

if [[ -d "$FIX/$LOGITS_MODEL" ]]; then
  A="$LOG_DIR/logits-cuda.safetensors"; B="$LOG_DIR/logits-cpu.safetensors"
  cuda_ok=0; cpu_ok=0
  run_step logits-cuda 60 "$LOGITS_MODEL" -- "$EXPANSE" logits --model "$FIX/$LOGITS_MODEL" --device cuda --ids "$IDS" --out "$A" && cuda_ok=1
  run_step logits-cpu 60 "$LOGITS_MODEL" -- "$EXPANSE" logits --model "$FIX/$LOGITS_MODEL" --device cpu --ids "$IDS" --out "$B" && cpu_ok=1
  if (( cuda_ok && cpu_ok )); then
    run_step compare-logits 30 "" -- "$EXPANSE" compare-logits "$A" "$B" --tolerance "$LOGITS_TOL" --json || true
    note="$(json_note "$LOG_DIR/compare-logits.out")"; [[ -n "$note" ]] && ROWS[-1]="$(printf '%s' "${ROWS[-1]}" | cut -c1-52)  $note"
  else
    row compare-logits skip - - "a logits step failed"
  fi
else
  row logits skip - - "fixture $LOGITS_MODEL missing"
fi

# --device auto with CUDA hidden (CUDA_VISIBLE_DEVICES=): runs on the CPU and says why in one line.
auto_fallback() {  # EXPANSE MODEL_DIR OUT_DIR
  local err line
  err="$(CUDA_VISIBLE_DEVICES= "$1" logits --model "$2" --device auto --ids 1,415,2936 --out "$3/logits-auto.safetensors" 2>&1 >/dev/null)" \
    || { echo "$err"; return 1; }
  echo "$err" >&2
  line="$(grep -F -- '--device auto:' <<<"$err" || true)"
  [[ -n "$line" && "$(wc -l <<<"$line")" -eq 1 && "$line" == *"running on the CPU"* ]] || { echo "no one-line fallback notice in: $err"; return 1; }
  echo "$line"
}
# The report names the ordinal chosen; an ordinal past the last GPU is one error line (exit 2), no panic.
device_ordinal() {  # EXPANSE MODEL_DIR
  local n rc=0 err
  "$1" verify --model "$2" --device cuda:0 --steps 1 --json | grep -q '"device": "cuda:0"' || { echo "report does not name cuda:0"; return 1; }
  n="$(nvidia-smi -L | wc -l)"
  err="$("$1" verify --model "$2" --device "cuda:$n" --steps 1 2>&1 >/dev/null)" || rc=$?
  [[ $rc -eq 2 && "$(wc -l <<<"$err")" -eq 1 && "$err" == *"--device"* && "$err" != *panicked* ]] || { echo "cuda:$n: rc $rc: $err"; return 1; }
  echo "cuda:0 named; cuda:$n refused: $err"
}
if [[ -d "$FIX/$LOGITS_MODEL" ]]; then
  run_step device-auto-fallback 60 "" -- auto_fallback "$EXPANSE" "$FIX/$LOGITS_MODEL" "$LOG_DIR" || true
  run_step device-ordinal 60 "" -- device_ordinal "$EXPANSE" "$FIX/$LOGITS_MODEL" || true
fi

run_step bench 240 "" -- "$EXPANSE" bench --synthetic openchat-3.5-0106 --variants base,expanded,skip -p 512 -n 128 -r 3 --device cuda --json || true
note="$(json_note "$LOG_DIR/bench.out")"; [[ -n "$note" ]] && ROWS[-1]="$(printf '%s' "${ROWS[-1]}" | cut -c1-52)  $note"

exit "$FAILED"
