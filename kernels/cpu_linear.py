"""Linear layers on the CPU through the C++ kernel's packed weights, for batches up to 512 rows.

torch's float32 `F.linear` on the CPU calls MKL's gemm, which re-packs the
weight on every call; oneDNN through torch (`mkldnn._linear_pointwise`)
keeps a packed weight but costs 25-45 us per call before any arithmetic,
and a SmolLM2-135M decode step makes ~120 linear calls. `kernels/cpu/linear.cpp`
packs each float32 weight once into column panels and runs a register-tiled
FMA loop on it, with a few microseconds per call. Measured on a 2-core EPYC
(AVX2), one call took 0.5-0.9x oneDNN's time and 0.3-0.8x MKL's at 1-48 rows
for every SmolLM2 shape, and 0.8-1.0x MKL's at 512-2048 rows (also for 4096-
and 14336-wide inputs). Batches up to MAX_ROWS, the CPU's default token budget
per step, take the kernel; larger ones stay on `F.linear` (the kernel does not
block its input rows for the cache), so the original weight stays too: the
packed copy doubles the weight memory of the float32 CPU path, which the model
runner reports.

bfloat16 weights, on CPUs with AVX512-BF16 (`has_bf16_kernel`), are packed
for `kernels/cpu/linear_bf16.cpp` instead: pairs of k per 32-bit lane for
`_mm512_dpbf16_ps`, float32 sums, one rounding to bf16. Against torch's bf16
F.linear (oneDNN) on a 2-vCPU EPYC Zen 5, one call took 0.2-0.5x its time at
1-4 rows, 0.4-0.8x at 16-128 and 0.7-0.96x at 512 on every SmolLM2 shape
(`python -m bench.cpu_linear_bf16`); elsewhere bf16 stays on F.linear.

On a CPU with AMX-BF16, bf16 batches of ONEDNN_MIN_ROWS rows or more run
oneDNN's packed primitive instead (`mkldnn._linear_pointwise` on a weight
reordered once by `mkldnn._reorder_linear_weight`), which multiplies on AMX
tiles: the issue's alternative to hand-written tile code. Its per-call cost
(above) matters less once a batch has rows to fill a tile; smaller batches
stay on the AVX512-BF16 kernel, bound by reading the weight. This split is
not yet measured on an AMX CPU (`python -m bench.cpu_linear_bf16` times all
three paths); PAGEDINFER_CPU_BF16_LINEAR=onednn takes it on any CPU whose
oneDNN has bf16, and =kernel keeps AMX CPUs on the AVX512-BF16 kernel alone.

`lora_linear` is a LoRA layer (base, shrink, mask, expands) in one C++ call.

Invariants: a packed weight is a function of its weight alone (re-pack after
the weight changes); `linear` gives F.linear's result up to float32 rounding
(the kernel sums in another order; bf16: rounding its float32 sum once), never a
different shape or dtype.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from kernels import cpu_ops

# Row counts that take the packed weight: every step of the default token budget
# (EngineConfig's CPU max_num_batched_tokens); prompt chunks there ran 6% faster offline.
# The bf16 kernel was faster than bf16 F.linear up to 512 rows on every SmolLM2 shape too.
MAX_ROWS = 512
# "0" keeps bf16 weights unpacked, on F.linear (bench/cpu_step.py compares the two); "kernel" and
# "onednn" pick the path of batches of ONEDNN_MIN_ROWS rows or more, which by default ("1") is
# oneDNN's on a CPU with AMX-BF16 and the AVX512-BF16 kernel's elsewhere.
CPU_BF16_LINEAR_ENV = "PAGEDINFER_CPU_BF16_LINEAR"
# An AMX tile holds 16 rows: fewer leave it part empty, and the kernel's GEMV is bound by the weight's reads.
ONEDNN_MIN_ROWS = 16


def _bf16_mode() -> str:
    return os.environ.get(CPU_BF16_LINEAR_ENV, "1")


@functools.cache
def has_bf16_kernel() -> bool:
    """Whether the C++ ops hold the AVX512-BF16 kernel (built for a CPU with the
    instructions) and PAGEDINFER_CPU_BF16_LINEAR is not "0"."""
    if _bf16_mode() == "0":
        return False
    return cpu_ops.available() and torch.ops.pagedinfer_cpu.has_linear_bf16()


@functools.cache
def packs_onednn() -> bool:
    """Whether bf16 weights also get oneDNN's packed copy, for batches of ONEDNN_MIN_ROWS rows or more:
    by default on a CPU with AMX-BF16, or wherever oneDNN has bf16 with PAGEDINFER_CPU_BF16_LINEAR=onednn."""
    mode = _bf16_mode()
    wanted = mode == "onednn" or (mode == "1" and "amx_bf16" in cpu_ops.cpu_info("flags").split())
    return wanted and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_onednn(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a bf16 `[out, in]` CPU weight where `packs_onednn`, else None."""
    if not (weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype == torch.bfloat16
            and packs_onednn()):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ONEDNN_MIN_ROWS)


def packs(dtype: torch.dtype) -> bool:
    """Whether CPU weights of `dtype` get packed copies: float32 with the C++ ops built,
    bfloat16 where they hold the AVX512-BF16 kernel."""
    if dtype == torch.float32:
        return cpu_ops.available()
    return dtype == torch.bfloat16 and has_bf16_kernel()


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The C++ kernel's panels of a `[out, in]` CPU weight, or None where they do not apply."""
    if not (weight.device.type == "cpu" and weight.dim() == 2 and packs(weight.dtype)):
        return None
    if weight.dtype == torch.bfloat16:
        return torch.ops.pagedinfer_cpu.pack_linear_weight_bf16(weight.detach())
    return torch.ops.pagedinfer_cpu.pack_linear_weight(weight.detach())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None, onednn: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for 2-D x: through `onednn` (`pack_onednn`) from ONEDNN_MIN_ROWS rows,
    else through `packed` up to MAX_ROWS rows."""
    if onednn is not None and x.dim() == 2 and x.shape[0] >= ONEDNN_MIN_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, onednn, bias, "none", [], "")
    if packed is None or x.dim() != 2 or x.shape[0] > MAX_ROWS:
        return F.linear(x, weight, bias)
    out = x.new_empty(x.shape[0], weight.shape[0])  # the op checks every shape, dtype and stride
    if packed.dtype == torch.bfloat16:
        torch.ops.pagedinfer_cpu.linear_bf16(x, packed, bias, out)
    else:
        torch.ops.pagedinfer_cpu.linear(x, packed, bias, out)
    return out


def lora_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, packed_a: torch.Tensor,
                packed_b: list[torch.Tensor], part_rows: list[int], token_slots: torch.Tensor, num_loras: int,
                rank: int) -> torch.Tensor:
    """A LoRA linear's base product plus each token's masked adapter delta, in one call of the C++ op
    (`kernels/cpu/lora.cpp` states the layout); the caller checks `x` has at most MAX_ROWS rows."""
    out = torch.empty(x.shape[0], sum(part_rows))
    y = torch.empty(x.shape[0], len(part_rows) * num_loras * rank)
    torch.ops.pagedinfer_cpu.lora_linear(x, packed, bias, packed_a, packed_b, part_rows, token_slots, rank, out, y)
    return out
