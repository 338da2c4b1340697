"""How a model is split across the tensor-parallel ranks, and the layers that hold one rank's part.

- Attention is split by heads: each rank keeps `num_heads / N` query heads.
  KV heads are split too when `num_kv_heads % N == 0`; otherwise each rank
  keeps a copy of the one KV head its query heads read (so a rank's query
  heads must all fall in one KV group).
- qkv and gate_up are column-parallel: each fused part is the rank's rows of
  the checkpoint tensor (`ColumnParallelLinear`).
- o_proj and down are row-parallel: the rank's input columns, then an
  all-reduce sums the partial outputs (`RowParallelLinear`).
- The embedding and the LM head are vocab-parallel: each rank holds
  `ceil(vocab / N)` rows; a lookup zeroes the ids another rank owns and
  all-reduces, the LM head gathers every rank's logits.

Every parallel layer says which slice of the checkpoint tensor it holds
(`checkpoint_slice`), so the loader reads that slice alone. With one rank
each layer is the plain single-device layer: the same weights, the same
float ops, no collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inference.parallel import group
from kernels import cpu_linear


@dataclass(slots=True)
class HeadShard:
    num_heads: int
    num_kv_heads: int
    first_head: int
    first_kv_head: int


def shard_heads(num_heads: int, num_kv_heads: int, rank: int, size: int) -> HeadShard:
    if num_heads % size:
        raise ValueError(f"num_attention_heads {num_heads} does not divide by tensor_parallel_size {size}")
    local = num_heads // size
    if num_kv_heads % size == 0:
        kv = num_kv_heads // size
        return HeadShard(local, kv, rank * local, rank * kv)
    group_size = num_heads // num_kv_heads  # query heads per KV head
    if group_size % local:
        raise ValueError(
            f"tensor_parallel_size {size}: {num_kv_heads} KV heads do not divide by it, and a rank's "
            f"{local} query heads would read more than one KV head"
        )
    return HeadShard(local, 1, rank * local, rank * local // group_size)


def check_tensor_parallel(hf_config, size: int) -> None:
    """Raise ValueError if this model cannot be split `size` ways."""
    num_heads = hf_config.num_attention_heads
    shard_heads(num_heads, getattr(hf_config, "num_key_value_heads", None) or num_heads, 0, size)
    if hf_config.intermediate_size % size:
        raise ValueError(
            f"intermediate_size {hf_config.intermediate_size} does not divide by tensor_parallel_size {size}"
        )


class PackableLinear(nn.Linear):
    """nn.Linear that runs on a packed copy of its weight once `pack()` made
    one (the CPU's float32 path, and bf16 with AVX512-BF16; `kernels/cpu_linear.py`)."""

    packed_weight: torch.Tensor | None = None
    onednn_weight: torch.Tensor | None = None  # oneDNN's copy, for larger bf16 batches on AMX CPUs

    def pack(self) -> int:
        """Pack the weight if this device and dtype allow it; the bytes it added."""
        self.packed_weight = cpu_linear.pack_weight(self.weight)
        self.onednn_weight = cpu_linear.pack_onednn(self.weight)
        copies = (self.packed_weight is not None) + (self.onednn_weight is not None)
        return copies * self.weight.numel() * self.weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear.linear(x, self.weight, self.bias, self.packed_weight, self.onednn_weight)


class ColumnParallelLinear(PackableLinear):
    """Fused output parts, each `(start, size)`: rows start..start+size of its checkpoint tensor."""

    def __init__(self, in_features: int, parts: list[tuple[int, int]], bias: bool) -> None:
        super().__init__(in_features, sum(n for _, n in parts), bias=bias)
        self.parts = parts

    def checkpoint_slice(self, part: int) -> tuple[int, int, int]:
        start, num_rows = self.parts[part]
        return 0, start, num_rows


class RowParallelLinear(PackableLinear):
    """Input columns input_start..input_start+in_features of the checkpoint
    tensor; the outputs of all ranks are summed (so no bias: it would be
    added N times)."""

    def __init__(self, in_features: int, out_features: int, input_start: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.input_start = input_start

    def checkpoint_slice(self, part: int) -> tuple[int, int, int]:
        return 1, self.input_start, self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group.all_reduce(super().forward(x))


class VocabParallelEmbedding(nn.Module):
    """This rank's `ceil(vocab / N)` rows of a `[vocab, hidden]` table (the
    last rank's tail past the vocab is padding no id reaches); the embedding,
    or, as `weight` of an LM head, that rank's logits columns."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        rank, size = group.rank(), group.size()
        rows = -(-vocab_size // size)
        self.vocab_start = rank * rows
        self.num_valid = max(min(rows, vocab_size - self.vocab_start), 0)
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))

    def checkpoint_slice(self, part: int) -> tuple[int, int, int]:
        return 0, self.vocab_start, self.num_valid

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if group.size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        elsewhere = (local < 0) | (local >= self.num_valid)
        x = F.embedding(local.masked_fill(elsewhere, 0), self.weight)
        return group.all_reduce(x.masked_fill_(elsewhere[:, None], 0))
