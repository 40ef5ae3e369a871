#!/usr/bin/env bash
# Build everything a GPU machine needs to check expanse's CUDA build, into one
# folder that fits the 64 MiB a device run may carry:
#
#   OUT_DIR/gpu-check.sh        the script to run there (scripts/gpu-check.sh)
#   OUT_DIR/bin.tar.xz          bin/expanse + testbin/<test binaries> (cuda build, stripped;
#                               one solid xz so the copies of candle's kernels are stored once)
#   OUT_DIR/libcurand.so.10.xz  from the toolchain cache (GPU machines lack nvidia-curand)
#   OUT_DIR/fixtures.tar.xz     tests/fixtures/{tiny-mistral-f32,tiny-mistral-bf16,
#                               tiny-mergekit-every4-bf16,tiny-finetuned-bf16,openchat-tokenizer}
#                               (symlinks resolved) + the small reference files beside them
#   OUT_DIR/MANIFEST.txt        what is inside, sizes, sha256, git revision
#
#   usage: scripts/gpu-bundle.sh [OUT_DIR]        (default: <repo>/bundle, git-ignored)
#   env:   GPU_BUNDLE_SKIP_BUILD=1  reuse the existing target-cuda build (no ci-cuda.sh)
#          GPU_BUNDLE_NO_CURAND=1   leave libcurand out (if the GPU machine has it)
#          GPU_BUNDLE_NO_FIXTURES=1 leave fixtures out: gpu-check.sh then copies ../tests/fixtures
#                                   (the bundle must sit in a repo checkout's root, e.g. bundle/)
#          GPU_BUNDLE_LIMIT_MIB     size limit, default 64
#          CARGO_TARGET_DIR         default <repo>/target-cuda
#
# Then, on the GPU machine (from the repo root, with OUT_DIR carried along):
#   bash bundle/gpu-check.sh "$OUT"
# Exits non-zero if a step fails or the bundle exceeds the limit.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$REPO"
log() { echo "[gpu-bundle] $*" >&2; }
die() { echo "[gpu-bundle] FAILED: $*" >&2; exit 1; }

OUT_DIR="${1:-$REPO/bundle}"
LIMIT_MIB="${GPU_BUNDLE_LIMIT_MIB:-64}"
FIXTURE_DIRS=(tiny-mistral-f32 tiny-mistral-bf16 tiny-mergekit-every4-bf16 tiny-finetuned-bf16 openchat-tokenizer)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target-cuda}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
for tool in xz tar python3 sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' is required"
done
t_all=$SECONDS

# ---- 1. build (the same build as CI's cuda check) -----------------------------
if [[ "${GPU_BUNDLE_SKIP_BUILD:-0}" != 1 ]]; then
  "$REPO/scripts/ci-cuda.sh" || die "scripts/ci-cuda.sh failed"
fi
eval "$("$REPO/scripts/cuda-toolchain.sh" ${CUDA_TOOLCHAIN_DIR:+"$CUDA_TOOLCHAIN_DIR"})"

BIN="$CARGO_TARGET_DIR/release/expanse"
[[ -x "$BIN" ]] || die "$BIN not found (run scripts/ci-cuda.sh)"

