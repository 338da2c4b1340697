"""Micro-benchmarks of the attention kernels against torch SDPA, and of the KV store.

    PYTHONPATH=. python -m bench.kernels --out bench/out/kernels.json   # CUDA, about 3 minutes on an H200
    PYTHONPATH=. python -m bench.kernels --cpu --out /tmp/kernels.json  # dry run

Writes the JSON and, next to it, the same tables in markdown (`kernels.md`).

- Device time is measured under CUDA-graph replay
  (`triton.testing.do_bench_cudagraph`, median), so host time cannot hide in
  it; the eager host time of a call (what the Python wrapper and the launch
  cost the CPU) is measured separately: calls issued back to back with no
  synchronisation, divided by their count.
- Every row runs in fp16 and in bf16, for GQA 4 (Llama-3-8B: 32 query heads,
  8 KV heads), GQA 8 (32/4) and MHA (32/32), head_dim 128, block_size 16.
- The baseline is `F.scaled_dot_product_attention` on K/V already gathered
  into contiguous tensors (the gather is not timed; it is torch's best case).
- decode is memory bound: also reported as a share of the device-to-device
  copy bandwidth (K and V bytes of the context, read once), and again with
  the grid and splits sized for `max_seq_len` = 32768 as the engine's
  captured graphs run it (max_model_len, partials in a preallocated workspace).
  Shapes whose K/V exceeds 20 GiB (held twice) are skipped: MHA 256 x 16k.
- prefill is compute bound: TFLOP/s of causal attention (only the unmasked
  query-key pairs count: 4 * head_dim FLOPs per pair and head). Its first
  call per shape autotunes; the configs chosen are listed at the end.

`--cpu` runs tiny shapes in float32 through Triton's interpreter (no CUDA
graphs: plain timing) to check the script; its timings mean nothing.
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

from bench.kernels_tables import markdown  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.decode_attention import decode_attention, split_plan, workspace_numel  # noqa: E402
from kernels.kv_store import store_kv  # noqa: E402
from kernels.prefill_attention import prefill_attention, tuned_configs  # noqa: E402

GPU_SHAPES = {
    "num_heads": 32, "head_dim": 128, "block_size": 16,
    "groups": {"GQA4": 4, "GQA8": 8, "MHA": 1},  # query heads per KV head
    "decode": [(b, c) for b in (1, 64, 256) for c in (512, 4096, 16384)],  # (batch, context)
    # (chunk, context before the chunk, requests): plain prefill and a later chunk.
    "prefill": [(512, 0, 4), (512, 3584, 4), (2048, 0, 4), (2048, 2048, 4)],
    "store": [256, 8192],  # tokens
    "copy_bytes": 1 << 30,
    "graph_bound": 32768,  # decode again with max_seq_len here, as the engine's CUDA graphs run it
    "max_kv_bytes": 20 << 30,
    "host_calls": 30,
}
CPU_SHAPES = {
    "num_heads": 8, "head_dim": 64, "block_size": 16,
    "groups": {"GQA4": 4, "GQA8": 8, "MHA": 1},
    "decode": [(1, 40), (2, 100)],
    "prefill": [(16, 0, 1), (32, 20, 2)],
    "store": [8],
    "copy_bytes": 1 << 24,
    "graph_bound": 256,
    "max_kv_bytes": 1 << 30,
    "host_calls": 2,
}


def device_ms(fn: Callable[[], Any], cuda: bool, graph: bool = True) -> float:
    """Median milliseconds of device time: CUDA-graph replay on a GPU (eager `do_bench` when `graph` is
    False, for code that syncs with the host), plain timing on the interpreter."""
    fn()  # compiles, autotunes, allocates: none of it may happen during capture
    if cuda and graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"))
    if cuda:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def host_us(fn: Callable[[], Any], num_calls: int, cuda: bool) -> float:
    """Host microseconds per eager call: back-to-back calls, no synchronisation between them."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(num_calls):
        fn()
    elapsed = time.perf_counter() - start
    if cuda:
        torch.cuda.synchronize()
    return elapsed / num_calls * 1e6


