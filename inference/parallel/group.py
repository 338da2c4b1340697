"""The tensor-parallel process group of this process, and its collectives.

Invariants:
- One group per process at a time; `rank()`/`size()` read 0/1 when none is
  set up, and then `all_reduce` and `gather_vocab` return their input, so the
  single-device model runs no collective at all (and stays bit-exact).
- Every collective carries the group's timeout: a rank that stops answering
  makes the others raise instead of waiting forever.
- Ranks call collectives in the same order: the model's forward and the
  start-up agreement on the KV cache size are the only callers.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Bounds a collective whose peer hangs; a peer that dies is noticed sooner by
# rank 0's process watcher (workers.py). Generous: the first step compiles.
COLLECTIVE_TIMEOUT_S = 120


@dataclass(slots=True)
class TensorParallelGroup:
    rank: int
    size: int


_group = TensorParallelGroup(0, 1)


def rank() -> int:
    return _group.rank


def size() -> int:
    return _group.size


def init_group(group_rank: int, group_size: int, init_file: str, device: str) -> None:
    """Join the group of `group_size` ranks that rendezvous through `init_file`
    (a path no rank has created yet); NCCL on CUDA, gloo on the CPU."""
    global _group
    if device == "cuda":
        torch.cuda.set_device(group_rank)
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo", init_method=f"file://{init_file}", rank=group_rank,
        world_size=group_size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    _group = TensorParallelGroup(group_rank, group_size)


@contextmanager
def acting_as(group_rank: int, group_size: int) -> Iterator[None]:
    """Act as rank `group_rank` of `group_size`: while models are built on the
    meta device for their shapes (inference/memory_plan.py), or as a group of
    one (0, 1) for a model that rank 0 runs whole by itself (the draft model
    of speculative decoding). No collective may run inside."""
    global _group
    saved = _group
    _group = TensorParallelGroup(group_rank, group_size)
    try:
        yield
    finally:
        _group = saved


def destroy_group() -> None:
    global _group
    if dist.is_initialized():
        dist.destroy_process_group()
    _group = TensorParallelGroup(0, 1)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over the ranks, in place."""
    if _group.size > 1:
        dist.all_reduce(x)
    return x


def all_reduce_min(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value`."""
    if _group.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_gather_ints(value: int, device: torch.device) -> list[int]:
    """Every rank's `value`, by rank."""
    if _group.size == 1:
        return [value]
    t = torch.tensor([value], dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(_group.size)]
    dist.all_gather(parts, t)
    return [int(p.item()) for p in parts]


def gather_vocab(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full `[num_rows, vocab_size]` logits from every rank's vocab shard
    (equal shards; the last rank's padding columns are cut off)."""
    if _group.size == 1:
        return local_logits
    parts = [torch.empty_like(local_logits) for _ in range(_group.size)]
    dist.all_gather(parts, local_logits.contiguous())
    return torch.cat(parts, dim=-1)[:, :vocab_size]
