#!/usr/bin/env bash
# gpu-check's rehearsal, run by .ci/run: scripts/gpu-check.sh --rehearse on this machine's CPU build,
# twice, so the check that will meet a GPU has run end to end first:
#   1. clean: every step runs in order and passes (RESULT: PASS, exit 0); only the steps that need
#      what the CPU build lacks are skipped, each with its reason;
#   2. made to fail: EXPANSE_REHEARSE_FAIL=fault fails one required step, EXPANSE_REHEARSE_HANG=ldd
#      hangs another until its timeout, and a stand-in compute-sanitizer refuses the device as some
#      GPU machines' do: the summary must say FAIL, name the failed and the timed-out step, still run
#      every other step (the kernel tests without the sanitizer), and exit non-zero.
# Both runs must leave in their output folder only what a device run brings back (8 files at most).
#
#   usage: scripts/gpu-check-rehearsal.sh [WORK_DIR]   (default <repo>/target/gpu-check-rehearsal)
#   env:   CARGO_TARGET_DIR   the CPU build to bundle (default <repo>/target; built if missing)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$REPO"
OUTS="${1:-$REPO/target/gpu-check-rehearsal}"
log() { echo "[gpu-check-rehearsal] $*" >&2; }
die() { echo "[gpu-check-rehearsal] FAILED: $*" >&2; exit 1; }

rm -rf "$OUTS"; mkdir -p "$OUTS"
bash scripts/gpu-bundle.sh --rehearse "$REPO/bundle-rehearsal" || die "the rehearsal bundle could not be built"

# The steps, in order, that every rehearsal must show (gpu-check's own list: a step dropped or
# reordered there fails here).
STEPS=(unpack ldd nvidia-smi kernels selfcheck:tiny-mistral-bf16 selfcheck:tiny-mistral-f32
  selfcheck:tiny-llama-f32 selfcheck:tiny-finetuned-bf16 fault longctx bench bench-checks bench-deep bench-batch bench-q4k anchor
  verify:tiny-mistral-bf16 verify:tiny-mergekit-every4-bf16 verify:tiny-finetuned-bf16 logits-cuda logits-cpu
  compare-logits device-auto-fallback device-ordinal gemv-probe)
# What the CPU build cannot run, skipped with a reason (anchor: only without torch here).
may_skip() { case "$1" in anchor|gemv-probe) return 0 ;; esac; return 1; }

# rows SUMMARY: "step status" lines of the summary table.
rows() { awk '/^step +stat/ { on = 1; next } /^----$/ { on = 0 } on && NF >= 2 { print $1, $2 }' "$1"; }

check_outputs() {  # OUT
  local n; n="$(find "$1" -type f | wc -l)"
  (( n <= 8 )) || die "$1 holds $n files; a device run brings back 8"
  [[ -z "$(find "$1" -mindepth 3)" ]] || die "$1 has files more than 2 folders down"
  for f in summary.txt logs.tar.xz bench.json; do [[ -s "$1/$f" ]] || die "$1/$f missing"; done
  xz -t "$1/logs.tar.xz" || die "$1/logs.tar.xz is not a valid archive"
  # Listed first, then searched: `tar | grep -q` fails under pipefail when grep stops reading early.
  local listing; listing="$(tar -tJf "$1/logs.tar.xz")" || die "$1/logs.tar.xz cannot be listed"
  grep -qx 'logs/kernels.out' <<<"$listing" || die "the archive lacks the kernels step's log"
}

