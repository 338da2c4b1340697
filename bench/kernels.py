"""Micro-benchmarks of the Triton kernels against torch on the same shapes.

    PYTHONPATH=. python -m bench.kernels --out bench/out/kernels.json   # CUDA
    PYTHONPATH=. python -m bench.kernels --cpu --out /tmp/kernels.json  # dry run

Each kernel is timed with `triton.testing.do_bench` (median) next to a torch
baseline: `F.scaled_dot_product_attention` on K/V already gathered into
contiguous tensors (the gather is not timed; it is the best case for torch),
and the reference index_put for the KV store.

- decode is memory bound: reported as achieved GB/s (K and V bytes of the
  context, read once) and as a fraction of the device-to-device copy
  bandwidth measured here with a torch copy of a large buffer. Each shape is
  timed again as a captured CUDA graph runs it (`graph_bound_ms`): grid and
  splits sized for `max_seq_len` = 32768 (the engine passes max_model_len)
  and the partials in a preallocated workspace; the gap is what the
  over-provisioned grid costs.
- prefill is compute bound: reported as TFLOP/s of causal attention (only
  the unmasked query-key pairs count: 4 * head_dim FLOPs per pair and head).

The model shape is Llama-3-8B's attention (32 query heads, 8 KV heads,
head_dim 128) with block_size 16 and bf16. `--cpu` runs tiny shapes through
Triton's interpreter to check the script; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    # Run as a file, sys.path[0] is bench/, where this very file would shadow the `kernels` package.
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "bench"]
    sys.path.insert(0, str(REPO_ROOT))

if "--cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: see kernels/__init__.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from kernels import reference  # noqa: E402
from kernels.decode_attention import decode_attention, split_plan, workspace_numel  # noqa: E402
from kernels.kv_store import store_kv  # noqa: E402
from kernels.prefill_attention import prefill_attention  # noqa: E402

GPU_SHAPES = {
    "num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16,
    "decode": [(b, c) for b in (1, 64, 256) for c in (512, 4096, 16384)],  # (batch, context)
    # (chunk, context before the chunk, requests): plain prefill and a later chunk.
    "prefill": [(512, 0, 4), (512, 3584, 4), (2048, 0, 4), (2048, 2048, 4)],
    "store": [256, 8192],  # tokens
    "copy_bytes": 1 << 30,
    "graph_bound": 32768,  # decode again with max_seq_len here, as under a CUDA graph (max_model_len)
}
CPU_SHAPES = {
    "num_heads": 4, "num_kv_heads": 2, "head_dim": 64, "block_size": 16,
    "decode": [(1, 40), (2, 100)],
    "prefill": [(16, 0, 1), (32, 20, 2)],
    "store": [8],
    "copy_bytes": 1 << 24,
    "graph_bound": 256,
}


def bench(fn: Callable[[], Any], cuda: bool) -> float:
    """Median milliseconds."""
    if cuda:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(num_bytes: int, device: str, cuda: bool) -> float:
    """GB/s of a device-to-device copy; bytes read plus bytes written, as a kernel moves them."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), cuda)
    return 2 * num_bytes / ms / 1e6


def paged_cache(num_tokens_per_req: list[int], shapes: dict, dtype: torch.dtype, device: str):
    """Random caches holding the given contexts in shuffled blocks, plus block tables and seq_lens."""
    bs, kvh, d = shapes["block_size"], shapes["num_kv_heads"], shapes["head_dim"]
    blocks_per_req = [triton.cdiv(n, bs) for n in num_tokens_per_req]
    num_blocks = sum(blocks_per_req)
    key_cache = torch.randn(num_blocks, bs, kvh, d, device=device, dtype=dtype)
    value_cache = torch.randn_like(key_cache)
    ids = torch.randperm(num_blocks, device=device).to(torch.int32)
    block_tables = torch.full((len(blocks_per_req), max(blocks_per_req)), -1, dtype=torch.int32, device=device)
    used = 0
    for r, n in enumerate(blocks_per_req):
        block_tables[r, :n] = ids[used : used + n]
        used += n
    seq_lens = torch.tensor(num_tokens_per_req, dtype=torch.int32, device=device)
    return key_cache, value_cache, block_tables, seq_lens


