#!/usr/bin/env bash
# The GPU check of expanse: run it on a machine with an NVIDIA GPU, the driver and the CUDA 13 runtime
# libraries (pip's nvidia-cublas / -cuda-runtime / -cuda-nvrtc), from a checkout whose bundle/ was
# made by scripts/gpu-bundle.sh on the build machine (the repository's tracked files and the bundle
# travel together: 64 MiB in all).
#
#   usage: bash bundle/gpu-check.sh [LOG_DIR]
#          LOG_DIR default: $EXPANSE_GPU_LOG, else $OUT/gpu-check (device runs), else ./gpu-check-logs
#   env:   EXPANSE_GPU_BUDGET_S  whole-check budget in seconds (default 280: a machine start and a rerun
#                                must fit in 15 minutes of GPU time)
#          EXPANSE_GPU_WORK      unpack folder (default /tmp/expanse-gpu)
#          EXPANSE_SKIP          space-separated names of optional steps to skip
#
# Steps (each with a timeout; output in LOG_DIR/<step>.{out,err}; * = required: skipped is FAIL):
#   *unpack *ldd nvidia-smi
#   *kernels            every CUDA kernel against its CPU implementation on fresh random inputs,
#                       under `compute-sanitizer --tool memcheck` when the machine has it
#   *selfcheck:<model>  the fused step (graph and fused paths) against the reference on the tiny
#                       fixtures: generate must stay on the path asked for (no fallback warning)
#   *fault              an injected fault in layer 3's o_proj is named, and generation goes on
#   *bench              --synthetic openchat-3.5-0106, pp512 + tg128, reference/fused/graph paths,
#                       base/expanded/skip: self-check on the real shapes, launches per token, graph
#                       nodes, the copy bandwidth measured in the same run and each path's fraction
#   *bench-checks       launches ≤ 9 per executed layer + 4, graph nodes = launches, no fallback
#   verify:<model>, logits-cuda/logits-cpu/compare-logits, device-auto-fallback, device-ordinal
# A summary table is printed last and written to LOG_DIR/summary.txt (with the card, driver and date).
# Exit status: 0 if every required step passed and every optional step that ran passed, 1 otherwise.
set -uo pipefail

START=$SECONDS
BUDGET="${EXPANSE_GPU_BUDGET_S:-280}"
BUNDLE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO="$(cd "$BUNDLE/.." && pwd -P)"
if [[ -n "${1:-}" ]]; then LOG_DIR="$1"
elif [[ -n "${EXPANSE_GPU_LOG:-}" ]]; then LOG_DIR="$EXPANSE_GPU_LOG"
elif [[ -n "${OUT:-}" ]]; then LOG_DIR="$OUT/gpu-check"
else LOG_DIR="$PWD/gpu-check-logs"; fi
mkdir -p "$LOG_DIR"
LOG_DIR="$(cd "$LOG_DIR" && pwd -P)"
WORK="${EXPANSE_GPU_WORK:-/tmp/expanse-gpu}"
FIX="$REPO/tests/fixtures"
export BUNDLE WORK REPO FIX

log() { echo "[gpu-check $(( SECONDS - START ))s] $*" | tee -a "$LOG_DIR/gpu-check.log" >&2; }
remaining() { echo $(( BUDGET - (SECONDS - START) )); }

declare -a ROWS=()
FAILED=0
row() { ROWS+=("$(printf '%-30s %-5s %4s %6s  %s' "$1" "$2" "$3" "$4" "$5")"); }
skipped() { case " ${EXPANSE_SKIP:-} " in *" $1 "*) return 0 ;; esac; return 1; }
required() { case "$1" in unpack|ldd|kernels|selfcheck:*|fault|bench|bench-checks) return 0 ;; esac; return 1; }