def copy_bandwidth(num_bytes: int, device: str, cuda: bool) -> float:
    """GB/s of a device-to-device copy; bytes read plus bytes written, as a kernel moves them."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = device_ms(lambda: dst.copy_(src), cuda)
    return 2 * num_bytes / ms / 1e6


def paged_cache(num_tokens_per_req: list[int], num_kv_heads: int, shapes: dict, dtype: torch.dtype, device: str):
    """Random caches holding the given contexts in shuffled blocks, plus block tables and seq_lens."""
    bs, d = shapes["block_size"], shapes["head_dim"]
    blocks_per_req = [triton.cdiv(n, bs) for n in num_tokens_per_req]
    num_blocks = sum(blocks_per_req)
    key_cache = torch.randn(num_blocks, bs, num_kv_heads, d, device=device, dtype=dtype)
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


def bench_decode(batch: int, context: int, group: int, shapes: dict, dtype: torch.dtype, device: str,
                 cuda: bool) -> dict:
    h, d = shapes["num_heads"], shapes["head_dim"]
    kvh = h // group
    kv_bytes = 2 * batch * context * kvh * d * dtype.itemsize
    if kv_bytes > shapes["max_kv_bytes"]:  # held twice: the paged cache and SDPA's contiguous copy
        return {"batch": batch, "context": context, "skipped": f"K/V of {kv_bytes / 2**30:.0f} GiB"}
    key_cache, value_cache, block_tables, seq_lens = paged_cache([context] * batch, kvh, shapes, dtype, device)
    query = torch.randn(batch, h, d, device=device, dtype=dtype)
    start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
    out = torch.empty_like(query)
    scale = d**-0.5
    bound = shapes["graph_bound"]
    workspace = torch.empty(workspace_numel(batch, h, d, bound, query.device), device=device)

    def kernel(max_seq_len: int = context) -> torch.Tensor:
        return decode_attention(query, key_cache, value_cache, block_tables, seq_lens, start_loc, max_seq_len, scale,
                                out=out, workspace=workspace)

    kernel_ms = device_ms(kernel, cuda)
    bound_ms = device_ms(lambda: kernel(bound), cuda)
    eager_us = host_us(kernel, shapes["host_calls"], cuda)
    # Decode sees every key, so each KV head's query heads can be its "query rows": no KV repeat needed.
    k, v = gather(key_cache, block_tables, context), gather(value_cache, block_tables, context)
    q = query.view(batch, kvh, group, d)
    sdpa_ms = device_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), cuda)
    expected = F.scaled_dot_product_attention(q, k, v, scale=scale).reshape(batch, h, d)
    kernel(context)
    return {
        "batch": batch, "context": context, "num_splits": split_plan(batch, kvh, d, context, query.device)[1],
        "kernel_ms": kernel_ms, "sdpa_ms": sdpa_ms, "kernel_over_sdpa": kernel_ms / sdpa_ms,
        "graph_bound": bound, "graph_bound_ms": bound_ms,
        "graph_bound_splits": split_plan(batch, kvh, d, bound, query.device)[1],
        "kernel_GBps": kv_bytes / kernel_ms / 1e6, "sdpa_GBps": kv_bytes / sdpa_ms / 1e6, "host_us": eager_us,
        "max_abs_diff_vs_sdpa": (out.float() - expected.float()).abs().max().item(),
    }


def causal_flops(chunk: int, context_before: int, num_heads: int, head_dim: int) -> int:
    # Query j of the chunk sees context_before + j + 1 keys.
    pairs = chunk * context_before + chunk * (chunk + 1) // 2
    return 4 * head_dim * num_heads * pairs


def bench_prefill(chunk: int, context_before: int, num_reqs: int, group: int, shapes: dict, dtype: torch.dtype,
                  device: str, cuda: bool) -> dict:
    h, d = shapes["num_heads"], shapes["head_dim"]
    kvh = h // group
    seq_len = context_before + chunk
    key_cache, value_cache, block_tables, seq_lens = paged_cache([seq_len] * num_reqs, kvh, shapes, dtype, device)
    query = torch.randn(num_reqs * chunk, h, d, device=device, dtype=dtype)
    start_loc = torch.arange(0, num_reqs * chunk + 1, chunk, dtype=torch.int32, device=device)
    out = torch.empty_like(query)
    scale = d**-0.5

    def kernel() -> torch.Tensor:
        return prefill_attention(query, key_cache, value_cache, block_tables, seq_lens, start_loc, chunk, scale,
                                 out=out)

    kernel_ms = device_ms(kernel, cuda)
    eager_us = host_us(kernel, shapes["host_calls"], cuda)
    k = gather(key_cache, block_tables, seq_len).repeat_interleave(group, dim=1)
    v = gather(value_cache, block_tables, seq_len).repeat_interleave(group, dim=1)
    q = query.view(num_reqs, chunk, h, d).transpose(1, 2)
    if context_before == 0:
        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(chunk, seq_len)

        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    sdpa_ms = device_ms(sdpa, cuda)
    expected = sdpa().transpose(1, 2).reshape(num_reqs * chunk, h, d)
    kernel()
    flops = num_reqs * causal_flops(chunk, context_before, h, d)
    return {
        "chunk": chunk, "context_before": context_before, "num_reqs": num_reqs,
        "kernel_ms": kernel_ms, "sdpa_ms": sdpa_ms, "host_us": eager_us,
        "kernel_TFLOPs": flops / kernel_ms / 1e9, "sdpa_TFLOPs": flops / sdpa_ms / 1e9,
        "kernel_over_sdpa_speed": sdpa_ms / kernel_ms,
        "max_abs_diff_vs_sdpa": (out.float() - expected.float()).abs().max().item(),
    }


def bench_store(num_tokens: int, shapes: dict, dtype: torch.dtype, device: str, cuda: bool) -> dict:
    kvh, d, bs = shapes["num_heads"] // 4, shapes["head_dim"], shapes["block_size"]
    num_blocks = 2 * triton.cdiv(num_tokens, bs)
    key_cache = torch.zeros(num_blocks, bs, kvh, d, device=device, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    key = torch.randn(num_tokens, kvh, d, device=device, dtype=dtype)
    value = torch.randn_like(key)
    slots = torch.randperm(num_blocks * bs, device=device)[:num_tokens]
    kernel_ms = device_ms(lambda: store_kv(key, value, key_cache, value_cache, slots), cuda)
    torch_ms = device_ms(lambda: reference.store_kv(key, value, key_cache, value_cache, slots), cuda)
    moved = 2 * 2 * key.numel() * key.element_size()  # K and V, read and written
    return {"tokens": num_tokens, "kernel_ms": kernel_ms, "torch_ms": torch_ms, "kernel_GBps": moved / kernel_ms / 1e6}


def start(description: str, shape_keys: tuple[str, ...], gpu_shapes: dict, cpu_shapes: dict,
          default_dtypes: str) -> tuple[argparse.Namespace, bool, str, list[str], dict, dict[str, Any]]:
    """The kernel benchmarks' command line (--cpu, --out, --dtypes) and opening: (args, cuda, device,
    dtype names, shapes, results holding the machine and the copy bandwidth, printed)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes through the Triton interpreter (dry run)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here, and markdown next to it")
    parser.add_argument("--dtypes", default=default_dtypes, help="comma-separated; --cpu runs float32 only")
    args = parser.parse_args()

    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --cpu for a dry run")
    device = "cuda" if cuda else "cpu"
    shapes = gpu_shapes if cuda else cpu_shapes
    dtype_names = args.dtypes.split(",") if cuda else ["float32"]  # 16-bit math is wrong in the interpreter
    torch.manual_seed(0)

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter; timings meaningless)",
        "torch": torch.__version__, "triton": triton.__version__, "dtypes": dtype_names,
        "shape": {k: shapes[k] for k in shape_keys},
        "copy_GBps": copy_bandwidth(shapes["copy_bytes"], device, cuda),
    }
    print(f"{results['device']}: torch {torch.__version__}, triton {triton.__version__}")
    print(f"device-to-device copy: {results['copy_GBps']:.0f} GB/s")
    return args, cuda, device, dtype_names, shapes, results