def gather(cache: torch.Tensor, block_tables: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Contiguous [num_reqs, kv_heads, seq_len, head_dim] copy of equal-length contexts."""
    return reference._gather_context(cache, block_tables, seq_len).contiguous()


def bench_decode(batch: int, context: int, shapes: dict, dtype: torch.dtype, device: str, cuda: bool) -> dict:
    h, kvh, d = shapes["num_heads"], shapes["num_kv_heads"], shapes["head_dim"]
    key_cache, value_cache, block_tables, seq_lens = paged_cache([context] * batch, shapes, dtype, device)
    query = torch.randn(batch, h, d, device=device, dtype=dtype)
    start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
    out = torch.empty_like(query)
    scale = d**-0.5
    kernel_ms = bench(lambda: decode_attention(
        query, key_cache, value_cache, block_tables, seq_lens, start_loc, context, scale, out=out), cuda)
    # As a captured CUDA graph runs it: the grid sized for the bound, partials in a preallocated workspace.
    bound = shapes["graph_bound"]
    workspace = torch.empty(workspace_numel(batch, h, d, bound, query.device), device=device)
    bound_ms = bench(lambda: decode_attention(
        query, key_cache, value_cache, block_tables, seq_lens, start_loc, bound, scale, out=out,
        workspace=workspace), cuda)

    # Decode sees every key, so each KV head's query heads can be its "query rows": no KV repeat needed.
    k, v = gather(key_cache, block_tables, context), gather(value_cache, block_tables, context)
    q = query.view(batch, kvh, h // kvh, d)
    sdpa_ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), cuda)
    expected = F.scaled_dot_product_attention(q, k, v, scale=scale).reshape(batch, h, d)
    kv_bytes = 2 * batch * context * kvh * d * key_cache.element_size()
    return {
        "batch": batch, "context": context, "num_splits": split_plan(batch, kvh, d, context, query.device)[1],
        "kernel_ms": kernel_ms, "sdpa_ms": sdpa_ms, "graph_bound": bound, "graph_bound_ms": bound_ms,
        "graph_bound_splits": split_plan(batch, kvh, d, bound, query.device)[1],
        "kernel_GBps": kv_bytes / kernel_ms / 1e6, "sdpa_GBps": kv_bytes / sdpa_ms / 1e6,
        "max_abs_diff_vs_sdpa": (out.float() - expected.float()).abs().max().item(),
    }


def causal_flops(chunk: int, context_before: int, num_heads: int, head_dim: int) -> int:
    # Query j of the chunk sees context_before + j + 1 keys.
    pairs = chunk * context_before + chunk * (chunk + 1) // 2
    return 4 * head_dim * num_heads * pairs


def bench_prefill(chunk: int, context_before: int, num_reqs: int, shapes: dict, dtype: torch.dtype, device: str,
                  cuda: bool) -> dict:
    h, kvh, d = shapes["num_heads"], shapes["num_kv_heads"], shapes["head_dim"]
    seq_len = context_before + chunk
    key_cache, value_cache, block_tables, seq_lens = paged_cache([seq_len] * num_reqs, shapes, dtype, device)
    query = torch.randn(num_reqs * chunk, h, d, device=device, dtype=dtype)
    start_loc = torch.arange(0, num_reqs * chunk + 1, chunk, dtype=torch.int32, device=device)
    out = torch.empty_like(query)
    scale = d**-0.5
    kernel_ms = bench(lambda: prefill_attention(
        query, key_cache, value_cache, block_tables, seq_lens, start_loc, chunk, scale, out=out), cuda)

    k = gather(key_cache, block_tables, seq_len).repeat_interleave(h // kvh, dim=1)
    v = gather(value_cache, block_tables, seq_len).repeat_interleave(h // kvh, dim=1)
    q = query.view(num_reqs, chunk, h, d).transpose(1, 2)
    if context_before == 0:
        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(chunk, seq_len)

        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    sdpa_ms = bench(sdpa, cuda)
    expected = sdpa().transpose(1, 2).reshape(num_reqs * chunk, h, d)
    flops = num_reqs * causal_flops(chunk, context_before, h, d)
    return {
        "chunk": chunk, "context_before": context_before, "num_reqs": num_reqs,
        "kernel_ms": kernel_ms, "sdpa_ms": sdpa_ms,
        "kernel_TFLOPs": flops / kernel_ms / 1e9, "sdpa_TFLOPs": flops / sdpa_ms / 1e9,
        "max_abs_diff_vs_sdpa": (out.float() - expected.float()).abs().max().item(),
    }


def bench_store(num_tokens: int, shapes: dict, dtype: torch.dtype, device: str, cuda: bool) -> dict:
    kvh, d, bs = shapes["num_kv_heads"], shapes["head_dim"], shapes["block_size"]
    num_blocks = 2 * triton.cdiv(num_tokens, bs)
    key_cache = torch.zeros(num_blocks, bs, kvh, d, device=device, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    key = torch.randn(num_tokens, kvh, d, device=device, dtype=dtype)
    value = torch.randn_like(key)
    slots = torch.randperm(num_blocks * bs, device=device)[:num_tokens]
    kernel_ms = bench(lambda: store_kv(key, value, key_cache, value_cache, slots), cuda)
    torch_ms = bench(lambda: reference.store_kv(key, value, key_cache, value_cache, slots), cuda)
    moved = 2 * 2 * key.numel() * key.element_size()  # K and V, read and written
    return {"tokens": num_tokens, "kernel_ms": kernel_ms, "torch_ms": torch_ms, "kernel_GBps": moved / kernel_ms / 1e6}


def start(description: str, shape_keys: tuple[str, ...], gpu_shapes: dict, cpu_shapes: dict):
    """The kernel benchmarks' command line (--cpu, --out, --dtype) and opening: (args, cuda, device, dtype,
    shapes, results with the machine and the copy bandwidth, printed)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes through the Triton interpreter (dry run)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --cpu for a dry run")
    device = "cuda" if cuda else "cpu"
    shapes = gpu_shapes if cuda else cpu_shapes
    dtype = getattr(torch, args.dtype) if cuda else torch.float32  # 16-bit math is wrong in the interpreter
    torch.manual_seed(0)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter; timings meaningless)",
        "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype).removeprefix("torch."),
        "shape": {k: shapes[k] for k in shape_keys},
        "copy_GBps": copy_bandwidth(shapes["copy_bytes"], device, cuda),
    }
    print(f"{results['device']}: torch {torch.__version__}, triton {triton.__version__}, {results['dtype']}")
    print(f"device-to-device copy: {results['copy_GBps']:.0f} GB/s")
    return args, cuda, device, dtype, shapes, results