# run_step NAME TIMEOUT -- CMD...   (stdout -> NAME.out, stderr -> NAME.err; last stdout line = note)
run_step() {
  local name="$1" limit="$2"; shift 3
  local file="${name//[^A-Za-z0-9._-]/_}"
  if skipped "$name"; then
    if required "$name"; then row "$name" FAIL - - "required step skipped (EXPANSE_SKIP)"; FAILED=1; return 1; fi
    row "$name" skip - - "EXPANSE_SKIP"; return 0
  fi
  local left; left=$(remaining)
  if (( left < 10 )); then
    if required "$name"; then row "$name" FAIL - - "required step out of time budget"; FAILED=1; return 1; fi
    row "$name" skip - - "out of time budget"; return 0
  fi
  (( limit > left - 5 )) && limit=$(( left - 5 ))
  log "==> $name (timeout ${limit}s): $*"
  local t0=$SECONDS rc=0
  if declare -F "$1" >/dev/null; then
    timeout --kill-after=5 "$limit" bash -c "$(declare -f "$1"); \"\$@\"" _ "$@" > "$LOG_DIR/$file.out" 2> "$LOG_DIR/$file.err" || rc=$?
  else
    timeout --kill-after=5 "$limit" "$@" > "$LOG_DIR/$file.out" 2> "$LOG_DIR/$file.err" || rc=$?
  fi
  local dt=$(( SECONDS - t0 )) status=ok
  if (( rc == 124 || rc == 137 )); then status=TIME; FAILED=1
  elif (( rc != 0 )); then status=FAIL; FAILED=1; fi
  row "$name" "$status" "$rc" "${dt}s" "$(tail -n 1 "$LOG_DIR/$file.out" 2>/dev/null | cut -c1-70)"
  log "    $name: $status (rc $rc, ${dt}s)"
  [[ "$status" == ok ]] || tail -n 15 "$LOG_DIR/$file.err" | sed 's/^/    | /' >&2
  return $rc
}

print_summary() {
  {
    echo
    echo "==== expanse gpu-check summary ($(( SECONDS - START ))s, $(date -u +%Y-%m-%dT%H:%M:%SZ), logs in $LOG_DIR) ===="
    [[ -s "$LOG_DIR/gpu.txt" ]] && echo "GPU: $(head -n1 "$LOG_DIR/gpu.txt")"
    printf '%-30s %-5s %4s %6s  %s\n' step stat rc time note
    printf '%s\n' "${ROWS[@]}"
    [[ -s "$LOG_DIR/bench-summary.txt" ]] && cat "$LOG_DIR/bench-summary.txt"
    if (( FAILED )); then echo "RESULT: FAIL"; else echo "RESULT: PASS"; fi
  } | tee "$LOG_DIR/summary.txt"
}
trap print_summary EXIT

