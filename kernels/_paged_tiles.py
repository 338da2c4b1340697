"""Triton device functions shared by the decode and prefill kernels.

- `load_kv_tile` gathers a `[BLOCK_N, BLOCK_D]` tile of keys and values at
  token positions `pos` of one request and one KV head, through its block
  table row. Masked-off positions read block 0 (their -1 or garbage block id
  is clamped first) and come back as zeros, so no load leaves the cache.
- `online_softmax_update` folds one tile of scores into the running max,
  sum and accumulator of flash attention (scores are in log2 units).
"""

import triton
import triton.language as tl

from kernels._dot import dot


@triton.jit
def load_kv_tile(
    key_cache_ptr, value_cache_ptr, bt_row, pos, pos_mask, d, d_mask, kv_head,
    stride_kc_block, stride_kc_off, stride_kc_head,
    stride_vc_block, stride_vc_off, stride_vc_head,
    BLOCK_SIZE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    block = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos_mask, other=0)
    block = tl.maximum(block, 0).to(tl.int64)
    offset = pos % BLOCK_SIZE
    kv_mask = pos_mask[:, None] & d_mask[None, :]
    k_ptrs = key_cache_ptr + (block * stride_kc_block + offset * stride_kc_off + kv_head * stride_kc_head)[:, None]
    k = tl.load(k_ptrs + d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
    v_ptrs = value_cache_ptr + (block * stride_vc_block + offset * stride_vc_off + kv_head * stride_vc_head)[:, None]
    v = tl.load(v_ptrs + d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
    return k, v


@triton.jit
def online_softmax_update(s, v, m_i, l_i, acc, DOT_DTYPE: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.to(DOT_DTYPE), v, DOT_DTYPE)
    return m_new, l_i, acc