def write_results(results: dict[str, Any], out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")


def main() -> None:
    args, cuda, device, dtype, shapes, results = start(
        __doc__.split("\n\n")[0], ("num_heads", "num_kv_heads", "head_dim", "block_size"), GPU_SHAPES, CPU_SHAPES)
    copy = results["copy_GBps"]

    results["store_kv"] = []
    for n in shapes["store"]:
        r = bench_store(n, shapes, dtype, device, cuda)
        results["store_kv"].append(r)
        print(f"store_kv tokens={n:5d}: kernel {r['kernel_ms']:.4f} ms ({r['kernel_GBps']:.0f} GB/s), "
              f"torch {r['torch_ms']:.4f} ms")

    results["decode"] = []
    for batch, context in shapes["decode"]:
        r = bench_decode(batch, context, shapes, dtype, device, cuda)
        r["kernel_fraction_of_copy"] = r["kernel_GBps"] / copy
        results["decode"].append(r)
        print(f"decode batch={batch:3d} ctx={context:5d} splits={r['num_splits']:2d}: "
              f"kernel {r['kernel_ms']:.4f} ms {r['kernel_GBps']:6.0f} GB/s ({100 * r['kernel_fraction_of_copy']:.0f}% "
              f"of copy) | sdpa {r['sdpa_ms']:.4f} ms {r['sdpa_GBps']:6.0f} GB/s | "
              f"max|diff| {r['max_abs_diff_vs_sdpa']:.1e} | bound {r['graph_bound']}: {r['graph_bound_ms']:.4f} ms "
              f"({r['graph_bound_splits']} splits)")
        if cuda:
            torch.cuda.empty_cache()  # the next shape may need the memory this one held

    results["prefill"] = []
    for chunk, before, num_reqs in shapes["prefill"]:
        r = bench_prefill(chunk, before, num_reqs, shapes, dtype, device, cuda)
        results["prefill"].append(r)
        print(f"prefill chunk={chunk:4d} ctx_before={before:4d} reqs={num_reqs}: "
              f"kernel {r['kernel_ms']:.4f} ms {r['kernel_TFLOPs']:6.1f} TFLOP/s | "
              f"sdpa {r['sdpa_ms']:.4f} ms {r['sdpa_TFLOPs']:6.1f} TFLOP/s | max|diff| {r['max_abs_diff_vs_sdpa']:.1e}")

    write_results(results, args.out)


if __name__ == "__main__":
    main()
