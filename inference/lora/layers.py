"""LoRA on the model's linears: base output plus each token's adapter delta.

`wrap_model` replaces every decoder layer's qkv_proj, o_proj, gate_up_proj
and down_proj by a `LoRALinear` around it (after the weights are loaded, so
checkpoint names are untouched). Each holds, for every slot,

    lora_a [num_slots, width, in_features]    (A, as PEFT stores it)
    lora_b [num_slots, width, out_features]   (B transposed: a view of
                                               `lora_b_t` [out_features, num_slots, width])

with width = num_parts * max_rank: a fused linear's parts (q, k, v or gate,
up) each own `max_rank` rows: part p's A rows are p*max_rank.., and its B is
block-diagonal (its own output columns read only its own rows). A smaller rank is zero-padded, so
ranks mix freely in one batch. The scaling is folded into B at load. Slot 0
stays all zeros: "no adapter".

Tensor parallelism shards as the layer does: a column-parallel layer keeps
its rows of B (A whole), a row-parallel one its columns of A (B whole), and
the delta joins the partial sum before the all-reduce.

`LoRABatch` says which slot each token reads this step. The runner sets it
before the forward: `token_slots` is a view of the persistent step buffer
(what the Triton kernels read, so a captured graph replays with new slots).
On the CPU, where each small torch op costs more than its arithmetic, the
delta is four ops whatever the adapter mix: every token times the A of
every slot (one `F.linear` over all slots' rows, `lora_a` viewed as
[num_slots * width, in]), zeroed where the slot is not the token's (a 0/1
mask made once per step and width), one `F.linear` with all slots' B
(`lora_b_t` viewed as [out, num_slots * width]), added to the output; both
matmuls run on packed copies like the base weights (`kernels/cpu_linear.py`),
re-packed whenever a slot changes. Unused slots cost arithmetic, not ops;
slots are few (`max_loras + 1`).
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
    """The adapter slot of each token in this step; `token_slots` None when no token uses one."""

    token_slots: torch.Tensor | None = None  # int32 [num_padded_tokens], 0 = none
    masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # CPU path, per step

    def set(self, token_slots: torch.Tensor, host_slots: np.ndarray) -> None:
        """This step's per-token slots (device view) and their host copy."""
        self.token_slots = token_slots if host_slots.any() else None
        self.masks = {}

    def mask(self, num_slots: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[tokens, num_slots * width]: 1 in the column block of the token's slot, else 0."""
        mask = self.masks.get((num_slots, width))
        if mask is None:
            slots = torch.arange(num_slots, device=self.token_slots.device)
            one_hot = (self.token_slots[:, None] == slots[None, :]).to(dtype)
            mask = self.masks[(num_slots, width)] = one_hot.repeat_interleave(width, dim=1)
        return mask


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
        self.register_buffer("lora_b_t", torch.zeros(base.out_features, num_slots, width, dtype=weight.dtype,
                                                     device=weight.device), persistent=False)

        # The CPU kernel's packed copies of the two views add_lora_masked multiplies by.
        self.packed_a: torch.Tensor | None = None
        self.packed_b: torch.Tensor | None = None

    @property
    def lora_b(self) -> torch.Tensor:
        """[num_slots, width, out_features], a strided view."""
        return self.lora_b_t.permute(1, 2, 0)

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
        """Write `adapter`'s weights for this linear into `slot` (zeros for None or untargeted parts);
        call `repack` once the step's slots are all written."""
        self.lora_a[slot].zero_()
        self.lora_b_t[:, slot].zero_()
        if adapter is not None:
            self._copy_adapter(slot, adapter)

    def repack(self) -> None:
        """Refresh the packed copies after slots changed."""
        num_slots, width, in_features = self.lora_a.shape
        self.packed_a = cpu_linear.pack_weight(self.lora_a.view(num_slots * width, in_features))
        self.packed_b = cpu_linear.pack_weight(self.lora_b_t.view(-1, num_slots * width))

    def _copy_adapter(self, slot: int, adapter: LoRAAdapter) -> None:
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
            ranks = slice(p * self.max_rank, p * self.max_rank + r)
            self.lora_a[slot, ranks].copy_(a)
            self.lora_b_t[row : row + rows, slot, ranks].copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        out = cpu_linear.linear(x, base.weight, base.bias, base.packed_weight)
        batch = self.batch
        if batch.token_slots is not None:
            if x.device.type == "cpu":
                add_lora_masked(x, self.lora_a, self.lora_b_t, batch, out, self.packed_a, self.packed_b)
            else:
                y = kernels.lora_shrink(x, self.lora_a, batch.token_slots)
                kernels.lora_expand(y, self.lora_b, batch.token_slots, out)
        return group.all_reduce(out) if self.row_parallel else out


def add_lora_masked(x: torch.Tensor, lora_a: torch.Tensor, lora_b_t: torch.Tensor, batch: LoRABatch,
                    out: torch.Tensor, packed_a: torch.Tensor | None = None,
                    packed_b: torch.Tensor | None = None) -> None:
    """out[t] += B[slot_t] (A[slot_t] x[t]) in four ops: all slots at once, the others masked to 0.

    `lora_a` [num_slots, width, in], `lora_b_t` [out, num_slots, width], both contiguous; `packed_*`
    their `cpu_linear` packed views, or None."""
    num_slots, width, in_features = lora_a.shape
    y = cpu_linear.linear(x, lora_a.view(num_slots * width, in_features), None, packed_a)
    y.mul_(batch.mask(num_slots, width, y.dtype))
    out.add_(cpu_linear.linear(y, lora_b_t.view(lora_b_t.shape[0], num_slots * width), None, packed_b))


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
