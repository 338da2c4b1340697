"""Triton kernel that writes one step's keys and values into the paged KV cache.

(The file is not called `store_kv.py`: importing a submodule binds it as an
attribute of its package, and `kernels.store_kv` must stay the public function.)

Kernel invariants:
- One program per token (grid dim 0 == num_tokens, so reading the token's
  slot is in bounds); it writes every KV head of that token as one
  [BLOCK_H, BLOCK_D] tile, both extents padded to powers of two and masked.
- `slot == -1` marks padding: nothing is stored, and the slot is clamped to 0
  before it becomes an address, so -1 is never dereferenced.
- Values are upcast to float32 after the load and cast to the cache dtype at
  the store, so key/value and cache dtypes may differ (as in the reference).
- Block and token offsets are int64: a large cache overflows int32 addresses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import check_float, check_index, check_last_dim_contiguous, check_rank, next_power_of_2


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    num_kv_heads,
    block_size,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_kc_block,
    stride_kc_off,
    stride_kc_head,
    stride_vc_block,
    stride_vc_off,
    stride_vc_head,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,  # constexpr: a runtime bound on d would stop vectorised loads
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    # In bounds: one program per token. Loaded as a [1, 1] block, not a scalar:
    # the interpreter turns a scalar bool broadcast into a mask into int64.
    slot = tl.load(slot_mapping_ptr + tok + tl.zeros([1, 1], dtype=tl.int64))
    valid = slot >= 0
    slot = tl.maximum(slot, 0)
    block = slot // block_size
    offset = slot % block_size

    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_kv_heads) & (dims < HEAD_DIM) & valid

    k = tl.load(key_ptr + tok * stride_k_tok + heads * stride_k_head + dims, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(value_ptr + tok * stride_v_tok + heads * stride_v_head + dims, mask=mask, other=0.0).to(tl.float32)
    k_dst = key_cache_ptr + block * stride_kc_block + offset * stride_kc_off + heads * stride_kc_head + dims
    v_dst = value_cache_ptr + block * stride_vc_block + offset * stride_vc_off + heads * stride_vc_head + dims
    tl.store(k_dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write `key[i]`/`value[i]` to cache slot `slot_mapping[i]`; skip slot -1."""
    for name, t in (("key", key), ("value", value)):
        check_rank(name, t, 3)
        check_float(name, t)
        check_last_dim_contiguous(name, t)
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        check_rank(name, t, 4)
        check_float(name, t)
        check_last_dim_contiguous(name, t)
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, f"value {tuple(value.shape)} != key {tuple(key.shape)}"
    assert key_cache.shape == value_cache.shape, "key_cache and value_cache shapes differ"
    assert key_cache.shape[2:] == (num_kv_heads, head_dim), (
        f"cache [.., .., heads, dim] = {tuple(key_cache.shape[2:])}, key has {(num_kv_heads, head_dim)}"
    )
    check_index("slot_mapping", slot_mapping, torch.int64, 1, key.device)
    assert slot_mapping.shape[0] == num_tokens, "slot_mapping needs one slot per token"
    for name, t in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        assert t.device == key.device, f"{name} is on {t.device}, key on {key.device}"
    if num_tokens == 0:
        return

    _store_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        num_kv_heads, key_cache.shape[1],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        HEAD_DIM=head_dim, BLOCK_H=next_power_of_2(num_kv_heads), BLOCK_D=next_power_of_2(head_dim),
    )
