"""Triton RMSNorm, optionally fused with the residual add that precedes it.

    rms_norm(x, weight, eps, out=None) -> out
    fused_add_rms_norm(x, residual, weight, eps) -> (out, residual_out)

`residual_out = x + residual` and `out = weight * rms_normalize(residual_out)`.
(The file is not called `rms_norm.py`: importing a submodule binds it on the
package, and `kernels.rms_norm` must stay the public function.)

Kernel invariants:
- Rows are the last dim of a 2-D `[num_rows, hidden]` or 3-D
  `[num_tokens, num_heads, head_dim]` tensor (Qwen3's per-head q/k norm runs on
  slices of the fused qkv output). One program per token normalises all its
  heads as one [BLOCK_H, BLOCK_D] tile (a 2-D input is one head per token), so
  a decode step of small heads is not one tiny program per head.
- Only the last dim must be contiguous; token and head strides are arguments.
- A program reads all of its rows before it writes any, and no two programs
  share a row, so `out` may be `x` itself (in place).
- Same rounding points as the reference: the residual sum is rounded to the
  input dtype before it is normalised, the normalised value is rounded to the
  input dtype before the weight multiply, and the product is rounded again.
  Everything in between is float32; only the sum-of-squares order differs.
- Token offsets are int64: large activations overflow int32 addresses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import check_float, check_last_dim_contiguous, check_same_device, next_power_of_2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    num_heads,
    eps,
    stride_x_tok,
    stride_x_head,
    stride_r_tok,
    stride_r_head,
    stride_o_tok,
    stride_o_head,
    stride_ro_tok,
    stride_ro_head,
    HIDDEN: tl.constexpr,  # constexpr: the mean divides by it and a runtime bound would stop vectorised loads
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (dims < HIDDEN)
    dtype = out_ptr.dtype.element_ty

    x = tl.load(x_ptr + tok * stride_x_tok + heads * stride_x_head + dims, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        r = tl.load(residual_ptr + tok * stride_r_tok + heads * stride_r_head + dims, mask=mask, other=0.0)
        x = (x + r.to(tl.float32)).to(dtype)
        tl.store(residual_out_ptr + tok * stride_ro_tok + heads * stride_ro_head + dims, x, mask=mask)
        x = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / HIDDEN + eps)  # masked lanes add 0
    normed = (x * inv_rms[:, None]).to(dtype).to(tl.float32)
    w = tl.load(weight_ptr + dims, mask=dims < HIDDEN, other=0.0).to(tl.float32)
    tl.store(out_ptr + tok * stride_o_tok + heads * stride_o_head + dims, (normed * w).to(dtype), mask=mask)


def _check_like_x(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    assert t.shape == x.shape, f"{name} {tuple(t.shape)} != x {tuple(x.shape)}"
    assert t.dtype == x.dtype, f"{name} is {t.dtype}, x is {x.dtype}"
    check_same_device(x.device, **{name: t})
    check_last_dim_contiguous(name, t)


def _strides(t: torch.Tensor) -> tuple[int, int]:
    """(token, head) strides; a 2-D tensor is one head per token."""
    return (t.stride(0), t.stride(1)) if t.dim() == 3 else (t.stride(0), 0)


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    residual_out: torch.Tensor | None,
) -> None:
    assert x.dim() in (2, 3), f"x must be [rows, hidden] or [tokens, heads, head_dim], got {tuple(x.shape)}"
    check_float("x", x)
    check_last_dim_contiguous("x", x)
    hidden = x.shape[-1]
    assert weight.shape == (hidden,), f"weight must be [{hidden}], got {tuple(weight.shape)}"
    assert weight.dtype == x.dtype, f"weight is {weight.dtype}, x is {x.dtype}"
    check_last_dim_contiguous("weight", weight)
    check_same_device(x.device, weight=weight)
    for name, t in (("residual", residual), ("out", out), ("residual_out", residual_out)):
        if t is not None:
            _check_like_x(name, t, x)
    num_tokens = x.shape[0]
    num_heads = x.shape[1] if x.dim() == 3 else 1
    if num_tokens == 0 or num_heads == 0:
        return
    block_h, block_d = next_power_of_2(num_heads), next_power_of_2(hidden)
    # ~16 fp32 values per thread: a 4096-wide row gets 8 warps, a 128-wide head 1.
    num_warps = min(16, max(1, block_h * block_d // 512))
    # Without a residual the residual pointers are never read; x stands in for them.
    res, res_out = (residual, residual_out) if residual is not None else (x, x)
    _rms_norm_kernel[(num_tokens,)](
        x, res, weight, out, res_out, num_heads, eps,
        *_strides(x), *_strides(res), *_strides(out), *_strides(res_out),
        HIDDEN=hidden, BLOCK_H=block_h, BLOCK_D=block_d, ADD_RESIDUAL=residual is not None,
        num_warps=num_warps,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMS-normalise the last dim of `x` and scale by `weight`; `out=x` normalises in place."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass over memory."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, out, residual_out)
    return out, residual_out
