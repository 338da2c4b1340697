#!/usr/bin/env bash
# Build llama.cpp's llama-server as a benchmark peer and convert a Hugging Face
# model folder to GGUF for it. Everything lands under bench/.peers/ (gitignored).
#
# The source is the llama.cpp tree vendored in the llama-cpp-python sdist on
# PyPI (the only registry reachable here), so no git clone is needed.
# Build notes:
#  - GGML_NATIVE=OFF with the instruction sets read from /proc/cpuinfo and
#    passed explicitly, so the cmake line records which ISA paths were built.
#  - AMX options OFF: with NATIVE off ggml would emit AMX code unconditionally,
#    which faults on CPUs without AMX.
#  - LLAMA_CURL=OFF (older trees) and LLAMA_OPENSSL=OFF (newer): no downloads.
#  - Only the llama-server target is built: ~11 minutes on 2 idle cores
#    (20 at nice 19 on a busy box).
#
# Usage: bash bench/peers/llama_cpp.sh [MODEL_DIR [OUTTYPE]]
#   MODEL_DIR defaults to the prepared SmolLM2 folder, OUTTYPE to bf16.
#   Prints the server binary and the GGUF path. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS=bench/.peers
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PY=${PY:-.venv/bin/python}
SRC=$PEERS/llama-cpp-src
PREFIX=$PEERS/llama.cpp
JOBS=${JOBS:-$(nproc)}

if [[ ! -x $PREFIX/bin/llama-server ]]; then
    mkdir -p "$PEERS/downloads" "$SRC"
    tarball=$(ls "$PEERS"/downloads/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)
    if [[ -z $tarball ]]; then
        "$PY" -m pip download --quiet --no-deps --no-binary :all: \
            --dest "$PEERS/downloads" "llama-cpp-python==$VERSION"
        tarball=$PEERS/downloads/llama_cpp_python-$VERSION.tar.gz
    fi
    tar xzf "$tarball" -C "$SRC" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp"

    flags=$(grep -m1 '^flags' /proc/cpuinfo)
    has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
    cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) \
        -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX512=$(has avx512f) \
        -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni) \
        -DGGML_AVX512_BF16=$(has avx512_bf16) \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DBUILD_SHARED_LIBS=OFF -DCMAKE_INSTALL_PREFIX="$PWD/$PREFIX" -Wno-dev
    cmake --build "$SRC/build" --target llama-server -j "$JOBS"
    mkdir -p "$PREFIX/bin"
    cp "$SRC/build/bin/llama-server" "$PREFIX/bin/"
fi
echo "llama-server: $PREFIX/bin/llama-server"

MODEL=${1:-$("$PY" -c 'from inference.prepare import default_model_dir; print(default_model_dir())')}
OUTTYPE=${2:-bf16}
GGUF=$PEERS/gguf/$(basename "$MODEL")-$OUTTYPE.gguf
if [[ ! -f $GGUF ]]; then
    mkdir -p "$PEERS/gguf"
    # The llama converter imports sentencepiece before it checks for a
    # tokenizer.model, so even BPE models (SmolLM2, Llama 3) need it installed;
    # it goes into a side folder, not into the project venv.
    if [[ ! -d $PEERS/pylib/sentencepiece ]]; then
        "$PY" -m pip install --quiet --target "$PEERS/pylib" sentencepiece
    fi
    # The gguf-py next to the converter, not the PyPI one, so the two always
    # agree on the format version.
    PYTHONPATH="$SRC/gguf-py:$PEERS/pylib" "$PY" "$SRC/convert_hf_to_gguf.py" "$MODEL" \
        --outtype "$OUTTYPE" --outfile "$GGUF.partial"
    mv "$GGUF.partial" "$GGUF"
fi
echo "gguf: $GGUF"
