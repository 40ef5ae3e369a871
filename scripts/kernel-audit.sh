#!/usr/bin/env bash
# Audit of expanse's CUDA kernels as the build compiles them (no GPU needed): each kernels/cuda/*.cu
# is compiled to a cubin for the target arch with the build's flags, `ptxas -v` reports registers,
# stack, spills and shared memory, `cuobjdump -sass` gives the machine code, and
# scripts/sass_audit.py FAILS when
#   - any kernel spills or touches local memory (LDL/STL), or
#   - the main loop of a GEMV or decode-attention kernel keeps fewer than KERNEL_AUDIT_MIN_LOADS
#     (default 4) independent 128-bit global loads in flight (the rule is spelled out in
#     sass_audit.py's header).
#
#   usage: scripts/kernel-audit.sh [OUT_DIR]      (default: target/kernel-audit)
#   env:   CUDA_COMPUTE_CAP (default 90 -> sm_90a, as build.rs), KERNEL_AUDIT_MIN_LOADS,
#          CUDA_TOOLCHAIN_DIR (cache of scripts/cuda-toolchain.sh)
#
# The CUDA 13.0 wheels carry no cuobjdump/nvdisasm; the first run fetches them (13.2, the oldest on
# PyPI; disassembling sm_90 code does not depend on the compiler's version) next to the toolchain.
# Writes OUT_DIR/<file>.{ptxas.log,sass} and OUT_DIR/audit.txt.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$REPO"
log() { echo "[kernel-audit] $*" >&2; }
die() { echo "[kernel-audit] FAILED: $*" >&2; exit 1; }

OUT="${1:-$REPO/target/kernel-audit}"
mkdir -p "$OUT"

if ! command -v nvcc >/dev/null || [[ -z "${CUDA_ROOT:-}" ]]; then
  env_out="$("$REPO/scripts/cuda-toolchain.sh" ${CUDA_TOOLCHAIN_DIR:+"$CUDA_TOOLCHAIN_DIR"})" || die "scripts/cuda-toolchain.sh failed"
  eval "$env_out"
fi
nvcc --version | grep -q "release 13.0" || log "warning: nvcc is not 13.0 ($(nvcc --version | grep -o 'release [0-9.]*'))"

# cuobjdump + nvdisasm beside the toolchain (their own folder: the toolchain's marker stays valid).
TOOLS="${CUDA_ROOT%/nvidia/cu13}/audit-tools"
if [[ ! -x "$TOOLS/nvidia/cu13/bin/cuobjdump" || ! -x "$TOOLS/nvidia/cu13/bin/nvdisasm" ]]; then
  log "fetching cuobjdump and nvdisasm into $TOOLS"
  mkdir -p "$TOOLS/wheels"
  PIP=(python3 -m pip)
  command -v pip3 >/dev/null && PIP=(pip3)
  "${PIP[@]}" download --no-deps --only-binary=:all: --disable-pip-version-check -d "$TOOLS/wheels" \
    nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86 >&2 || die "pip download of cuobjdump/nvdisasm failed"
  for whl in "$TOOLS"/wheels/nvidia_cuda_cuobjdump-13.2.86-*.whl "$TOOLS"/wheels/nvidia_cuda_nvdisasm-13.2.86-*.whl; do
    unzip -q -o "$whl" 'nvidia/*' -d "$TOOLS" || die "unzip $whl failed"
  done
  chmod +x "$TOOLS"/nvidia/cu13/bin/*
fi
export PATH="$TOOLS/nvidia/cu13/bin:$PATH"

# The arch rule of build.rs: 90 -> 90a, 80 -> 80, 8.9 -> 89, 120 -> 120a, 121 -> 121f.
cap="${CUDA_COMPUTE_CAP:-90}"
cap="${cap,,}"; cap="${cap#sm_}"; cap="${cap//./}"
case "$cap" in
  *a|*f) arch="$cap" ;;
  *) n=$((10#$cap)); (( n < 20 )) && n=$((n * 10))
     if (( n > 120 )); then arch="${n}f"; elif (( n >= 90 )); then arch="${n}a"; else arch="$n"; fi ;;
esac
log "arch sm_$arch, minimum $((${KERNEL_AUDIT_MIN_LOADS:-4})) loads in flight"

logs=(); sass=()
for src in kernels/cuda/*.cu; do
  stem="$(basename "$src" .cu)"
  # Flags as build.rs passes them for the SASS part of the fatbin.
  nvcc -cubin "-gencode=arch=compute_$arch,code=sm_$arch" -O3 -std=c++17 --expt-relaxed-constexpr \
    -I kernels/cuda -Xptxas -v -o "$OUT/$stem.cubin" "$src" 2> "$OUT/$stem.ptxas.log" \
    || { cat "$OUT/$stem.ptxas.log" >&2; die "nvcc failed on $src"; }
  cuobjdump -sass "$OUT/$stem.cubin" > "$OUT/$stem.sass" || die "cuobjdump failed on $stem.cubin"
  logs+=("$OUT/$stem.ptxas.log"); sass+=("$OUT/$stem.sass")
done

set +e
python3 "$REPO/scripts/sass_audit.py" "${KERNEL_AUDIT_MIN_LOADS:-4}" "${logs[@]}" -- "${sass[@]}" | tee "$OUT/audit.txt"
rc=${PIPESTATUS[0]}
set -e
(( rc == 0 )) || die "see $OUT/audit.txt"
log "passed ($OUT/audit.txt)"