def write_results(results: dict[str, Any], out: Path | None, markdown_text: str | None = None) -> None:
    """The JSON at `out`, and the markdown tables next to it when there are any."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
        if markdown_text is not None:
            out.with_suffix(".md").write_text(markdown_text)
            print(f"wrote {out.with_suffix('.md')}")


def main() -> None:
    args, cuda, device, dtype_names, shapes, results = start(
        __doc__.split("\n\n")[0], ("num_heads", "head_dim", "block_size"), GPU_SHAPES, CPU_SHAPES,
        "float16,bfloat16")
    results.update(groups=shapes["groups"], store_kv={}, decode={}, prefill={})
    for name in dtype_names:
        dtype = getattr(torch, name)
        results["store_kv"][name] = [bench_store(n, shapes, dtype, device, cuda) for n in shapes["store"]]
        results["decode"][name], results["prefill"][name] = {}, {}
        for group_name, group in shapes["groups"].items():
            rows = results["decode"][name][group_name] = []
            for batch, context in shapes["decode"]:
                r = bench_decode(batch, context, group, shapes, dtype, device, cuda)
                if "skipped" not in r:
                    r["copy_share"] = r["kernel_GBps"] / results["copy_GBps"]
                rows.append(r)
                print(f"decode {name} {group_name} {batch}x{context}: " + (r.get("skipped") or
                      f"kernel {r['kernel_ms']:.4f} ms ({100 * r['copy_share']:.0f}% of copy), sdpa "
                      f"{r['sdpa_ms']:.4f} ms, at bound {r['graph_bound_ms']:.4f} ms, host {r['host_us']:.1f} us, "
                      f"max|diff| {r['max_abs_diff_vs_sdpa']:.1e}"))
                if cuda:
                    torch.cuda.empty_cache()  # the next shape may need the memory this one held
            rows = results["prefill"][name][group_name] = []
            for chunk, before, num_reqs in shapes["prefill"]:
                r = bench_prefill(chunk, before, num_reqs, group, shapes, dtype, device, cuda)
                rows.append(r)
                print(f"prefill {name} {group_name} {chunk}/{before}/{num_reqs}: kernel {r['kernel_TFLOPs']:.1f} "
                      f"TFLOP/s, sdpa {r['sdpa_TFLOPs']:.1f} TFLOP/s, host {r['host_us']:.1f} us, "
                      f"max|diff| {r['max_abs_diff_vs_sdpa']:.1e}")
    results["tuned_configs"] = {str(k): str(v) for k, v in tuned_configs().items()}

    text = markdown(results)
    print(text)
    write_results(results, args.out, text)

if __name__ == "__main__":
    main()
