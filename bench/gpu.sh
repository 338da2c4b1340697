#!/usr/bin/env bash
# The GPU benchmark in one command, for a machine with the repo copied as-is
# (not pip-installed; torch, triton and transformers present, no web stack):
#
#   bash bench/gpu.sh            # Qwen3-0.6B, Llama-3.2-1B, Llama-3.1-8B shapes, bf16
#   bash bench/gpu.sh --cpu      # dry run on tiny shapes, no GPU needed
#   bash bench/gpu.sh --models Qwen3-0.6B
#   bash bench/gpu.sh --graphs on,off --profile   # decode with and without CUDA graphs, profiled
#
# Random weights of the real shapes are written to a temp folder and loaded with
# LLM(model=folder); see bench/gpu_bench.py for the phases. Results (JSON and
# markdown) go to $OUT when set, else bench/out/gpu. It finishes within 8
# minutes: the Python part budgets itself (--budget-s, default 450 s) and a
# hard timeout backs it up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
LIMIT=${GPU_BENCH_TIMEOUT:-475}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
# Threads for the CPU dry run; a GPU run ignores it.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
"$PY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}")'
exec timeout --signal=INT --kill-after=15 "$LIMIT" "$PY" bench/gpu_bench.py "$@"
