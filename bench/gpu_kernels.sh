#!/usr/bin/env bash
# Kernel check for a GPU machine: the kernel tests on CUDA (bf16 and fp16
# against the float32 torch reference), then bench/kernels.py. Needs torch and
# triton (no fastapi, no install of this project: the repo is used as copied,
# through PYTHONPATH). Budget: about 8 minutes; each step has its own timeout.
#
#   bash bench/gpu_kernels.sh          # on the GPU machine
#   bash bench/gpu_kernels.sh --cpu    # dry run here: CPU cases through the Triton interpreter
#
# Results go to $OUT if set, else bench/out/: kernel_tests.txt, kernels.json,
# kernels.md (the tables), kernels.txt, env.txt. The exit status is non-zero if any step failed; the
# later steps run anyway, so one run gives all the numbers it can.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=cuda
if [[ "${1:-}" == "--cpu" ]]; then
    mode=cpu
fi
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0

{
    date -u +%FT%TZ
    git rev-parse HEAD 2>/dev/null || true
    "$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())'
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; fi
} 2>&1 | tee "$out/env.txt"

if [[ $mode == cuda ]]; then
    # The CUDA cases only: the CPU ones need the interpreter, which a process
    # running compiled kernels cannot switch on (see tests/test_kernels.py).
    test_args=(-k cuda)
    bench_args=()
else
    test_args=(-k "cpu and (test_store_kv or 16-64-1 or 32-128-8 or dispatch or cached_launches)")
    bench_args=(--cpu)
fi

echo "== kernel tests ($mode)"
timeout 240 "$PY" -m pytest tests/test_kernels.py tests/test_kernel_launches.py -q -p no:cacheprovider "${test_args[@]}" 2>&1 \
    | tee "$out/kernel_tests.txt" || status=1

echo "== kernel benchmark ($mode)"
timeout 240 "$PY" -m bench.kernels "${bench_args[@]}" --out "$out/kernels.json" 2>&1 \
    | tee "$out/kernels.txt" || status=1

echo "== results in $out (status $status)"
exit $status
