"""Linear layers on the CPU with oneDNN-packed weights for mid-size batches.

torch's float32 `F.linear` on the CPU calls a BLAS gemm that re-packs the
weight on every call; at the row counts of a decode step (8-256 rows) that
repacking is a large share of the time. oneDNN can keep the weight in its
blocked layout once (`torch.ops.mkldnn._reorder_linear_weight`) and run
`_linear_pointwise` on it: measured on a 2-core AVX-512 Xeon, a SmolLM2-135M
decode step at batch 16 took 20% less time (interleaved A/B in one process).
At prompt-sized chunks the plain gemm is as fast, and on Intel CPUs also below
8 rows, so the original weight stays and serves them: the packed copy doubles
the weight memory of the float32 CPU path, which the model runner reports.

Invariants: a packed weight is a function of its weight alone (re-pack after
the weight changes); `linear` gives F.linear's result up to float32 rounding
(oneDNN sums in another order), never a different shape or dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.cpu_ops import cpu_info

# Row counts that take the packed weight. Above a few hundred both are
# compute-bound alike. Below 8 rows torch's gemm (MKL, which picks its fast
# code by CPU vendor) is faster on Intel CPUs (e.g. 19 against 56 us for
# [1, 576] x [576, 576] on a Xeon) but not on AMD's, where the packed weight
# wins from one row: a 2-core EPYC's batch-1 decode step took 63 -> 52 ms and
# batch 4 96 -> 51 ms (interleaved in one process, SmolLM2-135M).
MIN_ROWS = 1 if cpu_info("vendor_id") == "AuthenticAMD" else 8
MAX_ROWS = 256
# What the packing is tuned for; any row count runs on the packed layout.
_PACK_BATCH_HINT = 64


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a `[out, in]` float32 CPU weight, or None where it does not apply."""
    if not (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and torch.backends.mkldnn.is_available()):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for 2-D x, through `packed` for mid-size batches."""
    if packed is not None and MIN_ROWS <= x.shape[0] <= MAX_ROWS and x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)
