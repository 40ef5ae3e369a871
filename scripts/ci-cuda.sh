#!/usr/bin/env bash
# Build expanse with the `cuda` feature on a machine without a GPU: proves that
# build.rs, the CUDA kernels (kernels/cuda/*.cu -> PTX) and candle's CUDA
# backend compile, and that the binary and the test binaries link.
#
#   usage: scripts/ci-cuda.sh            (from anywhere; works in the repo root)
#   env:   CUDA_TOOLCHAIN_DIR  cache for scripts/cuda-toolchain.sh (its default if unset)
#          CARGO_TARGET_DIR    default <repo>/target-cuda (keep it apart from the CPU build)
#          CARGO_BUILD_JOBS    default 1 (2-core machines shared with other builds)
#          CUDAFORGE_THREADS   parallel nvcc processes in candle-kernels' build script
#                              (default: CARGO_BUILD_JOBS)
#          CI_CUDA_NICE        nice level, default 19
#          CI_CUDA_SKIP_TESTS  =1 to build only the binary (no test binaries)
#
# Nothing here runs a kernel: the test binaries it builds are meant for a GPU
# machine (scripts/gpu-bundle.sh + scripts/gpu-check.sh). Exits non-zero on
# any failure.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$REPO"
log() { echo "[ci-cuda] $*" >&2; }
die() { echo "[ci-cuda] FAILED: $*" >&2; exit 1; }

t_all=$SECONDS
env_out="$("$REPO/scripts/cuda-toolchain.sh" ${CUDA_TOOLCHAIN_DIR:+"$CUDA_TOOLCHAIN_DIR"})" \
  || die "scripts/cuda-toolchain.sh failed"
eval "$env_out"
command -v nvcc >/dev/null || die "nvcc not on PATH after sourcing the toolchain env"
log "toolchain: $CUDA_ROOT ($(nvcc --version | grep -o 'release [0-9.]*'))"
log "time for toolchain: $((SECONDS - t_all)) s"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target-cuda}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
# candle-kernels 0.11.1 builds through cudaforge, whose rayon pool size comes
# from CUDAFORGE_THREADS (then RAYON_NUM_THREADS, else half the cores). nvcc's
# own --threads only applies to flash-attn/cutlass files, not used here.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$CARGO_BUILD_JOBS}"
NICE=(nice -n "${CI_CUDA_NICE:-19}")
log "CARGO_TARGET_DIR=$CARGO_TARGET_DIR CARGO_BUILD_JOBS=$CARGO_BUILD_JOBS CUDAFORGE_THREADS=$CUDAFORGE_THREADS CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"

declare -a SUMMARY=()
step() {
  local name="$1"; shift
  local t0=$SECONDS
  log "==> $name: $*"
  if "${NICE[@]}" "$@"; then
    SUMMARY+=("$(printf '%-28s ok    %5d s' "$name" $((SECONDS - t0)))")
  else
    local rc=$?
    SUMMARY+=("$(printf '%-28s FAIL  %5d s (rc %d)' "$name" $((SECONDS - t0)) "$rc")")
    printf '%s\n' "${SUMMARY[@]}" >&2
    die "$name (rc $rc)"
  fi
}

step "build --release (cuda)" cargo build --release --features cuda
BIN="$CARGO_TARGET_DIR/release/expanse"
[[ -x "$BIN" ]] || die "binary $BIN missing after the build"
if [[ "${CI_CUDA_SKIP_TESTS:-0}" != 1 ]]; then
  step "test --no-run (cuda)" cargo test --release --features cuda --no-run
fi

# The binary must need the real driver library (the stub only satisfies ld).
if command -v readelf >/dev/null; then
  needed="$(readelf -d "$BIN" | grep NEEDED | grep -oE '\[[^]]+\]' | tr -d '[]' | tr '\n' ' ')"
  log "expanse NEEDED: $needed"
  [[ "$needed" == *libcuda.so.1* ]] || log "warning: expanse does not link libcuda.so.1"
fi

echo "---- ci-cuda summary ----" >&2
printf '%s\n' "${SUMMARY[@]}" >&2
log "total $((SECONDS - t_all)) s; binary $(du -h "$BIN" | cut -f1) at $BIN"