# Test executables of the cuda build, as cargo reports them.
log "listing test binaries (cargo test --release --features cuda --no-run --message-format=json)"
mapfile -t TESTS < <(nice -n 19 cargo test --release --features cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        t = m["target"]
        print("%s-%s\t%s" % (t["kind"][0], t["name"], m["executable"]))
')
(( ${#TESTS[@]} > 0 )) || die "no test binaries found (does 'cargo test --release --features cuda --no-run' work?)"

# ---- 2. stage + compress ---------------------------------------------------------
rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd -P)"
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/expanse-bundle.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin/bin" "$STAGE/bin/testbin" "$STAGE/fixtures/tests/fixtures"

cp "$BIN" "$STAGE/bin/bin/expanse"
for entry in "${TESTS[@]}"; do
  name="${entry%%$'\t'*}"; exe="${entry#*$'\t'}"
  cp "$exe" "$STAGE/bin/testbin/$name"
  log "test binary: $name ($(du -h "$exe" | cut -f1))"
done
if command -v strip >/dev/null; then
  strip --strip-unneeded "$STAGE"/bin/bin/* "$STAGE"/bin/testbin/* 2>/dev/null || log "warning: strip failed; shipping unstripped binaries"
fi
# Where the build machine's CARGO_MANIFEST_DIR was: tests that embed it at
# compile time look for tests/fixtures there; gpu-check.sh can link it.
echo "$REPO" > "$STAGE/bin/manifest-dir.txt"

t0=$SECONDS
# Solid archive with a dictionary larger than the input: the binaries share
# most of their bytes (candle's PTX), so xz stores them about once.
XZ_OPTS="-T1 --lzma2=preset=9,dict=256MiB"
(cd "$STAGE/bin" && tar -cf - bin testbin manifest-dir.txt) | nice -n 19 xz $XZ_OPTS > "$OUT_DIR/bin.tar.xz"
log "bin.tar.xz: $(du -h "$OUT_DIR/bin.tar.xz" | cut -f1) in $((SECONDS - t0)) s"

# Fixtures: resolve symlinks (tokenizer.json -> ../openchat-tokenizer), solid
# archive so the repeated tokenizer and shared weights compress away.
missing=()
if [[ "${GPU_BUNDLE_NO_FIXTURES:-0}" == 1 ]]; then
  FIXTURE_DIRS=()
  log "GPU_BUNDLE_NO_FIXTURES=1: no fixtures.tar.xz; gpu-check.sh will use ../tests/fixtures beside the bundle"
fi
for d in "${FIXTURE_DIRS[@]}"; do
  if [[ -d "tests/fixtures/$d" ]]; then
    cp -rL "tests/fixtures/$d" "$STAGE/fixtures/tests/fixtures/"
  else
    missing+=("$d")
  fi
done
shopt -s nullglob
for f in tests/fixtures/ref-*.safetensors tests/fixtures/ref-*.json tests/fixtures/*.yml tests/fixtures/README.md; do
  cp -L "$f" "$STAGE/fixtures/tests/fixtures/"
done
shopt -u nullglob
(( ${#missing[@]} == 0 )) || log "WARNING: fixture dirs missing (gpu-check skips what needs them): ${missing[*]}"
if [[ "${GPU_BUNDLE_NO_FIXTURES:-0}" != 1 ]]; then
  t0=$SECONDS
  (cd "$STAGE/fixtures" && tar -cf - tests) | nice -n 19 xz $XZ_OPTS > "$OUT_DIR/fixtures.tar.xz"
  log "fixtures.tar.xz: $(du -h "$OUT_DIR/fixtures.tar.xz" | cut -f1) in $((SECONDS - t0)) s"
fi

if [[ "${GPU_BUNDLE_NO_CURAND:-0}" != 1 ]]; then
  CURAND="$CUDA_ROOT/lib/libcurand.so.10"
  [[ -f "$CURAND" ]] || die "$CURAND not found (scripts/cuda-toolchain.sh)"
  CURAND_XZ_CACHE="$CUDA_ROOT/lib/.libcurand.so.10.xz"
  if [[ ! -f "$CURAND_XZ_CACHE" || "$CURAND_XZ_CACHE" -ot "$CURAND" ]]; then
    t0=$SECONDS
    nice -n 19 xz -T1 -9 -c "$CURAND" > "$CURAND_XZ_CACHE.tmp" && mv "$CURAND_XZ_CACHE.tmp" "$CURAND_XZ_CACHE"
    log "compressed libcurand.so.10 in $((SECONDS - t0)) s (cached in the toolchain folder)"
  fi
  cp "$CURAND_XZ_CACHE" "$OUT_DIR/libcurand.so.10.xz"
fi

cp "$REPO/scripts/gpu-check.sh" "$OUT_DIR/gpu-check.sh"
chmod +x "$OUT_DIR/gpu-check.sh"

# ---- 3. manifest + size check -----------------------------------------------------
{
  echo "expanse GPU bundle, built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo none) $(git -C "$REPO" status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed paths"
  echo "cuda: $(nvcc --version | grep -o 'release [0-9.]*'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
  echo "binaries: expanse $(for e in "${TESTS[@]}"; do printf '%s ' "${e%%$'\t'*}"; done)"
  echo "fixtures: ${FIXTURE_DIRS[*]}${missing:+ (missing: ${missing[*]})}"
  echo
  (cd "$OUT_DIR" && for f in *; do [[ "$f" == MANIFEST.txt ]] || printf '%10d  %s  %s\n' "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-16)" "$f"; done)
} > "$OUT_DIR/MANIFEST.txt"
cat "$OUT_DIR/MANIFEST.txt" >&2

total=$(du -cb "$OUT_DIR"/* | tail -n1 | cut -f1)
total_mib=$(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }')
limit=$((LIMIT_MIB * 1048576))
if (( total <= limit )); then
  log "bundle $OUT_DIR: $total_mib MiB <= $LIMIT_MIB MiB: OK (took $((SECONDS - t_all)) s)"
else
  log "bundle $OUT_DIR: $total_mib MiB EXCEEDS the $LIMIT_MIB MiB limit"
  exit 1
fi
