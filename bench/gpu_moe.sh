#!/usr/bin/env bash
# The mixture-of-experts GPU benchmark, for a machine with the repo copied as-is:
#
#   bash bench/gpu_moe.sh                  # on the GPU machine, within --budget-s (default 240 s)
#   bash bench/gpu_moe.sh --cpu            # dry run: tiny MoE shapes, the kernel in Triton's interpreter
#
#   1. bench/moe_kernels.py: the fused MoE kernel against a loop over experts in
#      torch, one Qwen3-30B-A3B layer at 1, 64 and 4096 tokens.
#   2. bench/gpu.sh on the Qwen3-30B-A3B shape (bf16, ~61 GB) with dummy weights:
#      the engine builds them on the device (load_format "dummy"), since writing
#      them would not fit a 64 GiB disk. Decode step time at batch 1/64/256
#      against the roofline (weights of the experts the batch hits + KV bytes per
#      step / measured bandwidth), then the nano-vllm workload's output tok/s.
# Results under $OUT (default bench/out/gpu_moe): moe_kernels.{json,txt}, gpu_bench/.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=cuda budget=240
while [[ $# -gt 0 ]]; do
    case $1 in
        --cpu) mode=cpu ;;
        --budget-s) budget=$2; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
out=${OUT:-bench/out/gpu_moe}
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
status=0
if [[ $mode == cpu ]]; then
    kernel_args=(--cpu) bench_args=(--cpu --models tiny-qwen3-moe)
else
    kernel_args=() bench_args=(--models Qwen3-30B-A3B)
fi

timeout --signal=INT --kill-after=15 75 "$PY" -m bench.moe_kernels "${kernel_args[@]}" --out "$out/moe_kernels.json" \
    2>&1 | tee "$out/moe_kernels.txt" || status=1
left=$((budget - ($(date +%s) - start)))
if [[ $left -lt 60 ]]; then
    echo "gpu_moe: only ${left}s left, engine benchmark skipped"
    exit 1
fi
env GPU_BENCH_TIMEOUT=$((left - 10)) OUT="$out/gpu_bench" PYTHON="$PY" bash bench/gpu.sh "${bench_args[@]}" \
    --dummy-weights --no-transformers --graphs on --budget-s $((left - 40)) || status=1
exit $status
