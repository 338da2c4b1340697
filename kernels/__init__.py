"""Attention kernels over the paged KV cache.

Layout (fixed; the engine, the Triton kernels and the references all share it):
- Each layer has `key_cache` and `value_cache` of shape
  `[num_blocks, block_size, num_kv_heads, head_dim]`.
- `slot = block_id * block_size + offset`. `slot_mapping` is int64
  `[num_tokens]`, with -1 for padding tokens, which are never stored.
- `block_tables` is int32 `[num_reqs, max_blocks_per_req]`, padded with -1.
  Positions at or past `seq_lens[r]` are never read.
- `query_start_loc` is int32 `[num_reqs + 1]`, the cumulative query lengths:
  request r's new tokens are rows `query_start_loc[r]:query_start_loc[r+1]`.
- `seq_lens` is int32 `[num_reqs]`: context length including the new tokens.
- `query`/`out` are `[num_tokens, num_heads, head_dim]`; `key`/`value` are
  `[num_tokens, num_kv_heads, head_dim]`; `num_heads % num_kv_heads == 0` (GQA).
- `max_query_len` and `max_seq_len` are host ints, so no kernel launch has to
  read a device tensor back to size its grid.

Signatures:
    store_kv(key, value, key_cache, value_cache, slot_mapping) -> None
    paged_attention(query, key_cache, value_cache, block_tables, seq_lens,
                    query_start_loc, max_query_len, max_seq_len, scale,
                    out=None) -> out

One `paged_attention` call covers prefill, chunked prefill (a chunk may start
mid-block) and decode, in any mix.
"""

from kernels.reference import paged_attention, store_kv

__all__ = ["paged_attention", "store_kv"]
