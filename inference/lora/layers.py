"""LoRA on the model's linears: base output plus each token's adapter delta.

`wrap_model` replaces every decoder layer's qkv_proj, o_proj, gate_up_proj
and down_proj by a `LoRALinear` around it (after the weights are loaded, so
checkpoint names are untouched). Each holds, for every slot,

    lora_a [num_slots, num_parts * max_rank, in_features]
    lora_b [num_slots, out_features, num_parts * max_rank]

where a fused linear's parts (q, k, v or gate, up) each own `max_rank`
columns: part p's A rows are p*max_rank.., its B is block-diagonal (its own
output rows read only its own columns). A smaller rank is zero-padded, so
ranks mix freely in one batch. The scaling is folded into B at load. Slot 0
stays all zeros: "no adapter".

Tensor parallelism shards as the layer does: a column-parallel layer keeps
its rows of B (A whole), a row-parallel one its columns of A (B whole), and
the delta joins the partial sum before the all-reduce.

`LoRABatch` says which slot each token reads this step. The runner sets it
before the forward: `token_slots` is a view of the persistent step buffer
(what the Triton kernels read, so a captured graph replays with new slots);
on the CPU the delta is computed per slot over the tokens of that slot
(`perm` grouped into `segments`), one matmul pair per adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import kernels
from inference.lora.adapter import LoRAAdapter
from inference.parallel import group
from inference.parallel.layers import ColumnParallelLinear, PackableLinear, RowParallelLinear
from kernels import cpu_linear

# The modules of each wrapped linear, in its fused output order.
FUSED_PARTS = {
    ("self_attn", "qkv_proj"): ("q_proj", "k_proj", "v_proj"),
    ("self_attn", "o_proj"): ("o_proj",),
    ("mlp", "gate_up_proj"): ("gate_proj", "up_proj"),
    ("mlp", "down_proj"): ("down_proj",),
}


@dataclass(slots=True)
class LoRABatch:
    """The adapter slot of each token in this step; empty when no token uses one."""

    token_slots: torch.Tensor | None = None  # int32 [num_padded_tokens], 0 = none (CUDA path)
    perm: torch.Tensor | None = None  # int64 rows that use an adapter, grouped by slot (CPU path)
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (slot, start, end) in perm

    @property
    def active(self) -> bool:
        return bool(self.segments)

    def set(self, device_slots: torch.Tensor, host_slots: np.ndarray) -> None:
        """This step's per-token slots: the device view, and its host copy to group tokens by slot."""
        order = np.argsort(host_slots, kind="stable")
        sorted_slots = host_slots[order]
        first = int(np.searchsorted(sorted_slots, 1))  # base-model and padding tokens sort first
        slots, starts = np.unique(sorted_slots[first:], return_index=True)
        ends = np.append(starts[1:], len(sorted_slots) - first)
        self.segments = [(int(s), int(a), int(b)) for s, a, b in zip(slots, starts, ends)]
        self.perm = torch.from_numpy(order[first:].astype(np.int64)).to(device_slots.device)
        self.token_slots = device_slots if self.segments else None


class LoRALinear(nn.Module):
    def __init__(self, base: PackableLinear, module_names: tuple[str, ...], layer_id: int, batch: LoRABatch,
                 num_slots: int, max_rank: int) -> None:
        super().__init__()
        self.base = base
        self.module_names = module_names
        self.layer_id = layer_id
        self.batch = batch
        self.max_rank = max_rank
        self.row_parallel = isinstance(base, RowParallelLinear)
        width = len(module_names) * max_rank
        weight = base.weight
        self.register_buffer("lora_a", torch.zeros(num_slots, width, base.in_features, dtype=weight.dtype,
                                                   device=weight.device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, base.out_features, width, dtype=weight.dtype,
                                                   device=weight.device), persistent=False)

    def _out_parts(self) -> list[tuple[int, int, int]]:
        """(first local output row, rows, first checkpoint row) of each part."""
        if isinstance(self.base, ColumnParallelLinear):
            parts = []
            offset = 0
            for start, size in self.base.parts:
                parts.append((offset, size, start))
                offset += size
            return parts
        return [(0, self.base.out_features, 0)]

    def set_slot(self, slot: int, adapter: LoRAAdapter | None) -> None:
        """Write `adapter`'s weights for this linear into `slot` (zeros for None or untargeted parts)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if adapter is None:
            return
        r = adapter.rank
        for p, (name, (row, rows, start)) in enumerate(zip(self.module_names, self._out_parts())):
            pair = adapter.weights.get((self.layer_id, name))
            if pair is None:
                continue
            a, b = pair
            if self.row_parallel:
                a = a[:, self.base.input_start : self.base.input_start + self.base.in_features]
            else:
                b = b[start : start + rows]
            cols = slice(p * self.max_rank, p * self.max_rank + r)
            self.lora_a[slot, cols].copy_(a)
            self.lora_b[slot, row : row + rows, cols].copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        out = cpu_linear.linear(x, base.weight, base.bias, base.packed_weight)
        batch = self.batch
        if batch.active:
            if x.device.type == "cpu":
                _add_segments(x, self.lora_a, self.lora_b, batch, out)
            else:
                y = kernels.lora_shrink(x, self.lora_a, batch.token_slots)
                kernels.lora_expand(y, self.lora_b, batch.token_slots, out)
        return group.all_reduce(out) if self.row_parallel else out


def _add_segments(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch,
                  out: torch.Tensor) -> None:
    """out[t] += B[slot] @ (A[slot] @ x[t]), one matmul pair per slot over its tokens."""
    rows = x.index_select(0, batch.perm)
    delta = torch.empty(rows.shape[0], out.shape[1], dtype=out.dtype)
    for slot, start, end in batch.segments:
        torch.mm(rows[start:end] @ lora_a[slot].T, lora_b[slot].T, out=delta[start:end])
    out.index_add_(0, batch.perm, delta)


def wrap_model(model: nn.Module, num_slots: int, max_rank: int) -> tuple[LoRABatch, list[LoRALinear]]:
    """Wrap every targetable linear of a loaded Llama-family model; the batch they share and the wrappers."""
    batch = LoRABatch()
    wrapped = []
    for layer_id, layer in enumerate(model.layers):
        for (block_name, attr), module_names in FUSED_PARTS.items():
            block = getattr(layer, block_name)
            base = getattr(block, attr, None)
            if not isinstance(base, PackableLinear):
                raise ValueError(f"layer {layer_id} has no dense {block_name}.{attr}: LoRA serves dense Llama-family models")
            lora = LoRALinear(base, module_names, layer_id, batch, num_slots, max_rank)
            setattr(block, attr, lora)
            wrapped.append(lora)
    return batch, wrapped
