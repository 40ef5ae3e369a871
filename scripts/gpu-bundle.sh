#!/usr/bin/env bash
# Builds what a GPU machine needs to run scripts/gpu-check.sh, into one folder that travels with the
# repository's tracked files (the device tool carries both, 64 MiB in all, so the fixtures are not
# copied again: gpu-check reads tests/fixtures from the checkout it runs in):
#
#   OUT_DIR/gpu-check.sh           the check (scripts/gpu-check.sh)
#   OUT_DIR/bin.tar.xz             bin/expanse + testbin/lib-expanse (the library's test binary: the
#                                  CUDA kernels against their CPU implementations), stripped, one solid
#                                  xz so candle's kernels, which both embed, are stored about once
#   OUT_DIR/libcurand-stub.so.10   answers candle's generator set-up where the machine has no cuRAND
#                                  (expanse draws no random numbers on the GPU; ~16 KB instead of the
#                                  real library's 43 MB compressed)
#   OUT_DIR/MANIFEST.txt           what is inside, sizes, sha256, git revision
#
#   usage: scripts/gpu-bundle.sh [OUT_DIR]        (default: <repo>/bundle, git-ignored)
#          scripts/gpu-bundle.sh --rehearse [OUT_DIR]  the same bundle from the CPU build (default
#                                  <repo>/bundle-rehearsal, CARGO_TARGET_DIR default <repo>/target), for
#                                  gpu-check's rehearsal (scripts/gpu-check-rehearsal.sh); no size limit
#   env:   GPU_BUNDLE_SKIP_BUILD=1  reuse the existing target-cuda build (no ci-cuda.sh)
#          GPU_BUNDLE_LIMIT_MIB     limit for bundle + tracked files, default 64
#          CARGO_TARGET_DIR         default <repo>/target-cuda
#
# Then, on the GPU machine, from the checkout's root: bash bundle/gpu-check.sh "$OUT"
# Exits non-zero if the build fails or bundle + tracked files exceed the limit.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$REPO"
log() { echo "[gpu-bundle] $*" >&2; }
die() { echo "[gpu-bundle] FAILED: $*" >&2; exit 1; }

REHEARSE=0
if [[ "${1:-}" == --rehearse ]]; then REHEARSE=1; shift; fi
if (( REHEARSE )); then
  OUT_DIR="${1:-$REPO/bundle-rehearsal}"
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
else
  OUT_DIR="${1:-$REPO/bundle}"
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target-cuda}"
fi
LIMIT_MIB="${GPU_BUNDLE_LIMIT_MIB:-64}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
for tool in xz tar python3 sha256sum gcc; do
  command -v "$tool" >/dev/null || die "'$tool' is required"
done
t_all=$SECONDS

# ---- 1. build (the same build as CI's cuda check; the CPU build for a rehearsal) ---------------
FEATURES=(--features cuda)
if (( REHEARSE )); then
  FEATURES=()
  cargo build --release || die "cargo build --release failed"
else
  if [[ "${GPU_BUNDLE_SKIP_BUILD:-0}" != 1 ]]; then
    "$REPO/scripts/ci-cuda.sh" || die "scripts/ci-cuda.sh failed"
  fi
  eval "$("$REPO/scripts/cuda-toolchain.sh" ${CUDA_TOOLCHAIN_DIR:+"$CUDA_TOOLCHAIN_DIR"})"
fi
BIN="$CARGO_TARGET_DIR/release/expanse"
[[ -x "$BIN" ]] || die "$BIN not found (run scripts/ci-cuda.sh)"
LIBTEST="$(nice -n 19 cargo test --release "${FEATURES[@]}" --lib --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])
')"
[[ -x "$LIBTEST" ]] || die "no library test binary (does 'cargo test --release ${FEATURES[*]} --lib --no-run' work?)"

