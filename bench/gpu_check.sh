#!/usr/bin/env bash
# The whole GPU check in one command, within 9 minutes on one GPU, for a
# machine with the repo copied as-is (torch, triton, transformers, numpy,
# pytest; no web stack, no network, nothing installed: PYTHONPATH points at
# the repo). What the server needs beyond that travels as wheels in .whl/,
# laid out here beforehand by `python -m bench.gpu_wheels` (Python 3.12 for
# the GPU image, and this interpreter's for the dry run):
#
#   python -m bench.gpu_wheels                 # here, once: .whl/ (~18 MiB, git-ignored)
#   bash bench/gpu_check.sh --serve            # on the GPU machine, carrying .whl
#   bash bench/gpu_check.sh --cpu --serve      # dry run here: tiny shapes, the CUDA tests skip
#   bash bench/gpu_check.sh --moe              # (with or without --cpu) adds step 4, the MoE benchmark
#
# Step 0 installs the wheels into $OUT/site (pip --no-index --no-deps
# --target, each interpreter picks its own), puts it first on PYTHONPATH and
# checks the layout (`bench.gpu_wheels --check`): every requirement carried
# or on the image, every carried package loaded from there. The dry run
# installs and imports from exactly that layout.
#
# Steps, in order, each under its own timeout; a failed step does not stop
# the later ones, and the exit status is non-zero if any failed:
#   1. CUDA tests: the attention kernels (tests/test_kernels.py,
#      tests/test_decode_graph_safe.py and tests/test_kernel_launches.py,
#      -k cuda), the fused layer kernels
#      (tests/test_layer_kernels.py -k cuda), the grammar bitmask in the
#      sampler (tests/test_structured_output.py -k cuda; skipped without
#      xgrammar) and the engine with CUDA graphs
#      (tests/test_cuda_graphs.py but its SmolLM2 case, which needs the
#      prepared model, and tests/test_verify_graphs.py: speculative decoding's
#      verify graphs), the fused MoE kernel (tests/test_moe_kernel.py -k
#      cuda), the LoRA kernels and LoRA under the decode graphs
#      (tests/test_lora_kernels.py, tests/test_lora_cuda_graphs.py). A test file missing from this checkout is
#      reported as MISSING (the exit status stays 0 for it).
#   2. bench/kernels.py: the kernel microbenchmarks (about 3 minutes: decode and
#      prefill against SDPA under CUDA-graph replay, eager host time per call,
#      fp16 and bf16, GQA 4/GQA 8/MHA, the autotuned prefill configs), tables
#      in kernels.md.
#   3. bench/gpu.sh on the Qwen3-0.6B and Llama-3.1-8B shapes: decode step time
#      at batch 1/64/256 with CUDA graphs on and off, the nano-vllm workload
#      (graphs on) and a torch.profiler summary at batch 64 (GPU busy
#      fraction, launches and host time per decode step), and each engine's
#      start-up by phase (weights, KV cache, autotune, graph capture with the
#      graphs' count and MiB; bound them with --max-cudagraph-capture-size).
#      It gets whatever
#      time the earlier steps left (with --moe: Qwen3-0.6B only, and 240 s
#      fewer, GPU_CHECK_MOE_S).
#   4. with --moe, bench/gpu_moe.sh: the fused MoE kernel against a torch loop
#      over experts at 1/64/4096 tokens, then the Qwen3-30B-A3B shape (bf16,
#      weights built on the device) at decode batch 1/64/256 against its
#      roofline and on the nano-vllm workload.
#   5. with --serve (GPU_CHECK_SERVE_S, default 200 s, taken from step 3):
#      bench/overhead.py on the Qwen3-0.6B shape (tiny-qwen3 with --cpu):
#      offline steps, then `pagedinfer serve` started, streamed by the serving
#      benchmark's client at c=1/64/256, and stopped; then the start-up path
#      (KV profile of 8192 tokens, every prefill bucket tuned, one request)
#      of a model with 2048 positions, under compute-sanitizer's memcheck
#      where the image has it and it runs.
# Results: $OUT/gpu_check.tar.gz (every log, JSON and markdown, JUnit XML of
# the tests) and $OUT/gpu_check_summary.txt next to it (steps, their status,
# the benchmark tables). $OUT defaults to bench/out/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=cuda moe=0 serve=0
for arg in "$@"; do
    case $arg in
        --cpu) mode=cpu ;;
        --moe) moe=1 ;;
        --serve) serve=1 ;;
        *) echo "unknown argument $arg" >&2; exit 2 ;;
    esac
