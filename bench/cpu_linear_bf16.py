"""One bf16 linear call: the AVX512-BF16 packed kernel against torch's bf16
F.linear, and oneDNN's packed primitive (the path of batches of
`cpu_linear.ONEDNN_MIN_ROWS` rows or more on AMX CPUs: run this there to
check that split).

On SmolLM2-135M's shapes (fused as the model runs them, plus a lone k/v
projection) at several row counts. The two are timed alternately, `repeats`
rounds of `calls` calls each, so a neighbour's load hits both alike; each
round's median per call gives a ratio, and the table shows medians over rounds.
Picked `cpu_linear.MAX_ROWS` for bf16.

With `--batch`, whole bf16 decode steps of the default model (SmolLM2) in one
engine, alternating step by step between the packed weights and F.linear (the
packed copies set aside), so both see the same load and nearly the same
contexts; prints the medians and the median ratio of adjacent pairs.

    python -m bench.cpu_linear_bf16 --rows 1,4,16,48,128,512
    python -m bench.cpu_linear_bf16 --batch 1,16,48 --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

# (name, in_features, out_features) of SmolLM2-135M's linears.
SHAPES = [("qkv", 576, 960), ("o", 576, 576), ("k/v", 576, 192), ("gate_up", 576, 3072), ("down", 1536, 576),
          ("lm_head", 576, 49152)]


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def step_pairs(batch: int, num_pairs: int) -> tuple[float, float, float]:
    """ms per decode step, packed then F.linear (medians), and the median ratio of adjacent steps."""
    from bench.common import default_model
    from bench.cpu_step import decoding_engine
    from inference.parallel.layers import PackableLinear

    engine = decoding_engine(default_model(), "bfloat16", batch, 2 * num_pairs + 4)
    model = engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, PackableLinear)]
    packed = [m.packed_weight for m in linears], model.lm_head_packed
    if packed[1] is None:
        raise SystemExit("the model's bf16 weights were not packed")

    def timed_step(use_packed: bool) -> float:
        for m, p in zip(linears, packed[0]):
            m.packed_weight = p if use_packed else None  # None: cpu_linear.linear calls F.linear
        model.lm_head_packed = packed[1] if use_packed else None
        start = time.perf_counter()
        engine.step()
        return (time.perf_counter() - start) * 1e3

    timed_step(True), timed_step(False)  # warm both
    pairs = [(timed_step(True), timed_step(False)) for _ in range(num_pairs)]
    engine.shutdown()
    return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
            statistics.median(p[0] / p[1] for p in pairs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16,48,128,512")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", default=None, help="comma-separated decode batch sizes: time whole steps")
    parser.add_argument("--steps", type=int, default=40, help="with --batch: step pairs per batch size")
    args = parser.parse_args(argv)

    from kernels import cpu_linear

    if not cpu_linear.has_bf16_kernel():
        raise SystemExit("the C++ ops have no AVX512-BF16 kernel on this CPU")
    if args.batch:
        print("| batch | packed ms / step | F.linear ms / step | packed / F.linear |\n|---:|---:|---:|---:|")
        for batch in (int(b) for b in args.batch.split(",")):
            ours, theirs, ratio = step_pairs(batch, args.steps)
            print(f"| {batch} | {ours:.1f} | {theirs:.1f} | {ratio:.2f} |", flush=True)
        return 0
    torch.manual_seed(0)
    print("| shape | rows | packed us | F.linear us | oneDNN packed us | packed / F.linear | oneDNN packed / "
          "packed |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, in_features, out_features in SHAPES:
        weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) / in_features**0.5
        packed = cpu_linear.pack_weight(weight)
        onednn = torch.ops.mkldnn._reorder_linear_weight(weight, cpu_linear.ONEDNN_MIN_ROWS)
        for num_rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(num_rows, in_features, dtype=torch.bfloat16)
            out = torch.empty(num_rows, out_features, dtype=torch.bfloat16)
            paths = [
                lambda: torch.ops.pagedinfer_cpu.linear_bf16(x, packed, None, out),
                lambda: F.linear(x, weight),
                lambda: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], ""),
            ]
            calls = max(5, args.calls * 16 // max(num_rows, 16)) if out_features > 10000 else args.calls
            for path in paths:
                path()  # warm: oneDNN's first call builds its primitive
            rounds = [[per_call_us(path, calls) for path in paths] for _ in range(args.repeats)]
            ours, theirs, packed_onednn = (statistics.median(r[i] for r in rounds) for i in range(3))
            ratio = statistics.median(r[0] / r[1] for r in rounds)
            onednn_ratio = statistics.median(r[2] / r[0] for r in rounds)
            print(f"| {name} {in_features}->{out_features} | {num_rows} | {ours:.1f} | {theirs:.1f} | "
                  f"{packed_onednn:.1f} | {ratio:.2f} | {onednn_ratio:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
