#!/usr/bin/env bash
# What the HTTP front end costs on a GPU, in one command: bench/overhead.py on
# the Qwen3-0.6B shape (random weights, bf16) at c=1, 64 and 256.
#
#   bash bench/gpu_overhead.sh                  # Qwen3-0.6B shape on cuda
#   bash bench/gpu_overhead.sh --repeats 3
#
# Unlike bench/gpu.sh it needs the web stack (fastapi, uvicorn, httptools,
# uvloop, pyzmq, msgspec, httpx): run it from a venv with the project
# installed. The report goes to $OUT/overhead.json when OUT is set, else
# bench/out/gpu/overhead.json. Targets (issue 19): c=1 ITL p50 within 1.1x of
# the offline step, c=256 at least 0.9x of offline throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT_DIR=${OUT:-bench/out/gpu}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
exec timeout --signal=INT --kill-after=15 "${GPU_BENCH_TIMEOUT:-540}" \
    "$PY" -m bench.overhead --model Qwen3-0.6B --device cuda --out "$OUT_DIR/overhead.json" "$@"
