"""Torch reference implementations of the kernels; the CPU path of the engine.

Each function has the same signature as its Triton twin in this package, so a
test can run both on the same inputs and `assert_close` the results.

Invariants relied on (see `kernels/__init__.py` for the full layout):
- `slot_mapping[i] == -1` means token i is padding and is not stored.
- Entries of `block_tables` past a request's last block may be -1; they are
  clamped before gathering and masked out by `seq_lens`, never read as data.
- Query token j of request r sits at absolute position
  `seq_lens[r] - query_len(r) + j` and sees keys at positions <= its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# Decode grouping: measured on a 2-core CPU, 4 groups of >= 16 rows beat one
# padded call and per-request calls alike.
_MAX_DECODE_GROUPS = 4
_MIN_DECODE_GROUP = 16


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    key_cache.view(-1, num_kv_heads, head_dim)[slots] = key[valid].to(key_cache.dtype)
    value_cache.view(-1, num_kv_heads, head_dim)[slots] = value[valid].to(value_cache.dtype)


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_reqs, max_blocks] block ids -> [num_reqs, num_kv_heads, num_tokens, head_dim]."""
    num_reqs = block_tables.shape[0]
    _, block_size, num_kv_heads, head_dim = cache.shape
    num_blocks_needed = -(-num_tokens // block_size)
    ids = block_tables[:, :num_blocks_needed].clamp(min=0).flatten()
    # index_select is several times faster than advanced indexing on the CPU.
    blocks = torch.index_select(cache, 0, ids)
    flat = blocks.view(num_reqs, num_blocks_needed * block_size, num_kv_heads, head_dim)
    return flat[:, :num_tokens].transpose(1, 2)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    if out is None:
        out = torch.empty_like(query)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    # Query heads h*group .. h*group+group-1 share KV head h. Folding the group
    # into the query-row dim lets SDPA read each KV head once instead of
    # expanding K and V `group` times.
    grouped = query.view(num_tokens, num_kv_heads, group, head_dim)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    query_lens = [b - a for a, b in zip(starts[:-1], starts[1:])]

    # Decode rows (one query token) are batched into padded SDPA calls: on the
    # CPU the per-call overhead dominates small decodes. Rows are sorted by
    # context length and split into a few groups so that short contexts are
    # not padded to the longest one in the batch.
    decode_rows = sorted((r for r, n in enumerate(query_lens) if n == 1), key=lens.__getitem__)
    group_size = max(_MIN_DECODE_GROUP, -(-len(decode_rows) // _MAX_DECODE_GROUPS))
    for first in range(0, len(decode_rows), group_size):
        rows_list = decode_rows[first : first + group_size]
        rows = torch.tensor(rows_list, device=query.device)
        ctx_len = lens[rows_list[-1]]
        k = _gather_context(key_cache, block_tables[rows], ctx_len).to(query.dtype)
        v = _gather_context(value_cache, block_tables[rows], ctx_len).to(query.dtype)
        token_idx = query_start_loc[rows].long()
        mask = torch.arange(ctx_len, device=query.device)[None, :] < seq_lens[rows, None]
        o = F.scaled_dot_product_attention(grouped[token_idx], k, v, attn_mask=mask[:, None, None, :], scale=scale)
        out[token_idx] = o.reshape(len(rows_list), num_heads, head_dim)

    for r, n in enumerate(query_lens):
        if n <= 1:
            continue
        seq_len, start = lens[r], starts[r]
        k = _gather_context(key_cache, block_tables[r : r + 1], seq_len).to(query.dtype)
        v = _gather_context(value_cache, block_tables[r : r + 1], seq_len).to(query.dtype)
        # rows ordered (group member, token): [1, kv_heads, group * n, dim]
        q = grouped[start : start + n].permute(1, 2, 0, 3).reshape(1, num_kv_heads, group * n, head_dim)
        q_pos = torch.arange(seq_len - n, seq_len, device=query.device)
        mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(group, 1), scale=scale)
        o = o.view(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3)
        out[start : start + n] = o.reshape(n, num_heads, head_dim)
    return out
