#!/usr/bin/env bash
# A CPU Python with the reference implementations that the test fixtures and the benchmark scripts are
# made with (torch, transformers 5, safetensors, mergekit 0.1.5, gguf), pinned package by package in
# python-reference-requirements.txt beside this script. Made once per set of pins, in
# ${XDG_CACHE_HOME:-~/.cache}/expanse/python-<hash of the pins> (or $EXPANSE_PYTHON_VENV), from PyPI:
# about 2.5 GB and a few minutes the first time. Prints the path of its python on stdout.
#
#   usage: PY=$(bash scripts/python-reference-venv.sh)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REQ="$HERE/python-reference-requirements.txt"
PINS=$(sha256sum "$REQ" | cut -c1-12)
DIR=${EXPANSE_PYTHON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/expanse/python-$PINS}
if [[ ! -f "$DIR/.complete" ]]; then
  echo "[python-reference-venv] installing the pinned packages into $DIR (first time only)" >&2
  rm -rf "$DIR"
  python3 -m venv "$DIR"
  # Every dependency is pinned in the file, so pip resolves nothing: the environment is the same everywhere.
  "$DIR/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$REQ" >&2
  "$DIR/bin/python" -c "import torch, transformers, safetensors, mergekit" >&2
  touch "$DIR/.complete"
fi
echo "$DIR/bin/python"
