"""Triton SiLU-and-mul, the gated activation of the Llama MLP.

    silu_and_mul(x) -> out

`x` is `[num_tokens, 2 * intermediate]`, gate first, then up (the fused
gate_up projection's layout); `out[t] = silu(gate[t]) * up[t]`.

Kernel invariants:
- Grid (num_tokens, cdiv(intermediate, BLOCK)): each program covers BLOCK
  columns of one token, masked past `intermediate`.
- Only the last dim of x and out must be contiguous; row strides are passed.
- Same rounding points as the reference (`F.silu(gate) * up` in the input
  dtype): silu is computed in float32 and rounded to the input dtype, then
  multiplied by `up` in float32 and rounded again at the store.
- Token offsets are int64: large activations overflow int32 addresses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import check_float, check_last_dim_contiguous, check_rank

# 1024 columns (4 warps x 8 values a thread): a 14336-wide MLP is 14 programs a token.
_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    intermediate,
    stride_x_tok,
    stride_o_tok,
    BLOCK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + tok * stride_x_tok + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + tok * stride_x_tok + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + tok * stride_o_tok + cols, (silu * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :n]) * x[:, n:] for n = x.shape[1] // 2."""
    check_rank("x", x, 2)
    check_float("x", x)
    check_last_dim_contiguous("x", x)
    num_tokens, width = x.shape
    assert width % 2 == 0, f"x must be [num_tokens, 2 * intermediate], got width {width}"
    intermediate = width // 2
    out = torch.empty(num_tokens, intermediate, dtype=x.dtype, device=x.device)
    if num_tokens == 0 or intermediate == 0:
        return out
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(intermediate, _BLOCK))](
        x, out, intermediate, x.stride(0), out.stride(0), BLOCK=_BLOCK,
    )
    return out