# ---- 2. stage + compress ---------------------------------------------------------
rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd -P)"
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/expanse-bundle.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin" "$STAGE/testbin"
cp "$BIN" "$STAGE/bin/expanse"
cp "$LIBTEST" "$STAGE/testbin/lib-expanse"
strip --strip-unneeded "$STAGE"/bin/* "$STAGE"/testbin/* 2>/dev/null || log "warning: strip failed; shipping unstripped binaries"
t0=$SECONDS
# The rehearsal's bundle only has to unpack: compressed fast.
XZ=(xz -T1 --lzma2=preset=9,dict=256MiB); (( REHEARSE )) && XZ=(xz -T1 -0)
(cd "$STAGE" && tar -cf - bin testbin) | nice -n 19 "${XZ[@]}" > "$OUT_DIR/bin.tar.xz"
log "bin.tar.xz: $(du -h "$OUT_DIR/bin.tar.xz" | cut -f1) in $((SECONDS - t0)) s"

# The cuRAND stub: every function cudarc binds returns CURAND_STATUS_SUCCESS; creating a generator
# hands back a dummy handle, so candle's device set-up succeeds. Nothing in expanse generates with it.
if (( REHEARSE )); then
  # gpu-check copies the stub where the machine has no cuRAND; the rehearsal's only has to be a library.
  echo 'int curandCreateGenerator(void **g, int kind) { (void)kind; *g = (void *)1; return 0; }' > "$STAGE/curand_stub.c"
  gcc -shared -fPIC -O2 -Wl,-soname,libcurand.so.10 -o "$OUT_DIR/libcurand-stub.so.10" "$STAGE/curand_stub.c"
  cp "$REPO/scripts/gpu-check.sh" "$OUT_DIR/gpu-check.sh"
  chmod +x "$OUT_DIR/gpu-check.sh"
  log "rehearsal bundle in $OUT_DIR ($(du -sh "$OUT_DIR" | cut -f1), $((SECONDS - t_all)) s)"
  exit 0
fi
CURAND_SYS="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-0.19*/src/curand/sys/mod.rs' 2>/dev/null | sort | tail -n1)"
[[ -f "$CURAND_SYS" ]] || die "cudarc's curand bindings not found (cargo fetch --features cuda)"
{
  echo '/* generated by scripts/gpu-bundle.sh: a cuRAND that creates generators and never draws */'
  echo 'int curandCreateGenerator(void **g, int kind) { (void)kind; *g = (void *)1; return 0; }'
  grep -o 'pub unsafe fn curand[A-Za-z0-9_]*' "$CURAND_SYS" | sed 's/pub unsafe fn //' | sort -u \
    | grep -vx curandCreateGenerator | sed 's/.*/int &(void) { return 0; }/'
} > "$STAGE/curand_stub.c"
gcc -shared -fPIC -O2 -Wl,-soname,libcurand.so.10 -o "$OUT_DIR/libcurand-stub.so.10" "$STAGE/curand_stub.c"
cp "$REPO/scripts/gpu-check.sh" "$OUT_DIR/gpu-check.sh"
chmod +x "$OUT_DIR/gpu-check.sh"

# ---- 3. manifest + size check -----------------------------------------------------
tracked=$(git -C "$REPO" ls-files -z | (cd "$REPO" && xargs -0 du -cb --apparent-size 2>/dev/null) | tail -n1 | cut -f1)
{
  echo "expanse GPU bundle, built $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo none), $(git -C "$REPO" status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed paths"
  echo "cuda: $(nvcc --version | grep -o 'release [0-9.]*'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
  echo "tracked files: $tracked bytes"
  echo
  (cd "$OUT_DIR" && for f in *; do [[ "$f" == MANIFEST.txt ]] || printf '%10d  %s  %s\n' "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-16)" "$f"; done)
} > "$OUT_DIR/MANIFEST.txt"
cat "$OUT_DIR/MANIFEST.txt" >&2

bundle=$(du -cb "$OUT_DIR"/* | tail -n1 | cut -f1)
total=$((bundle + tracked))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
if (( total <= LIMIT_MIB * 1048576 )); then
  log "bundle $(mib "$bundle") MiB + tracked files $(mib "$tracked") MiB = $(mib "$total") MiB <= $LIMIT_MIB MiB: OK ($((SECONDS - t_all)) s)"
else
  die "bundle $(mib "$bundle") MiB + tracked files $(mib "$tracked") MiB = $(mib "$total") MiB exceeds $LIMIT_MIB MiB"
fi
