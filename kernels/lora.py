"""Triton LoRA shrink and expand, Punica's BGMV pattern: one adapter per token.

    lora_shrink(x, lora_a, token_slots, out=None) -> out
    lora_expand(y, lora_b, token_slots, out) -> None

- `x` `[num_tokens, in_features]`; `lora_a` `[num_loras, width, in_features]`;
  shrink writes `out[t] = lora_a[token_slots[t] - 1] @ x[t]`, float32
  `[num_tokens, width]`, any row stride (the engine writes each fused part
  into its columns of one buffer).
- `y` float32 `[num_tokens, width]`; `lora_b` `[num_loras, width,
  out_features]` (B transposed), any strides (the engine passes a permuted
  view of its `[out_features, num_loras, width]` store); expand adds
  `y[t] @ lora_b[token_slots[t] - 1]` to row t of `out` `[num_tokens,
  out_features]` (the base layer's output, or a part's columns of it, in its
  dtype).
- `token_slots` int32 `[num_tokens]`: slot s >= 1 reads row s - 1 of the
  stacks; slot 0 means "no adapter" and reads nothing: shrink writes zeros
  for such rows, expand leaves them untouched.

Kernel invariants:
- Shrink grid (num_tokens, cdiv(width, BLOCK_R)): each program reduces over
  `in_features` in BLOCK_K chunks for BLOCK_R rows of A. Expand grid
  (num_tokens, cdiv(out_features, BLOCK_N)) reduces over the width in
  BLOCK_W chunks (at most 64 wide: 128 took 254 registers a thread on sm_80, 1024 spilled).
- Products accumulate in float32; expand rounds once, at the store of
  `out + delta`, as the reference does.
- The grids depend on the shapes only, never on slot values, and the slots
  are read on the device: a CUDA graph replays with new `token_slots`.
- Slot and token offsets are int64: stacked adapters overflow int32 addresses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import check_float, check_index, check_last_dim_contiguous, check_rank, next_power_of_2

_BLOCK_K = 128
_BLOCK_N = 64
_MAX_BLOCK_W = 64


@triton.jit
def _token_tile(slots_ptr, num_rows, BLOCK: tl.constexpr):
    """This program's token, its stack row, the BLOCK rows it covers, and which of them to compute."""
    tok = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    active = slot != 0
    # Slot s's weights are row s - 1 of the stacks; slot 0's program reads nothing (all loads masked).
    return tok, rows, tl.maximum(slot - 1, 0), active, (rows < num_rows) & active


@triton.jit
def _matvec_rows(m_ptr, stride_row, stride_col, v_ptr, rows, row_mask, num_cols, active, BLOCK: tl.constexpr):
    """float32 sum over cols of m[rows, col] * v[col], BLOCK columns at a time (m read only under row_mask)."""
    acc = tl.zeros(rows.shape, dtype=tl.float32)
    for c0 in range(0, num_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        col_mask = cols < num_cols
        v = tl.load(v_ptr + cols, mask=col_mask & active, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(m * v[None, :], axis=1)
    return acc


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, slots_ptr, out_ptr,
    width, in_features,
    stride_x_tok, stride_a_slot, stride_a_row, stride_o_tok,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tok, rows, slot, active, row_mask = _token_tile(slots_ptr, width, BLOCK_R)
    acc = _matvec_rows(a_ptr + slot * stride_a_slot, stride_a_row, 1, x_ptr + tok * stride_x_tok,
                       rows, row_mask, in_features, active, BLOCK_K)
    tl.store(out_ptr + tok * stride_o_tok + rows, acc, mask=rows < width)


@triton.jit
def _lora_expand_kernel(
    y_ptr, b_ptr, slots_ptr, out_ptr,
    width, out_features,
    stride_y_tok, stride_b_slot, stride_b_width, stride_b_out, stride_o_tok,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    tok, rows, slot, active, row_mask = _token_tile(slots_ptr, out_features, BLOCK_N)
    delta = _matvec_rows(b_ptr + slot * stride_b_slot, stride_b_out, stride_b_width, y_ptr + tok * stride_y_tok,
                         rows, row_mask, width, active, BLOCK_W)
    out_ptrs = out_ptr + tok * stride_o_tok + rows
    base = tl.load(out_ptrs, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (base + delta).to(out_ptr.dtype.element_ty), mask=row_mask)


def _check_slots(token_slots: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    check_index("token_slots", token_slots, torch.int32, 1, device)
    assert token_slots.shape[0] == num_tokens, f"token_slots has {token_slots.shape[0]} rows, expected {num_tokens}"


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = lora_a[token_slots[t] - 1] @ x[t] in float32 (zeros where the slot is 0)."""
    check_rank("x", x, 2)
    check_rank("lora_a", lora_a, 3)
    check_float("x", x)
    assert lora_a.dtype == x.dtype, f"lora_a is {lora_a.dtype}, x is {x.dtype}"
    check_last_dim_contiguous("x", x)
    check_last_dim_contiguous("lora_a", lora_a)
    num_tokens, in_features = x.shape
    width = lora_a.shape[1]
    assert lora_a.shape[2] == in_features, f"lora_a is {tuple(lora_a.shape)}, x has {in_features} features"
    _check_slots(token_slots, num_tokens, x.device)
    if out is None:
        out = torch.empty(num_tokens, width, dtype=torch.float32, device=x.device)
    check_rank("out", out, 2)
    assert out.dtype == torch.float32 and tuple(out.shape) == (num_tokens, width), (
        f"out must be float32 {(num_tokens, width)}, got {out.dtype} {tuple(out.shape)}")
    check_last_dim_contiguous("out", out)
    if num_tokens == 0 or width == 0:
        return out
    block_r = min(next_power_of_2(width), 64)
    _lora_shrink_kernel[(num_tokens, triton.cdiv(width, block_r))](
        x, lora_a, token_slots, out, width, in_features,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), out.stride(0),
        BLOCK_R=block_r, BLOCK_K=_BLOCK_K,
    )
    return out


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor) -> None:
    """out[t] += y[t] @ lora_b[token_slots[t] - 1] (rows with slot 0 untouched)."""
    check_rank("y", y, 2)
    check_rank("lora_b", lora_b, 3)
    check_rank("out", out, 2)
    assert y.dtype == torch.float32, f"y must be float32 (lora_shrink's output), got {y.dtype}"
    check_float("lora_b", lora_b)
    assert out.dtype == lora_b.dtype, f"out is {out.dtype}, lora_b is {lora_b.dtype}"
    for name, tensor in (("y", y), ("out", out)):
        check_last_dim_contiguous(name, tensor)
    num_tokens, width = y.shape
    out_features = lora_b.shape[2]
    assert lora_b.shape[1] == width, f"lora_b is {tuple(lora_b.shape)}, y has width {width}"
    assert tuple(out.shape) == (num_tokens, out_features), f"out is {tuple(out.shape)}, expected {(num_tokens, out_features)}"
    _check_slots(token_slots, num_tokens, y.device)
    if num_tokens == 0 or width == 0 or out_features == 0:
        return
    _lora_expand_kernel[(num_tokens, triton.cdiv(out_features, _BLOCK_N))](
        y, lora_b, token_slots, out, width, out_features,
        y.stride(0), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), out.stride(0),
        BLOCK_N=_BLOCK_N, BLOCK_W=min(next_power_of_2(width), _MAX_BLOCK_W),
    )