done
moe_s=$((moe ? ${GPU_CHECK_MOE_S:-240} : 0))
serve_s=$((serve ? ${GPU_CHECK_SERVE_S:-200} : 0))
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
out=${OUT:-bench/out/gpu_check}
stage="$out/gpu_check"  # archived, then removed: one archive is the result
rm -rf "$stage"
mkdir -p "$stage"
summary="$out/gpu_check_summary.txt"
site="$(cd "$out" && pwd)/site"  # absolute: steps run with other working directories
export PYTHONPATH="$site:.${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
start=$(date +%s)
deadline=$((start + ${GPU_CHECK_BUDGET_S:-530}))  # 9 minutes less the archiving
status=0
steps=()

# run_step NAME TIMEOUT_S COMMAND...: log to $stage/NAME.txt, record status and time.
run_step() {
    local name=$1 limit=$2 begin rc note state
    shift 2
    echo "== $name (timeout ${limit}s): $*"
    begin=$(date +%s)
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$stage/$name.txt"
    rc=${PIPESTATUS[0]}
    # pytest's closing counts line; else, for a failure, the last line of the log
    note=$(grep -E '^=* ?[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' "$stage/$name.txt" | tail -n 1)
    if [[ -z $note && $rc -ne 0 ]]; then note=$(tail -n 1 "$stage/$name.txt"); fi
    if [[ $rc -eq 0 ]]; then
        state=ok
    elif [[ $rc -eq 5 && $mode == cpu ]]; then
        state=ok  # pytest selected nothing: the CUDA cases do not exist without a GPU
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        state=TIMEOUT; status=1
    else
        state="FAILED(rc=$rc)"; status=1
    fi
    steps+=("$(printf '%-20s %-14s %5ss  %s' "$name" "$state" "$(($(date +%s) - begin))" "${note:0:100}")")
}

# test_step NAME TIMEOUT_S FILE PYTEST_ARGS...: a pytest step that reports a missing FILE instead of failing.
test_step() {
    local name=$1 limit=$2 file=$3
    shift 3
    if [[ ! -f $file ]]; then
        echo "== $name: $file is MISSING from this checkout"
        steps+=("$(printf '%-20s %-14s %5ss  %s' "$name" MISSING 0 "$file not in this checkout")")
        return
    fi
    run_step "$name" "$limit" "$PY" -m pytest "$file" "$@" -q -p no:cacheprovider --junitxml="$stage/$name.xml"
}

{
    date -u +%FT%TZ
    git rev-parse HEAD 2>/dev/null || echo "no git"
    git status --short 2>/dev/null | head -n 40
    "$PY" -c 'import sys, torch, triton, transformers as tf; print(sys.version.split()[0], "torch", torch.__version__,
        "triton", triton.__version__, "transformers", tf.__version__,
        "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())'
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    fi
} 2>&1 | tee "$stage/env.txt"

echo "== 0. wheels: .whl -> $site"
rm -rf "$site"
# Before anything imports transformers under this layout (see bench/gpu_wheels.py).
"$PY" -m bench.gpu_wheels --shadow-hub-kernels "$site"
if compgen -G ".whl/*.whl" >/dev/null; then
    run_step wheels 120 bash -c "'$PY' -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --find-links .whl --target '$site' \$('$PY' -c 'from bench.gpu_wheels import CARRIED; print(*CARRIED)') \
        && '$PY' -m bench.gpu_wheels --check '$site'"
else
    steps+=("$(printf '%-20s %-14s %5ss  %s' wheels MISSING 0 "no .whl/: run python -m bench.gpu_wheels first")")
    status=1
fi

if [[ $mode == cuda ]]; then
    # Not the sm_90 compile check: on a GPU the CUDA cases compile for real.
    kernel_select=(-k "cuda and not compile_for_cuda")
    bench_args=(--models "$( ((moe)) && echo Qwen3-0.6B || echo Qwen3-0.6B,Llama-3.1-8B)")
    kernels_args=()
else
    # A few interpreter cases, to check the plumbing; the rest of the CPU cases run in tests/.
    kernel_select=(-k "cpu-fp32 and (store_kv or 16-64-1 or dispatch or 2048-64-1-64-16 or allocates or 40960 or cached_launches)")
    bench_args=(--cpu --models tiny-qwen3)
    kernels_args=(--cpu)
fi

