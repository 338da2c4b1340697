"""The fused MoE kernel against a loop over experts in torch, on Qwen3-30B-A3B's expert shapes.

    PYTHONPATH=. python -m bench.moe_kernels --out bench/out/moe_kernels.json   # CUDA
    PYTHONPATH=. python -m bench.moe_kernels --cpu --out /tmp/moe_kernels.json  # dry run

One layer's experts (128 experts, hidden 2048, moe_intermediate 768, top-8,
bf16; 1.2 GB of weights), routed by a softmax over random router logits, at
1, 64 and 4096 tokens. The baseline is `kernels.reference.fused_moe`:
transformers' loop over the experts hit, in torch. Reported: median ms of
each (bench/kernels.py's timer), the speed-up, and for the kernel the expert
weight bytes it must read (experts hit x bytes per expert) per second,
against the device-to-device copy bandwidth: small batches are memory
bound; 4096 tokens also give TFLOP/s (6 * hidden * intermediate FLOPs a pair).
`--cpu` runs tiny shapes through Triton's interpreter; its timings mean nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Any

if "--cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: see kernels/__init__.py

import torch  # noqa: E402

from bench.kernels import device_ms, start, write_results  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.moe import fused_moe  # noqa: E402

GPU_SHAPE = {"hidden": 2048, "intermediate": 768, "num_experts": 128, "top_k": 8, "tokens": [1, 64, 4096],
             "copy_bytes": 1 << 30}
CPU_SHAPE = {"hidden": 64, "intermediate": 32, "num_experts": 8, "top_k": 2, "tokens": [1, 4, 16],
             "copy_bytes": 1 << 24}


def bench_moe(num_tokens: int, shape: dict, dtype: torch.dtype, device: str, cuda: bool) -> dict[str, Any]:
    hidden, intermediate, num_experts, top_k = (shape[k] for k in ("hidden", "intermediate", "num_experts", "top_k"))
    gen = torch.Generator(device=device).manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, generator=gen, device=device).to(dtype)
    w13 = (torch.randn(num_experts, 2 * intermediate, hidden, generator=gen, device=device) * 0.02).to(dtype)
    w2 = (torch.randn(num_experts, hidden, intermediate, generator=gen, device=device) * 0.02).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    args = (x, w13, w2, weights, ids)
    kernel_ms = device_ms(lambda: fused_moe(*args), cuda, graph=False)
    loop_ms = device_ms(lambda: reference.fused_moe(*args), cuda, graph=False)  # syncs: eager for both
    diff = (fused_moe(*args).float() - reference.fused_moe(*args).float()).abs().max().item()
    experts_hit = ids.unique().numel()
    expert_bytes = 3 * hidden * intermediate * w13.element_size()
    flops = 6 * hidden * intermediate * num_tokens * top_k
    return {"tokens": num_tokens, "experts_hit": experts_hit, "kernel_ms": kernel_ms, "loop_ms": loop_ms,
            "speedup": loop_ms / kernel_ms, "kernel_weight_GBps": experts_hit * expert_bytes / kernel_ms / 1e6,
            "kernel_TFLOPs": flops / kernel_ms / 1e9, "max_abs_diff_vs_loop": diff}


def main() -> None:
    args, cuda, device, dtype_names, shape, results = start(
        __doc__.split("\n\n")[0], ("hidden", "intermediate", "num_experts", "top_k"), GPU_SHAPE, CPU_SHAPE,
        "bfloat16")
    results["fused_moe"] = []
    for dtype, num_tokens in ((getattr(torch, name), n) for name in dtype_names for n in shape["tokens"]):
        r = bench_moe(num_tokens, shape, dtype, device, cuda)
        r["dtype"] = str(dtype).removeprefix("torch.")
        r["kernel_fraction_of_copy"] = r["kernel_weight_GBps"] / results["copy_GBps"]
        results["fused_moe"].append(r)
        print(f"fused_moe {r['dtype']} tokens={num_tokens:5d} experts_hit={r['experts_hit']:3d}: kernel {r['kernel_ms']:.4f} ms "
              f"{r['kernel_weight_GBps']:6.0f} GB/s ({100 * r['kernel_fraction_of_copy']:.0f}% of copy) "
              f"{r['kernel_TFLOPs']:6.1f} TFLOP/s | torch loop {r['loop_ms']:.4f} ms | "
              f"{r['speedup']:.1f}x | max|diff| {r['max_abs_diff_vs_loop']:.1e}")
        if cuda:
            torch.cuda.empty_cache()
    write_results(results, args.out)


if __name__ == "__main__":
    main()
