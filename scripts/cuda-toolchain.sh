#!/usr/bin/env bash
# Fetch a CUDA 13.0 build toolchain (nvcc + headers + link libraries) from PyPI
# wheels into a cache folder, so that `cargo build --features cuda` works on a
# machine without a GPU and without a system CUDA install.
#
#   usage: scripts/cuda-toolchain.sh [CACHE_DIR]
#   default CACHE_DIR: ${XDG_CACHE_HOME:-$HOME/.cache}/expanse-cuda
#
#   eval "$(scripts/cuda-toolchain.sh)"     # sets CUDA_ROOT, PATH, ...
#
# stdout: only `export ...` lines (safe to eval); progress goes to stderr.
# Idempotent: a marker file records a finished install; a second run only
# prints the environment.
#
# The libcuda.so produced here (lib/stubs) is a LINK STUB with empty
# functions. It is on LIBRARY_PATH (link time) but deliberately NOT on
# LD_LIBRARY_PATH; never ship it to a GPU machine.
set -euo pipefail

# Pinned to CUDA 13.0: the GPU machines' driver (580) cannot JIT newer PTX.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14
  nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35
)
COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

log() { echo "[cuda-toolchain] $*" >&2; }
die() { echo "[cuda-toolchain] ERROR: $*" >&2; exit 1; }

CACHE_DIR="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/expanse-cuda}"
mkdir -p "$CACHE_DIR"
CACHE_DIR="$(cd "$CACHE_DIR" && pwd -P)"
ROOT="$CACHE_DIR/nvidia/cu13"
# The marker names the exact wheel set: changing the pins forces a reinstall.
MARKER="$CACHE_DIR/.installed-$(printf '%s\n' "${WHEELS[@]}" | cksum | cut -d' ' -f1)"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

print_env() {
  cat <<EOF
export CUDA_ROOT="$ROOT"
export CUDA_HOME="$ROOT"
export CUDA_COMPUTE_CAP="$COMPUTE_CAP"
export PATH="$ROOT/bin:\${PATH}"
export LIBRARY_PATH="$ROOT/lib:$ROOT/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$ROOT/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
}

if [[ -f "$MARKER" && -x "$ROOT/bin/nvcc" && -f "$ROOT/lib/stubs/libcuda.so" ]]; then
  log "toolchain already installed in $ROOT"
  print_env
  exit 0
fi

for tool in unzip gcc; do
  command -v "$tool" >/dev/null || die "'$tool' is required (apt-get install $tool)"
done
PIP=()
if command -v pip3 >/dev/null; then PIP=(pip3)
elif command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then PIP=(python3 -m pip)
else die "pip is required (python3 -m pip)"; fi

# ---- 1. download wheels -----------------------------------------------------
WHEEL_DIR="$CACHE_DIR/wheels"
mkdir -p "$WHEEL_DIR"
t0=$SECONDS
log "downloading ${#WHEELS[@]} wheels into $WHEEL_DIR"
"${PIP[@]}" download --no-deps --only-binary=:all: --disable-pip-version-check \
  -d "$WHEEL_DIR" "${WHEELS[@]}" >&2 || die "pip download failed"
log "download done in $((SECONDS - t0)) s"

# ---- 2. unpack ----------------------------------------------------------------
t0=$SECONDS
for spec in "${WHEELS[@]}"; do
  name="${spec%%==*}"; ver="${spec##*==}"
  whl=$(ls "$WHEEL_DIR"/"${name//-/_}"-"$ver"-*.whl 2>/dev/null | head -n1 || true)
  [[ -n "$whl" ]] || die "wheel for $spec not found in $WHEEL_DIR"
  log "unpacking $(basename "$whl")"
  unzip -q -o "$whl" 'nvidia/*' -d "$CACHE_DIR" || die "unzip $whl failed"
done
[[ -x "$ROOT/bin/nvcc" ]] || die "nvcc not found at $ROOT/bin/nvcc after unpacking"
# wheels do not always keep the executable bit
chmod +x "$ROOT"/bin/* 2>/dev/null || true
find "$ROOT" -path '*/nvvm/bin/*' -type f -exec chmod +x {} + 2>/dev/null || true
log "unpacked in $((SECONDS - t0)) s"

# ---- 3. lib*.so symlinks for the linker ---------------------------------------
shopt -s nullglob
for f in "$ROOT"/lib/lib*.so.*; do
  base="$(basename "$f")"
  link="$ROOT/lib/${base%%.so.*}.so"
  [[ -e "$link" ]] || ln -sf "$base" "$link"
done
shopt -u nullglob

# ---- 4. libcuda.so link stub (from cudarc's driver bindings) -----------------
CUDARC_SYS=""
# (Returns 0 whatever it finds: under `set -e`, a last glob entry that is not a folder, as when
# cudarc was never fetched on this machine, would otherwise end the script without a word.)
find_cudarc() {
  local d
  for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys; do
    if [[ -d "$d" ]]; then CUDARC_SYS="$d"; fi
  done
  return 0
}
find_cudarc
if [[ -z "$CUDARC_SYS" ]]; then
  log "cudarc 0.19 not in the cargo registry yet; running 'cargo fetch' in $REPO_DIR"
  (cd "$REPO_DIR" && cargo fetch >&2) || die "cargo fetch failed"
  find_cudarc
fi
[[ -n "$CUDARC_SYS" ]] || die "cudarc-0.19.*/src/driver/sys not found under ~/.cargo/registry/src"
log "generating libcuda.so stub from $CUDARC_SYS"
mkdir -p "$ROOT/lib/stubs"
STUB_C="$ROOT/lib/stubs/libcuda_stub.c"
# cudarc declares each driver entry point as `pub unsafe fn cuXxx(` plus an
# `extern "C" { fn cuXxx(...); }` used with its dynamic-linking feature.
grep -rhoE '\bfn cu[A-Za-z0-9_]+\s*\(' "$CUDARC_SYS" \
  | sed -E 's/fn (cu[A-Za-z0-9_]+).*/\1/' | sort -u \
  | awk '{ printf "void %s(void){}\n", $1 }' > "$STUB_C"
nsyms=$(wc -l < "$STUB_C")
(( nsyms > 100 )) || die "only $nsyms cu* symbols found in $CUDARC_SYS (expected ~500)"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" "$STUB_C" \
  || die "building the libcuda stub failed"
ln -sf libcuda.so "$ROOT/lib/stubs/libcuda.so.1"
log "libcuda stub: $nsyms symbols"

# ---- 5. sanity check -----------------------------------------------------------
"$ROOT/bin/nvcc" --version >&2 || die "nvcc does not run"
for h in cuda_runtime.h cuda_bf16.h cuda_fp16.h cuda.h; do
  [[ -f "$ROOT/include/$h" ]] || die "missing header $ROOT/include/$h"
done
[[ -d "$ROOT/include/nv" || -d "$ROOT/include/cccl/nv" ]] || log "warning: CCCL 'nv/target' headers not found"

rm -f "$CACHE_DIR"/.installed-*
touch "$MARKER"
log "toolchain ready in $ROOT ($(du -sh "$ROOT" | cut -f1))"
print_env
