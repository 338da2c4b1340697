"""The CPU decode attention routes, measured on the same paged batch.

    python -m bench.cpu_attention --batch 16,48 --dtype float32,bfloat16

Routes, each from the KV layout `[num_blocks, block_size, num_kv_heads, head_dim]`:
- `gather+sdpa`: `kernels/reference.py` (gathers each request's context into
  contiguous K/V, then SDPA in a few length groups), what the engine ran before;
- `blockwise-torch`: online softmax in torch over one block column of every
  request at a time (no full gather, but a dozen ops per block column);
- `torch.compile`: Inductor's C++ backend on a gather + masked softmax written
  in torch, dynamic shapes (its compile time is printed apart);
- `c++`: `kernels/cpu/attention.cpp`, reading K/V through the block table.

Contexts are ShareGPT-like (lognormal prompt lengths up to 600 plus up to 256
generated tokens), SmolLM2-135M's heads (9 query, 3 KV, head_dim 64). Each of
`--layers` layers has its own caches and a call per layer makes a step, so K/V
come from memory as they do when serving (one layer's cache alone stays in the
L3 cache between calls). Every route's output is checked against the
reference first; times are medians over `--repeats` steps, per layer call,
routes interleaved so drift on a shared machine hits all. The C++ route's
K/V read rate shows how close it is to the memory bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import sharegpt_like_lengths  # noqa: E402
from kernels import cpu_ops, reference  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16


def make_batch(batch: int, dtype: torch.dtype, seed: int, layers: int) -> tuple[dict, list[tuple[torch.Tensor, ...]]]:
    """One layer's attention arguments, and (key_cache, value_cache) for each of `layers` layers."""
    rng = np.random.default_rng(seed)
    prompts, outputs = sharegpt_like_lengths(batch, rng, 600, 256, 32)
    lens = torch.tensor(prompts + rng.integers(0, outputs + 1), dtype=torch.int32)
    blocks = (lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = int(blocks.sum())
    ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    tables = torch.full((batch, int(blocks.max())), -1, dtype=torch.int32)
    offsets = torch.cumsum(blocks, 0) - blocks
    for r in range(batch):
        tables[r, : blocks[r]] = ids[offsets[r] : offsets[r] + blocks[r]]
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    caches = [(torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)) for _ in range(layers)]
    inputs = dict(
        query=torch.randn(batch, NUM_HEADS, HEAD_DIM).to(dtype), key_cache=caches[0][0], value_cache=caches[0][1],
        block_tables=tables, seq_lens=lens, query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        max_query_len=1, max_seq_len=int(lens.max()), scale=HEAD_DIM**-0.5,
    )
    return inputs, caches


def blockwise_torch(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                    max_seq_len, scale):
    """Online softmax over block columns: column b holds block b of every request."""
    batch, group = query.shape[0], NUM_HEADS // NUM_KV_HEADS
    q = query.float().view(batch, NUM_KV_HEADS, group, HEAD_DIM) * scale
    m = torch.full((batch, NUM_KV_HEADS, group, 1), float("-inf"))
    denom = torch.zeros(batch, NUM_KV_HEADS, group, 1)
    acc = torch.zeros(batch, NUM_KV_HEADS, group, HEAD_DIM)
    positions = torch.arange(BLOCK_SIZE)
    for b in range(block_tables.shape[1]):
        ids = block_tables[:, b].clamp(min=0)
        k = key_cache.index_select(0, ids).float().permute(0, 2, 3, 1)  # [batch, kv, dim, block]
        v = value_cache.index_select(0, ids).float().transpose(1, 2)  # [batch, kv, block, dim]
        s = torch.matmul(q, k)  # [batch, kv, group, block]
        valid = (b * BLOCK_SIZE + positions)[None, :] < seq_lens[:, None]
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        p = torch.exp(s - m_new).nan_to_num(0.0)
        correction = torch.exp(m - m_new).nan_to_num(0.0)
        denom = denom * correction + p.sum(-1, keepdim=True)
        acc = acc * correction + torch.matmul(p, v)
        m = m_new
    return (acc / denom).reshape(batch, NUM_HEADS, HEAD_DIM).to(query.dtype)


def gather_attention(query, key_cache, value_cache, block_tables, seq_lens, scale):
    """Gather + masked softmax in plain torch: what torch.compile gets to fuse."""
    batch, group = query.shape[0], NUM_HEADS // NUM_KV_HEADS
    k = key_cache[block_tables.clamp(min=0).long()].flatten(1, 2).float()  # [batch, ctx, kv, dim]
    v = value_cache[block_tables.clamp(min=0).long()].flatten(1, 2).float()
    q = query.float().view(batch, NUM_KV_HEADS, group, HEAD_DIM) * scale
    s = torch.einsum("bhgd,bthd->bhgt", q, k)
    valid = torch.arange(k.shape[1])[None, :] < seq_lens[:, None]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bhgt,bthd->bhgd", s, v).reshape(batch, NUM_HEADS, HEAD_DIM).to(query.dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="16,48")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=10, help="steps timed per route")
    parser.add_argument("--layers", type=int, default=30, help="layers, each with its own caches (SmolLM2 has 30)")
    args = parser.parse_args(argv)
    assert cpu_ops.available(), "the C++ CPU kernels did not build"
    compiled = torch.compile(gather_attention, dynamic=True)
    print("| dtype | batch | mean context | route | ms per call | vs gather+sdpa | K/V read GB/s |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for dtype_name in args.dtype.split(","):
        dtype = getattr(torch, dtype_name)
        for batch in (int(b) for b in args.batch.split(",")):
            inputs, caches = make_batch(batch, dtype, seed=batch, layers=args.layers)
            routes = {
                "gather+sdpa": lambda k, v: reference.paged_attention(**{**inputs, "key_cache": k, "value_cache": v}),
                "blockwise-torch": lambda k, v: blockwise_torch(**{**inputs, "key_cache": k, "value_cache": v}),
                "torch.compile": lambda k, v: compiled(inputs["query"], k, v, inputs["block_tables"],
                                                       inputs["seq_lens"], inputs["scale"]),
                "c++": lambda k, v: cpu_ops.paged_attention(**{**inputs, "key_cache": k, "value_cache": v}),
            }
            expected = routes["gather+sdpa"](*caches[0]).float()
            start = time.perf_counter()
            for name, route in routes.items():
                torch.testing.assert_close(route(*caches[0]).float(), expected, atol=3e-2, rtol=3e-2, msg=name)
            if dtype_name == args.dtype.split(",")[0] and batch == int(args.batch.split(",")[0]):
                print(f"(first calls, torch.compile's compile included: {time.perf_counter() - start:.1f} s)",
                      file=sys.stderr)
            times: dict[str, list[float]] = {name: [] for name in routes}
            for _ in range(args.repeats):
                for name, route in routes.items():
                    t = time.perf_counter()
                    for k, v in caches:
                        route(k, v)
                    times[name].append((time.perf_counter() - t) / len(caches))
            base = statistics.median(times["gather+sdpa"])
            kv_bytes = 2 * int(inputs["seq_lens"].sum()) * NUM_KV_HEADS * HEAD_DIM * dtype.itemsize
            for name in routes:
                ms = statistics.median(times[name]) * 1e3
                rate = f"{kv_bytes / ms / 1e6:.1f}" if name == "c++" else ""
                print(f"| {dtype_name} | {batch} | {float(inputs['seq_lens'].float().mean()):.0f} | {name} | "
                      f"{ms:.2f} | {base * 1e3 / ms:.2f}x | {rate} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