echo "== 1. CUDA tests ($mode)"
test_step tests_kernels 200 tests/test_kernels.py tests/test_decode_graph_safe.py tests/test_kernel_launches.py "${kernel_select[@]}"
test_step tests_layer_kernels 60 tests/test_layer_kernels.py -k cuda
test_step tests_structured 60 tests/test_structured_output.py -k cuda
# All of both (-k cuda would match the file names) but the SmolLM2 case: CPU-only, and that model is not
# prepared on a bare GPU machine.
test_step tests_cuda_graphs 150 tests/test_cuda_graphs.py tests/test_verify_graphs.py -k "not smollm2"
test_step tests_moe_kernel 60 tests/test_moe_kernel.py -k cuda
# The LoRA shrink/expand kernels, and the decode graphs captured with them (-k cuda takes the
# whole graphs file by its name: its CPU cases are quick).
test_step tests_lora 90 tests/test_lora_kernels.py tests/test_lora_cuda_graphs.py -k cuda

echo "== 2. kernel benchmark ($mode)"
run_step bench_kernels 240 "$PY" -m bench.kernels "${kernels_args[@]}" --out "$stage/kernels.json"

echo "== 3. engine benchmark ($mode)"
left=$((deadline - moe_s - serve_s - $(date +%s)))
if [[ $left -lt 90 ]]; then
    steps+=("$(printf '%-20s %-14s %5ss  %s' gpu_bench SKIPPED 0 "only ${left}s left of the budget")")
    status=1
else
    # Nested limits: this step's timeout > gpu.sh's own > the Python budget, which stops starting phases
    # early enough to write its tables.
    run_step gpu_bench $((left - 5)) env GPU_BENCH_TIMEOUT=$((left - 20)) OUT="$stage/gpu_bench" PYTHON="$PY" \
        bash bench/gpu.sh "${bench_args[@]}" --budget-s $((left - 50)) --graphs on,off --profile --no-transformers
fi

if ((moe)); then
    echo "== 4. MoE benchmark ($mode)"
    left=$((deadline - $(date +%s)))
    moe_args=(--budget-s $((left - 15)))
    [[ $mode == cpu ]] && moe_args+=(--cpu)
    run_step gpu_moe "$left" env OUT="$stage/gpu_moe" PYTHON="$PY" bash bench/gpu_moe.sh "${moe_args[@]}"
fi

if ((serve)); then
    echo "== 5. serving and start-up ($mode)"
    left=$((deadline - $(date +%s)))
    if [[ $mode == cuda ]]; then
        overhead_args=(--model Qwen3-0.6B --device cuda)
    else
        overhead_args=(--model tiny-qwen3 --device cpu --levels 1,4 --output-len 16)
    fi
    run_step serve_overhead $((left - 60)) "$PY" -m bench.overhead "${overhead_args[@]}" \
        --out "$stage/overhead.json" --log "$stage/serve.log"
    sanitizer=()
    if [[ $mode == cuda ]] && command -v compute-sanitizer >/dev/null; then
        sanitizer=(compute-sanitizer --tool memcheck --error-exitcode 3)
    fi
    left=$((deadline - $(date +%s)))
    run_step startup_2k_positions $((left > 20 ? left : 20)) "${sanitizer[@]}" "$PY" -m bench.gpu_startup \
        --device "$mode"
fi

{
    echo "gpu_check ($mode) $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')," \
        "$(($(date +%s) - start)) s, $([[ $status -eq 0 ]] && echo 'all steps ok' || echo 'SOME STEPS FAILED')"
    echo
    printf '%s\n' "${steps[@]}"
    if [[ -f $stage/kernels.md ]]; then
        echo
        cat "$stage/kernels.md"
    fi
    if [[ -f $stage/gpu_bench/gpu_bench.md ]]; then
        echo
        cat "$stage/gpu_bench/gpu_bench.md"
    fi
    if [[ -f $stage/gpu_moe/moe_kernels.txt ]]; then
        echo
        grep -E '^(device-to-device|fused_moe)' "$stage/gpu_moe/moe_kernels.txt"
    fi
    if [[ -f $stage/gpu_moe/gpu_bench/gpu_bench.md ]]; then
        echo
        cat "$stage/gpu_moe/gpu_bench/gpu_bench.md"
    fi
    if [[ -f $stage/serve_overhead.txt ]]; then
        echo
        grep '^|' "$stage/serve_overhead.txt"
    fi
} > "$summary"
cp "$summary" "$stage/"
tar -czf "$out/gpu_check.tar.gz" -C "$out" gpu_check && rm -rf "$stage"
echo
cat "$summary"
echo "== results: $out/gpu_check.tar.gz, $summary (status $status)"
exit $status
