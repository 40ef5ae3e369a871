#!/usr/bin/env bash
# Type-check the `metal` feature (candle's Metal backend + src/kernels/metal.rs)
# by cross-checking for aarch64-apple-darwin. Linking needs Apple's SDK, so
# this is `cargo check` only; on Linux `--features metal` cannot be checked
# for the host (objc2 only builds for Apple targets).
#
#   usage: scripts/ci-metal.sh
#   env:   CARGO_TARGET_DIR  default <repo>/target-metal
#          CARGO_BUILD_JOBS  default 1
#          CI_METAL_NICE     nice level, default 19
#
# If the aarch64-apple-darwin standard library cannot be installed (no
# rustup, offline, ...), prints "Metal check SKIPPED: <reason>" and exits 0.
# A real compile error exits non-zero.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$REPO"
TARGET=aarch64-apple-darwin
log() { echo "[ci-metal] $*" >&2; }
skip() { echo "Metal check SKIPPED: $*"; exit 0; }

t0=$SECONDS
if ! rustc --print target-list 2>/dev/null | grep -qx "$TARGET"; then
  skip "rustc does not know the target $TARGET"
fi
sysroot="$(rustc --print sysroot)"
if [[ ! -d "$sysroot/lib/rustlib/$TARGET/lib" ]]; then
  command -v rustup >/dev/null || skip "the $TARGET standard library is not installed and rustup is not available"
  log "installing the $TARGET standard library (rustup target add $TARGET)"
  if ! out="$(rustup target add "$TARGET" 2>&1)"; then
    reason="$(printf '%s\n' "$out" | grep -iE 'error|could not|failed' | head -n1)"
    skip "rustup target add $TARGET failed: ${reason:-$(printf '%s' "$out" | tail -n1)}"
  fi
  [[ -d "$sysroot/lib/rustlib/$TARGET/lib" ]] || skip "rustup target add $TARGET did not install the standard library"
fi
log "target ready in $((SECONDS - t0)) s"

# Dependencies with C code (ring, via hf-hub's rustls) compile it in their
# build scripts even for `cargo check`, and the host gcc cannot target Apple.
# `cargo check` never links, so a stand-in compiler that emits an empty object
# is enough. (Never use this for a real build.)
if [[ -z "${CC_aarch64_apple_darwin:-}" ]] && ! command -v "${TARGET}-clang" >/dev/null; then
  FAKE_CC_DIR="$(mktemp -d "${TMPDIR:-/tmp}/ci-metal-cc.XXXXXX")"
  trap 'rm -rf "$FAKE_CC_DIR"' EXIT
  cat > "$FAKE_CC_DIR/cc-check-only" <<'EOF_CC'
#!/usr/bin/env bash
# check-only stand-in C compiler for aarch64-apple-darwin: writes an empty object
out=""; prev=""
for a in "$@"; do
  # cc-rs probes: `-E detect_compiler_family.c` (answer "clang") and `-?` (not cl.exe)
  [[ "$a" == -E ]] && { echo '"clang"'; echo '"clang"' >&2; exit 0; }
  [[ "$a" == "-?" ]] && exit 1
  [[ "$prev" == -o ]] && out="$a"
  case "$a" in -o?*) out="${a#-o}" ;; esac
  prev="$a"
done
[[ -n "$out" ]] && exec gcc -c -x c /dev/null -o "$out"
exit 0
EOF_CC
  chmod +x "$FAKE_CC_DIR/cc-check-only"
  export CC_aarch64_apple_darwin="$FAKE_CC_DIR/cc-check-only"
  export CXX_aarch64_apple_darwin="$FAKE_CC_DIR/cc-check-only"
  export AR_aarch64_apple_darwin="${AR_aarch64_apple_darwin:-ar}"
  log "no C compiler for $TARGET: dependencies' C code gets empty stand-in objects (fine for cargo check)"
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target-metal}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
t1=$SECONDS
log "cargo check --features metal --target $TARGET --all-targets (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
# --all-targets also type-checks the unit tests (src/kernels/tests.rs).
if nice -n "${CI_METAL_NICE:-19}" cargo check --features metal --target "$TARGET" --all-targets; then
  log "Metal check PASSED in $((SECONDS - t1)) s (total $((SECONDS - t0)) s)"
else
  rc=$?
  log "Metal check FAILED (rc $rc) after $((SECONDS - t1)) s"
  exit "$rc"
fi
