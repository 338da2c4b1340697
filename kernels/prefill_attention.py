"""Triton paged attention for prefill, chunked prefill and mixed batches.

Variable-length causal attention: the queries are each request's new tokens
(rows `query_start_loc[r]:query_start_loc[r + 1]`), the keys and values come
from the paged cache and cover the earlier context plus this chunk (stored by
`store_kv` before the call). Query token j of request r sits at absolute
position `seq_lens[r] - q_len(r) + j` and sees keys at positions <= its own.
Decode rows (q_len 1) are just short requests here.

Kernel invariants:
- Grid is (cdiv(max_query_len, BLOCK_Q), num_reqs, num_kv_heads). Programs
  whose first query token is past their request's q_len return at once.
- A program's tile has BLOCK_M = BLOCK_Q * BLOCK_G rows: BLOCK_Q query tokens
  times the (power-of-two padded) GQA group of query heads that share the KV
  head, row i being token i // BLOCK_G and head i % BLOCK_G of the group. The
  group thus shares every K/V tile load, and decode rows still fill BLOCK_G
  rows of the `tl.dot`. BLOCK_M and BLOCK_N are >= 16 (`tl.dot` minimum).
- Pad rows (token past q_len, or head past the group) load zeros and are not
  stored. Every row, pad rows included, sees key position 0, so the running
  max is finite after the first tile and no exp is NaN.
- A chunk may start mid-block: keys are gathered per token (block id from
  `block_tables`, then the offset in the block), so no alignment between
  chunk, tile and cache block is assumed. Block ids of -1 are clamped to 0
  before use as addresses; positions at or past `seq_lens[r]` are masked off.
- Q/K/V tiles are converted to DOT_DTYPE right after their load: float32 in
  the interpreter (which computes 16-bit arithmetic wrongly), the 16-bit
  storage dtype on CUDA so tiles reach the tensor cores without a round trip
  through float32. Scores, softmax statistics and the accumulator are float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import check_attention_args, dot_dtype, next_power_of_2
from kernels._paged_tiles import load_kv_tile, online_softmax_update

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_attention_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel uses exp2
    group,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_kc_block,
    stride_kc_off,
    stride_kc_head,
    stride_vc_block,
    stride_vc_off,
    stride_vc_head,
    stride_bt_req,
    BLOCK_Q: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,  # constexpr: a runtime bound on d would stop vectorised loads
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # cache block size; constexpr so // and % are shifts
    DOT_DTYPE: tl.constexpr,
):
    q_tile = tl.program_id(0)
    req = tl.program_id(1)
    kv_head = tl.program_id(2)

    # In bounds: grid dim 1 is num_reqs and query_start_loc has num_reqs + 1 entries.
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    tile_start = q_tile * BLOCK_Q
    if tile_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len  # keys before this chunk

    rows = tl.arange(0, BLOCK_Q * BLOCK_G)
    tok = tile_start + rows // BLOCK_G
    g = rows % BLOCK_G
    row_mask = (tok < q_len) & (g < group)
    q_pos = context_len + tok
    heads = kv_head * group + g
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    io_mask = row_mask[:, None] & d_mask[None, :]
    q_rows = (q_start + tok).to(tl.int64)

    q_ptrs = query_ptr + (q_rows * stride_q_tok + heads * stride_q_head)[:, None] + d[None, :]
    q = tl.load(q_ptrs, mask=io_mask, other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + req.to(tl.int64) * stride_bt_req
    # The tile's last query token decides how far keys are needed (causal).
    kv_end = tl.minimum(seq_len, context_len + tile_start + BLOCK_Q)
    for start in range(0, kv_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_mask = pos < kv_end
        k, v = load_kv_tile(
            key_cache_ptr, value_cache_ptr, bt_row, pos, pos_mask, d, d_mask, kv_head,
            stride_kc_block, stride_kc_off, stride_kc_head, stride_vc_block, stride_vc_off, stride_vc_head,
            BLOCK_SIZE, DOT_DTYPE,
        )

        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = pos_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = online_softmax_update(s, v, m_i, l_i, acc, DOT_DTYPE)

    o = acc / l_i[:, None]
    o_ptrs = out_ptr + (q_rows * stride_o_tok + heads * stride_o_head)[:, None] + d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=io_mask)


def _tile_config(group: int, head_dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_G, BLOCK_N, num_warps)."""
    block_g = next_power_of_2(group)
    rows = 128 if device.type == "cuda" else 64  # the interpreter is fastest with few, mid-size tiles
    block_q = max(1, rows // block_g)
    if block_q * block_g < 16:  # unreachable for rows >= 16, kept for tl.dot's minimum
        block_q = 16 // block_g
    block_n = 64 if head_dim <= 128 else 32
    num_warps = 8 if block_q * block_g >= 128 else 4  # 4 warps at 128 rows come close to 255 registers
    return block_q, block_g, block_n, num_warps


def prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its paged context."""
    out = check_attention_args(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out)
    _, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_reqs = seq_lens.shape[0]
    if num_reqs == 0 or max_query_len == 0:
        return out

    group = num_heads // num_kv_heads
    block_q, block_g, block_n, num_warps = _tile_config(group, head_dim, query.device)
    grid = (triton.cdiv(max_query_len, block_q), num_reqs, num_kv_heads)
    _prefill_attention_kernel[grid](
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out,
        scale * _LOG2E, group,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        BLOCK_Q=block_q, BLOCK_G=block_g, BLOCK_N=block_n, HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim), BLOCK_SIZE=block_size, DOT_DTYPE=dot_dtype(query.dtype, query.device),
        num_warps=num_warps,
    )
    return out