# ---- unpack, libraries, card ----------------------------------------------------------
unpack() {
  set -e
  rm -rf "$WORK"; mkdir -p "$WORK/lib"
  xz -dc "$BUNDLE/bin.tar.xz" | tar -x -C "$WORK"
  chmod +x "$WORK"/bin/* "$WORK"/testbin/*
  ls -la "$WORK/bin" "$WORK/testbin" >&2
  echo "unpacked into $WORK"
}
run_step unpack 60 -- unpack || { log "cannot unpack the bundle; stopping"; exit 1; }

# The CUDA 13 libraries from pip wheels (nvidia/cu13/lib, older nvidia/<pkg>/lib) or a system CUDA; the
# driver's libcuda.so.1 from the loader path. libcurand: the machine's if it has one, else the bundle's
# stub (expanse never draws random numbers on the GPU: its synthetic weights come from its own kernel;
# candle only creates a generator, which the stub answers).
LIBDIRS=()
SITES="$(python3 -c 'import site, sys; print("\n".join(sorted(set(site.getsitepackages() + [site.getusersitepackages()] + [p for p in sys.path if p.endswith("-packages")]))))' 2>/dev/null)"
while IFS= read -r sp; do
  [[ -n "$sp" && -d "$sp/nvidia" ]] || continue
  while IFS= read -r d; do LIBDIRS+=("$d"); done < <(find "$sp/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | sort)
done <<< "$SITES"
for d in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do [[ -d "$d" ]] && LIBDIRS+=("$d"); done
if ! { for d in "${LIBDIRS[@]}"; do [[ -e "$d/libcurand.so.10" ]] && exit 0; done; exit 1; }; then
  cp "$BUNDLE/libcurand-stub.so.10" "$WORK/lib/libcurand.so.10"
  LIBDIRS+=("$WORK/lib")
  log "no libcurand.so.10 on this machine: using the bundle's stub"
fi
LD_LIBRARY_PATH="$(IFS=:; echo "${LIBDIRS[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
EXPANSE="$WORK/bin/expanse"
LIBTEST="$(ls "$WORK"/testbin/lib-* 2>/dev/null | head -n1)"
export EXPANSE LIBTEST

check_ldd() {
  ldd "$EXPANSE" "$LIBTEST" >&2
  local missing; missing="$(ldd "$EXPANSE" "$LIBTEST" | awk '/not found/ { print $1 }' | sort -u | tr '\n' ' ')"
  [[ -z "$missing" ]] || { echo "not found: $missing"; return 1; }
  echo "all libraries resolved"
}
run_step ldd 20 -- check_ldd || log "libraries missing: the steps below cannot start (rc 127)"
run_step nvidia-smi 30 -- nvidia-smi || true
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader > "$LOG_DIR/gpu.txt" 2>/dev/null || true
cd "$REPO"
export CARGO_MANIFEST_DIR="$REPO"

# ---- kernels against their CPU implementations --------------------------------------------
kernels() {
  # The emulated cases run in every CPU test run; here the device's.
  local args=(kernels::tests --skip kernels::tests::emulated --test-threads 1)
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 99 "$LIBTEST" "${args[@]}" || return $?
    echo "kernels: passed under compute-sanitizer memcheck"
  else
    "$LIBTEST" "${args[@]}" || return $?
    echo "kernels: passed (no compute-sanitizer on this machine)"
  fi
}
run_step kernels 150 -- kernels || true

# ---- the fused step's self-check on the tiny fixtures ---------------------------------------
# generate on PATH must answer without falling back: the self-check ran and passed (its warning
# would name the first layer and op that differ).
selfcheck() {  # MODEL_DIR DTYPE
  local path out err
  for path in graph fused; do
    out="$("$EXPANSE" generate --model "$1" --dtype "$2" --device cuda --decode-path "$path" --chat-template none \
      --prompt "The quick brown fox jumps over the lazy dog and" --max-tokens 24 --temperature 0 --json 2>"$WORK/sc.err")" \
      || { cat "$WORK/sc.err"; return 1; }
    err="$(cat "$WORK/sc.err")"; echo "$err" >&2
    grep -q "warning: the fast decode path" <<<"$err" && { echo "$path: fell back: $err"; return 1; }
    grep -q "\"decode_path\": \"$path\"" <<<"$out" || { echo "$path: ran $(grep -o '"decode_path": "[a-z]*"' <<<"$out")"; return 1; }
    echo "$path: $(grep -o '"launches_per_token": [0-9]*' <<<"$out")"
  done
}
for spec in tiny-mistral-bf16:bf16 tiny-mistral-f32:f32 tiny-llama-f32:f32 tiny-finetuned-bf16:bf16; do
  run_step "selfcheck:${spec%%:*}" 40 -- selfcheck "$FIX/${spec%%:*}" "${spec##*:}" || true
done

fault() {
  local err
  "$EXPANSE" generate --model "$FIX/tiny-mistral-bf16" --device cuda --decode-path graph --chat-template none \
    --prompt "Hello there" --max-tokens 8 --temperature 0 --inject-fault 3:o_proj 2>"$WORK/fault.err" >/dev/null || { cat "$WORK/fault.err"; return 1; }
  err="$(head -n1 "$WORK/fault.err")"
  [[ "$err" == *"(layer 3 o_proj:"* && "$err" == *"continuing on the reference path"* ]] || { echo "not named: $err"; return 1; }
  echo "$err" | cut -c1-120
}
run_step fault 40 -- fault || true

# ---- real shapes: self-check, speed, launches, bandwidth --------------------------------------
run_step bench 150 -- "$EXPANSE" bench --synthetic openchat-3.5-0106 --device cuda --variants base,expanded,skip \
  --decode-path reference,fused,graph -p 512 -n 128 -r 3 --json || true
bench_checks() {
  python3 - "$LOG_DIR/bench.out" "$LOG_DIR/bench-summary.txt" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
bw = r.get("copy_bandwidth_bytes_per_sec")
lines = [f"copy bandwidth (read + write): {bw / 1e9:.0f} GB/s" if bw else "copy bandwidth: not measured"]
mem = {m["variant"]: m for m in r["memory"]}
bad = list(r.get("notices", []))
lines.append("| variant | test | path | tok/s | launches/token | graph nodes | of copy bandwidth | streamed/token |")
for row in r["rows"]:
    m = mem[row["variant"]]
    frac = row.get("bandwidth_fraction")
    lines.append(f"| {row['variant']} | {row['test']} | {row['path']} | {row['mean_tps']:.1f} | {row.get('launches_per_token') or '-'} "
                 f"| {row.get('graph_nodes') or '-'} | {f'{100 * frac:.1f} %' if frac else '-'} | {m['streamed_per_token_bytes'] / 1e9:.2f} GB |")
    if row["test"].startswith("tg") and row["path"] != "reference":
        n, layers = row.get("launches_per_token"), row["executed_layers"]
        if not n or n > 9 * layers + 4:
            bad.append(f"{row['variant']} {row['path']}: {n} launches for {layers} layers")
        if row["path"] == "graph" and row.get("graph_nodes") != n:
            bad.append(f"{row['variant']} graph: {row.get('graph_nodes')} nodes, {n} launches")
# The process's GPU memory stays at the weights + KV cache + at most 512 MiB (activations, graph, workspace).
held = max(m["weights_held_bytes"] for m in r["memory"])
kv = max(m["kv_cache_bytes"] for m in r["memory"])
for m in r["memory"]:
    alloc = m.get("gpu_process_bytes")
    lines.append(f"{m['variant']}: GPU allocated by expanse {alloc / 1e9 if alloc else float('nan'):.2f} GB "
                 f"(weights held {m['weights_held_bytes'] / 1e9:.2f} GB, KV {m['kv_cache_bytes'] / 1e6:.0f} MB), device-wide {(m.get('gpu_bytes') or 0) / 1e9:.2f} GB")
    if alloc is None or alloc > held + kv + (512 << 20):
        bad.append(f"{m['variant']}: GPU allocated {alloc} > weights {held} + KV {kv} + 512 MiB")
for v in ("base", "expanded", "skip"):
    got = {row["path"] for row in r["rows"] if row["variant"] == v and row["test"].startswith("tg")}
    if got != {"reference", "fused", "graph"}:
        bad.append(f"{v}: decode rows ran {sorted(got)} (a fast path fell back)")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
if bad:
    print("PROBLEMS: " + "; ".join(bad))
    sys.exit(1)
print("launches within budget, graph nodes = launches, no fallback")
EOF
}
if [[ -s "$LOG_DIR/bench.out" ]]; then run_step bench-checks 20 -- bench_checks || true
else row bench-checks FAIL - - "no bench output"; FAILED=1; fi

# ---- the reference path on the GPU, devices -------------------------------------------------
for m in tiny-mistral-bf16 tiny-mergekit-every4-bf16 tiny-finetuned-bf16; do
  run_step "verify:$m" 40 -- "$EXPANSE" verify --model "$FIX/$m" --device cuda --dtype bf16 --steps 8 || true
done
IDS="1,415,2936,9060,285,1142,28705,28740,28750,28770,13,1014,2696,6153,754,272,17898,3914,28723,2,32000,32001,100,200"
if run_step logits-cuda 30 -- "$EXPANSE" logits --model "$FIX/tiny-mistral-bf16" --device cuda --ids "$IDS" --out "$LOG_DIR/logits-cuda.safetensors" \
  && run_step logits-cpu 30 -- "$EXPANSE" logits --model "$FIX/tiny-mistral-bf16" --device cpu --ids "$IDS" --out "$LOG_DIR/logits-cpu.safetensors"; then
  run_step compare-logits 20 -- "$EXPANSE" compare-logits "$LOG_DIR/logits-cuda.safetensors" "$LOG_DIR/logits-cpu.safetensors" --tolerance 0.5 || true
fi

# --device auto with CUDA hidden (CUDA_VISIBLE_DEVICES=): runs on the CPU and says why in one line.
auto_fallback() {
  local err line
  err="$(CUDA_VISIBLE_DEVICES= "$EXPANSE" logits --model "$FIX/tiny-mistral-bf16" --device auto --ids 1,415,2936 --out "$WORK/logits-auto.safetensors" 2>&1 >/dev/null)" \
    || { echo "$err"; return 1; }
  echo "$err" >&2
  line="$(grep -F -- '--device auto:' <<<"$err" || true)"
  [[ -n "$line" && "$(wc -l <<<"$line")" -eq 1 && "$line" == *"running on the CPU"* ]] || { echo "no one-line fallback notice in: $err"; return 1; }
  echo "$line"
}
# The report names the ordinal chosen; an ordinal past the last GPU is one error line (exit 2), no panic.
device_ordinal() {
  local n rc=0 err
  "$EXPANSE" verify --model "$FIX/tiny-mistral-bf16" --device cuda:0 --steps 1 --json | grep -q '"device": "cuda:0"' || { echo "report does not name cuda:0"; return 1; }
  n="$(nvidia-smi -L | wc -l)"
  err="$("$EXPANSE" verify --model "$FIX/tiny-mistral-bf16" --device "cuda:$n" --steps 1 2>&1 >/dev/null)" || rc=$?
  [[ $rc -eq 2 && "$(wc -l <<<"$err")" -eq 1 && "$err" == *"--device"* && "$err" != *panicked* ]] || { echo "cuda:$n: rc $rc: $err"; return 1; }
  echo "cuda:0 named; cuda:$n refused: $err"
}
run_step device-auto-fallback 30 -- auto_fallback || true
run_step device-ordinal 30 -- device_ordinal || true

# Optional: the step's GEMVs alone, in GB/s of the weights they stream.
if [[ -n "$LIBTEST" ]]; then
  run_step gemv-probe 30 -- "$LIBTEST" --ignored --exact kernels::tests::gpu::bench_probe --nocapture || true
fi

exit "$FAILED"
