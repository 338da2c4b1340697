"""Triton rotary embedding (rotate-half / NeoX style, as in HF Llama), applied to q and k in place.

    apply_rotary_embedding(query, key, positions, cos_sin_cache) -> None

`cos_sin_cache` is `[max_positions, head_dim]`, float32 (or already in the
q/k dtype: it is rounded to that dtype at use either way): row p holds
`cos(p * inv_freq) * attention_scaling` in its first half and the matching
sin in its second (the two halves of HF's duplicated cos/sin are equal, so
each is stored once). With `x = [x1, x2]` split at head_dim / 2:
`x1' = x1 * cos - x2 * sin`, `x2' = x2 * cos + x1 * sin`.

Kernel invariants:
- One program per token rotates all q heads and all k heads of that token
  (one launch for both), as [BLOCK_H, BLOCK_HALF] tiles padded to powers of
  two and masked.
- `0 <= positions[i] < max_positions` is the caller's contract (the engine
  caps sequences at `max_position_embeddings`); it is not checked on the host,
  which would need a device sync.
- In place is safe: a program reads both halves of its rows before writing,
  and no two programs share a row. q and k may be views into one fused qkv
  tensor: only the last dim must be contiguous, the other strides are passed.
- cos/sin are rounded to the q/k dtype after the load, like the reference,
  and the arithmetic is float32, cast to the q/k dtype at the store.
- head_dim is even and a constexpr (one compile per model).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import check_float, check_index, check_last_dim_contiguous, check_rank, next_power_of_2


@triton.jit
def _rotate_heads(ptr, tok, stride_tok, stride_head, num_heads, cos, sin,
                  BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (dims < HALF)
    first = ptr + tok * stride_tok + heads * stride_head + dims
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = ptr.dtype.element_ty
    tl.store(first, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_embedding_kernel(
    query_ptr,
    key_ptr,
    positions_ptr,
    cos_sin_cache_ptr,
    num_heads,
    num_kv_heads,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_cache_pos,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    # In bounds: one program per token. A [1, 1] block, not a scalar, as in kv_store.
    pos = tl.load(positions_ptr + tok + tl.zeros([1, 1], dtype=tl.int64))
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    row = cos_sin_cache_ptr + pos * stride_cache_pos + dims
    dtype = query_ptr.dtype.element_ty
    cos = tl.load(row, mask=dims < HALF, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(row + HALF, mask=dims < HALF, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(query_ptr, tok, stride_q_tok, stride_q_head, num_heads, cos, sin, BLOCK_HQ, HALF, BLOCK_HALF)
    _rotate_heads(key_ptr, tok, stride_k_tok, stride_k_head, num_kv_heads, cos, sin, BLOCK_HK, HALF, BLOCK_HALF)


def apply_rotary_embedding(
    query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Rotate `query[i]` and `key[i]` in place by the angles of position `positions[i]`."""
    for name, t in (("query", query), ("key", key)):
        check_rank(name, t, 3)
        check_float(name, t)
        check_last_dim_contiguous(name, t)
    num_tokens, num_heads, head_dim = query.shape
    assert key.shape[0] == num_tokens and key.shape[2] == head_dim, (
        f"key {tuple(key.shape)} does not match query {tuple(query.shape)}"
    )
    assert key.dtype == query.dtype and key.device == query.device, "query and key differ in dtype or device"
    assert head_dim % 2 == 0, f"rotate-half needs an even head_dim, got {head_dim}"
    check_rank("cos_sin_cache", cos_sin_cache, 2)
    check_float("cos_sin_cache", cos_sin_cache)
    assert cos_sin_cache.shape[1] == head_dim, f"cos_sin_cache rows are {cos_sin_cache.shape[1]} wide, not {head_dim}"
    assert cos_sin_cache.device == query.device, f"cos_sin_cache is on {cos_sin_cache.device}, query on {query.device}"
    check_last_dim_contiguous("cos_sin_cache", cos_sin_cache)
    check_index("positions", positions, torch.int64, 1, query.device)
    assert positions.shape[0] == num_tokens, "positions needs one entry per token"
    if num_tokens == 0:
        return

    half = head_dim // 2
    _rotary_embedding_kernel[(num_tokens,)](
        query, key, positions, cos_sin_cache, num_heads, key.shape[1],
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos_sin_cache.stride(0),
        BLOCK_HQ=next_power_of_2(num_heads), BLOCK_HK=next_power_of_2(key.shape[1]),
        HALF=half, BLOCK_HALF=next_power_of_2(half),
    )
