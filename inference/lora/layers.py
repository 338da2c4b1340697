"""LoRA on the model's linears: base output plus each token's adapter delta.

`wrap_model` replaces every decoder layer's qkv_proj, o_proj, gate_up_proj
and down_proj by a `LoRALinear` around it (after the weights are loaded, so
checkpoint names are untouched). Each holds, for its `num_loras` adapter
slots (`max_loras`),

    lora_a   [num_parts, num_loras, max_rank, in_features]   (A, as PEFT stores it)
    lora_b_t [out_features, num_loras, max_rank]             (B, output rows first)

where the parts are a fused linear's modules (q, k, v or gate, up; one for
o and down). A part's B is the rows of `lora_b_t` that are its output rows,
so no part ever multiplies another's zeros. A smaller rank is zero-padded
to `max_rank`, so ranks mix freely in one batch. The scaling is folded into
B at load. Token slot s >= 1 reads row s - 1 of the stacks; slot 0 means "no
adapter" and is masked, never stored (a zero slot would cost its bytes in
every step's matmuls).

Tensor parallelism shards as the layer does (`_shard`): a column-parallel
layer keeps its output rows of each part's B (A whole), a row-parallel one
its input columns of A (B whole); the row-parallel delta joins the partial
sum before the layer's all-reduce (see `forward`).

`LoRABatch` says which slot each token reads this step: `token_slots` is a
view of the persistent step buffer, which the Triton kernels read on the
device, so a captured CUDA graph replays with new slots. On the CPU, where
each small torch op (and each parallel region's fork/join) costs more than
its arithmetic, a LoRA linear is one C++ call whatever the adapter mix
(`kernels/cpu/lora.cpp`): the base product together with every token times
the A of every slot and part (`lora_a` viewed as [parts * slots * rank, in]),
the shrink zeroed where the slot is not the token's, then each part's rows
of `lora_b_t` (viewed as [rows, slots * rank]) times its columns of the
shrink, added into its output columns; all on packed copies like the base
weights (`kernels/cpu_linear.py`), re-packed whenever a slot changes. Unused
slots cost arithmetic, not ops; slots are few. Without packed copies (not
float32, or a chunk past `MAX_ROWS`) the same runs as torch ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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
class OutPart:
    """One fused part's output rows in this rank's layer, and where they start in its checkpoint tensor."""

    row: int
    num_rows: int
    checkpoint_row: int


@dataclass(slots=True)
class LoRABatch:
    """The adapter slot of each token in this step; `token_slots` None when no token uses one."""

    token_slots: torch.Tensor | None = None  # int32 [num_padded_tokens]: 0 none, s >= 1 stack row s - 1
    masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # CPU path, per step

    def set(self, token_slots: torch.Tensor | None) -> None:
        """This step's per-token slots (a device view; None: no token uses an adapter)."""
        self.token_slots = token_slots
        self.masks = {}

    def mask(self, num_loras: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """[tokens, num_loras * rank]: 1 in the column block of the token's slot, else 0 (all 0 for slot 0)."""
        mask = self.masks.get((num_loras, rank))
        if mask is None:
            slots = torch.arange(1, num_loras + 1, device=self.token_slots.device)
            one_hot = (self.token_slots[:, None] == slots[None, :]).to(dtype)
            mask = self.masks[(num_loras, rank)] = one_hot.repeat_interleave(rank, dim=1)
        return mask


class LoRALinear(nn.Module):
    def __init__(self, base: PackableLinear, module_names: tuple[str, ...], layer_id: int, batch: LoRABatch,
                 num_loras: int, max_rank: int) -> None:
        super().__init__()
        self.base = base
        self.module_names = module_names
        self.layer_id = layer_id
        self.batch = batch
        self.row_parallel = isinstance(base, RowParallelLinear)
        self.out_parts = _out_parts(base)
        weight = base.weight
        self.register_buffer("lora_a", torch.zeros(len(module_names), num_loras, max_rank, base.in_features,
                                                   dtype=weight.dtype, device=weight.device), persistent=False)
        self.register_buffer("lora_b_t", torch.zeros(base.out_features, num_loras, max_rank, dtype=weight.dtype,
                                                     device=weight.device), persistent=False)
        # The CPU kernel's packed copies of the views linear_lora_masked multiplies by (A whole, B per part).
        self.packed_a: torch.Tensor | None = None
        self.packed_b: list[torch.Tensor | None] = [None] * len(module_names)

    def set_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        """Write `adapter`'s weights for this linear into `slot` >= 1 (zeros for untargeted parts and
        past its rank); call `repack` once the step's slots are all written."""
        row = slot - 1
        self.lora_a[:, row].zero_()
        self.lora_b_t[:, row].zero_()
        r = adapter.rank
        for p, (name, part) in enumerate(zip(self.module_names, self.out_parts)):
            pair = adapter.weights.get((self.layer_id, name))
            if pair is not None:
                a, b = self._shard(*pair, part)
                self.lora_a[p, row, :r].copy_(a)
                self.lora_b_t[part.row : part.row + part.num_rows, row, :r].copy_(b)

    def _shard(self, a: torch.Tensor, b: torch.Tensor, part: OutPart) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of a part's full (A [r, in], B [out, r]), split as the base weight is."""
        base = self.base
        if self.row_parallel:
            return a[:, base.input_start : base.input_start + base.in_features], b
        return a, b[part.checkpoint_row : part.checkpoint_row + part.num_rows]

    def repack(self) -> None:
        """Refresh the packed copies after slots changed."""
        if self.lora_a.dtype != torch.float32:  # lora.cpp is float32 only: bf16 LoRA layers run as torch ops
            return
        num_parts, num_loras, rank, in_features = self.lora_a.shape
        width = num_loras * rank
        self.packed_a = cpu_linear.pack_weight(self.lora_a.view(num_parts * width, in_features))
        self.packed_b = [cpu_linear.pack_weight(self.lora_b_t[p.row : p.row + p.num_rows].view(p.num_rows, width))
                         for p in self.out_parts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        token_slots = self.batch.token_slots
        # Row-parallel: this rank's A columns give a partial y, and B y_rank joins the partial output
        # before the all-reduce below, whose sum is B (sum of y_rank): no collective of the LoRA's own
        # (an all-reduce of y would add one a layer, and B y would still be computed on every rank).
        if token_slots is None:
            out = cpu_linear.linear(x, base.weight, base.bias, base.packed_weight, base.onednn_weight)
        elif x.device.type == "cpu":
            out = linear_lora_masked(x, base, self.lora_a, self.lora_b_t, self.out_parts, self.batch,
                                     self.packed_a, self.packed_b)
        else:
            out = cpu_linear.linear(x, base.weight, base.bias, base.packed_weight, base.onednn_weight)
            add_lora_kernels(x, self.lora_a, self.lora_b_t, self.out_parts, token_slots, out)
        return group.all_reduce(out) if self.row_parallel else out


def _out_parts(base: PackableLinear) -> list[OutPart]:
    if isinstance(base, ColumnParallelLinear):
        rows = [size for _, size in base.parts]
        firsts = [sum(rows[:i]) for i in range(len(rows))]
        return [OutPart(first, size, start) for first, (start, size) in zip(firsts, base.parts)]
    return [OutPart(0, base.out_features, 0)]


def linear_lora_masked(x: torch.Tensor, base: nn.Linear, lora_a: torch.Tensor, lora_b_t: torch.Tensor,
                       out_parts: list[OutPart], batch: LoRABatch, packed_a: torch.Tensor | None = None,
                       packed_b: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """base(x), plus B[slot_t] (A[slot_t] x[t]) in row t, part by part: every slot at once, the others
    masked to 0. With packed copies (see `LoRALinear.repack`), one C++ call; else torch ops.

    `lora_a` [parts, slots, rank, in] and `lora_b_t` [out, slots, rank], both contiguous."""
    num_parts, num_loras, rank, in_features = lora_a.shape
    packed = getattr(base, "packed_weight", None)
    if packed is not None and packed_a is not None and packed_b and x.shape[0] <= cpu_linear.MAX_ROWS:
        return cpu_linear.lora_linear(x, packed, base.bias, packed_a, packed_b, [p.num_rows for p in out_parts],
                                      batch.token_slots, num_loras, rank)
    width = num_loras * rank
    out = F.linear(x, base.weight, base.bias)
    y = F.linear(x, lora_a.view(num_parts * width, in_features))
    y.view(-1, num_parts, width).mul_(batch.mask(num_loras, rank, y.dtype)[:, None, :])
    for p, part in enumerate(out_parts):
        rows = slice(part.row, part.row + part.num_rows)
        out[:, rows] += F.linear(y[:, p * width : (p + 1) * width], lora_b_t[rows].view(part.num_rows, width))
    return out


def add_lora_kernels(x: torch.Tensor, lora_a: torch.Tensor, lora_b_t: torch.Tensor, out_parts: list[OutPart],
                     token_slots: torch.Tensor, out: torch.Tensor) -> None:
    """The same delta through the Triton kernels, one shrink and one expand a part (device tensors)."""
    rank = lora_a.shape[2]
    y = torch.empty(x.shape[0], len(out_parts) * rank, dtype=torch.float32, device=x.device)
    for p, part in enumerate(out_parts):
        rows = slice(part.row, part.row + part.num_rows)
        y_part = kernels.lora_shrink(x, lora_a[p], token_slots, y[:, p * rank : (p + 1) * rank])
        kernels.lora_expand(y_part, lora_b_t[rows].permute(1, 2, 0), token_slots, out[:, rows])


def wrap_model(model: nn.Module, num_loras: int, max_rank: int) -> tuple[LoRABatch, list[LoRALinear]]:
    """Wrap every targetable linear of a loaded Llama-family model; the batch they share and the wrappers."""
    batch = LoRABatch()
    wrapped = []
    for layer_id, layer in enumerate(model.layers):
        for (block_name, attr), module_names in FUSED_PARTS.items():
            block = getattr(layer, block_name)
            base = getattr(block, attr, None)
            if not isinstance(base, PackableLinear):
                raise ValueError(f"layer {layer_id} has no dense {block_name}.{attr}: LoRA serves dense Llama-family models")
            lora = LoRALinear(base, module_names, layer_id, batch, num_loras, max_rank)
            setattr(block, attr, lora)
            wrapped.append(lora)
    return batch, wrapped
