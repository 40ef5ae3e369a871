#!/usr/bin/env bash
# Peak host memory of the base, expanded and --skip-transparent models, one process each (so each
# VmHWM is that variant's own), on random weights in a mid-size Mistral shape (bf16, 32 → 40 layers).
#   usage: benches/memory/skip_memory.sh [path/to/expanse]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:-target/release/expanse}"
cfg="$here/mistral-2b-mid.json"
run() { # label, then expanse bench flags
  local label="$1"; shift
  "$bin" bench --synthetic "$cfg" --dtype bf16 -p 0 -n 2 -r 1 --warmup 0 --json "$@" 2>/dev/null |
    python3 -c "import json,sys; r=json.load(sys.stdin); m=r['memory'][0]
print(f\"| $label | {m['weight_bytes']/1e9:.3f} GB | {m['host_peak_bytes']/1e9:.3f} GB |\")"
}
echo "| model | weights held | peak RSS (VmHWM) |"
echo "|---|---:|---:|"
run "base (--expand none)" --expand none --variants base
run "expanded (every:4)" --expand every:4 --variants expanded
run "expanded, --skip-transparent" --expand every:4 --skip-transparent --variants skip