# ---- 1. clean ----------------------------------------------------------------------------------
log "run 1: clean rehearsal"
rc=0
EXPANSE_GPU_WORK="$OUTS/work-clean" bash bundle-rehearsal/gpu-check.sh --rehearse "$OUTS/clean" > "$OUTS/clean.log" 2>&1 || rc=$?
cat "$OUTS/clean/summary.txt" 2>/dev/null || tail -n 40 "$OUTS/clean.log"
(( rc == 0 )) || die "the clean rehearsal exited $rc"
grep -qx 'RESULT: PASS' "$OUTS/clean/summary.txt" || die "the clean rehearsal did not say RESULT: PASS"
mapfile -t got < <(rows "$OUTS/clean/summary.txt")
(( ${#got[@]} == ${#STEPS[@]} )) || die "the clean rehearsal shows ${#got[@]} steps, expected ${#STEPS[@]}: ${got[*]}"
for i in "${!STEPS[@]}"; do
  read -r name status <<<"${got[$i]}"
  [[ "$name" == "${STEPS[$i]}" ]] || die "step $((i + 1)) is $name, expected ${STEPS[$i]}"
  [[ "$status" == ok ]] || { may_skip "$name" && [[ "$status" == skip ]]; } || die "$name: $status in the clean rehearsal"
done
grep -q 'kernels .* ok .*passed' "$OUTS/clean/summary.txt" || die "the kernels step does not say how many tests passed"
# The roofline beside the measured figures: an op profile per fast-path decode row, each with its total.
(( $(grep -c '^op profile, .* fused ' "$OUTS/clean/summary.txt") == 3 )) || die "the summary lacks an op profile for each variant's fused row"
grep -qE '^  gate_up_proj +[0-9]+ +[0-9.]+ +[0-9.]+ ' "$OUTS/clean/summary.txt" || die "the op profile has no measured gate_up_proj row"
check_outputs "$OUTS/clean"

# ---- 2. made to fail -------------------------------------------------------------------------------
log "run 2: a failed step, a hung step, a compute-sanitizer that refuses the device"
mkdir -p "$OUTS/fake-bin"
cat > "$OUTS/fake-bin/compute-sanitizer" <<'EOF'
#!/bin/sh
# Stands in for compute-sanitizer on a GPU machine that it does not support.
echo "========= COMPUTE-SANITIZER"
echo "========= Error: Device not supported. Please refer to the \"Supported Devices\" section of the sanitizer documentation"
echo "========= Error: Target application terminated before first instrumented API call"
exit 999
EOF
chmod +x "$OUTS/fake-bin/compute-sanitizer"
rc=0
PATH="$OUTS/fake-bin:$PATH" EXPANSE_REHEARSE_FAIL=fault EXPANSE_REHEARSE_HANG=ldd EXPANSE_GPU_WORK="$OUTS/work-fail" \
  bash bundle-rehearsal/gpu-check.sh --rehearse "$OUTS/fail" > "$OUTS/fail.log" 2>&1 || rc=$?
cat "$OUTS/fail/summary.txt" 2>/dev/null || tail -n 40 "$OUTS/fail.log"
(( rc != 0 )) || die "the rehearsal with a failed step exited 0"
grep -qx 'RESULT: FAIL' "$OUTS/fail/summary.txt" || die "the rehearsal with a failed step did not say RESULT: FAIL"
mapfile -t got < <(rows "$OUTS/fail/summary.txt")
(( ${#got[@]} == ${#STEPS[@]} )) || die "the failing rehearsal shows ${#got[@]} steps, expected ${#STEPS[@]}: every step still runs"
for i in "${!STEPS[@]}"; do
  read -r name status <<<"${got[$i]}"
  case "$name" in
    fault) want=FAIL ;;
    ldd) want=TIME ;;
    *) want=ok ;;
  esac
  [[ "$status" == "$want" ]] || { may_skip "$name" && [[ "$status" == skip ]]; } || die "$name: $status, expected $want"
done
grep -q '^ldd .*timed out' "$OUTS/fail/summary.txt" || die "the hung step is not named as timed out"
grep -q 'WITHOUT compute-sanitizer' "$OUTS/fail/summary.txt" || die "the kernels step does not say the sanitizer refused and the tests ran without it"
check_outputs "$OUTS/fail"
log "PASS: both rehearsals ran every step; the made-to-fail one failed where it was told to"
