"""Torch reference implementations of the kernels; the CPU path of the engine.

Each function has the same signature as its Triton twin in this package, so a
test can run both on the same inputs and `assert_close` the results.

Invariants relied on (see `kernels/__init__.py` for the full layout):
- `slot_mapping[i] == -1` means token i is padding and is not stored.
- Entries of `block_tables` past a request's last block may be -1; they are
  clamped before gathering and masked out by `seq_lens`, never read as data.
- Query token j of request r sits at absolute position
  `seq_lens[r] - query_len(r) + j` and sees keys at positions <= its own.
- `positions[i]` is a row of `cos_sin_cache` (index_select raises otherwise).
- Norm, rotary and activation keep transformers' float ops in its order, so
  the CPU engine matches it bit for bit in float32.
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
    if slot_mapping.numel() == 0:
        return
    # No boolean-mask indexing: it reads the mask back to the host (a sync
    # the engine's forward must not have). A padding token (-1) is written
    # instead to the first valid token's slot with that token's own values,
    # so the duplicate write is identical and its order does not matter; with
    # no valid token at all, slot 0 is rewritten with what it holds.
    valid = slot_mapping >= 0
    # A 1-element index, not a 0-d one: indexing with a 0-d tensor calls item().
    first = valid.to(torch.int8).argmax().view(1)  # first valid token, or 0
    slots = torch.where(valid, slot_mapping, slot_mapping[first].clamp(min=0))
    for src, cache in ((key, key_cache), (value, value_cache)):
        flat = cache.view(-1, num_kv_heads, head_dim)
        fill = torch.where(valid[first, None, None], src[first].to(cache.dtype), flat[slots[first]])
        flat.index_copy_(0, slots, torch.where(valid[:, None, None], src.to(cache.dtype), fill))


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


def _grouped_batch(
    query: torch.Tensor, key_cache: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor
) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    """(query as [tokens, kv_heads, group, dim], query starts, seq_lens, query lengths) on the host."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    # Query heads h*group .. h*group+group-1 share KV head h. Folding the group
    # into the query-row dim lets SDPA read each KV head once instead of
    # expanding K and V `group` times.
    grouped = query.view(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
    starts = query_start_loc.tolist()
    query_lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
    return grouped, starts, seq_lens.tolist(), query_lens


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
    workspace: torch.Tensor | None = None,  # the Triton decode kernel's scratch; not needed here
) -> torch.Tensor:
    if out is None:
        out = torch.empty_like(query)
    num_heads, head_dim = query.shape[1:]
    grouped, _, lens, query_lens = _grouped_batch(query, key_cache, seq_lens, query_start_loc)

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

    attend_prompt_rows(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, out)
    return out


def attend_prompt_rows(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    min_query_len: int = 2,
) -> None:
    """`paged_attention` for the requests with at least `min_query_len` query
    tokens (prompt chunks), one causal SDPA call each; other rows of `out`
    are left as they are."""
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    grouped, starts, lens, query_lens = _grouped_batch(query, key_cache, seq_lens, query_start_loc)
    for r, n in enumerate(query_lens):
        if n < max(min_query_len, 2):
            continue
        seq_len, start = lens[r], starts[r]
        k = _gather_context(key_cache, block_tables[r : r + 1], seq_len).to(query.dtype)
        v = _gather_context(value_cache, block_tables[r : r + 1], seq_len).to(query.dtype)
        if n == seq_len:
            # A whole prompt: SDPA's own causal mode skips the blocks above the
            # diagonal that a mask would still compute (1.8x at 512 tokens on the CPU).
            q = query[start : start + n].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            out[start : start + n] = o[0].transpose(0, 1)
            continue
        # A later chunk sees the whole earlier context, which is_causal (aligned
        # top-left) would not: a mask. Rows ordered (group member, token): [1, kv_heads, group * n, dim]
        q = grouped[start : start + n].permute(1, 2, 0, 3).reshape(1, num_kv_heads, group * n, head_dim)
        q_pos = torch.arange(seq_len - n, seq_len, device=query.device)
        mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(group, 1), scale=scale)
        o = o.view(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3)
        out[start : start + n] = o.reshape(n, num_heads, head_dim)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    # transformers' op order (normalise in float32, scale in the input dtype),
    # so the CPU path matches it to the last bit in float32.
    dtype = x.dtype
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    result = weight * normed.to(dtype)
    if out is None:
        return result
    return out.copy_(result)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual_out = x + residual
    return rms_norm(residual_out, weight, eps), residual_out


def apply_rotary_embedding(
    query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    # transformers' rotate-half, with cos/sin cast to the q/k dtype and the
    # halves duplicated, as its rotary embedding returns them.
    half = cos_sin_cache.shape[1] // 2
    cos_sin = torch.index_select(cos_sin_cache, 0, positions).to(query.dtype)
    cos = torch.cat((cos_sin[:, :half], cos_sin[:, :half]), dim=-1)[:, None, :]  # broadcast over heads
    sin = torch.cat((cos_sin[:, half:], cos_sin[:, half:]), dim=-1)[:, None, :]
    for x in (query, key):
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        x.copy_(x * cos + rotated * sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.split(x.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up


def fused_moe(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    # transformers' expert loop, op for op: experts in ascending order, each
    # one's (slot, token) rows in `torch.where` order, accumulated by
    # index_add_ in the activation dtype, so float32 matches it bit for bit.
    num_experts = w13.shape[0]
    out = torch.zeros_like(hidden_states)
    expert_mask = F.one_hot(topk_ids, num_classes=num_experts).permute(2, 1, 0)  # [experts, top_k, tokens]
    for expert in expert_mask.sum(dim=(1, 2)).nonzero()[:, 0].tolist():
        slot, token = torch.where(expert_mask[expert])
        gate, up = F.linear(hidden_states[token], w13[expert]).chunk(2, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, w2[expert])
        out.index_add_(0, token, (expert_out * topk_weights[token, slot, None]).to(out.dtype))
    return out


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Per token, its slot's A times its row, in float32: `[num_tokens, width]`, zeros for slot 0
    (see kernels/lora.py: slot s is row s - 1 of the stack)."""
    a = lora_a.index_select(0, (token_slots.long() - 1).clamp(min=0)).float()  # [num_tokens, width, in_features]
    y = torch.bmm(a, x.float()[:, :, None])[:, :, 0] * (token_slots != 0)[:, None]
    return y if out is None else out.copy_(y)


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor) -> None:
    """out[t] += y[t] times its slot's B (stored transposed), rounded once; rows of slot 0 untouched."""
    rows = (token_slots != 0).nonzero()[:, 0]
    b = lora_b.index_select(0, token_slots[rows].long() - 1).float()  # [rows, width, out_features]
    delta = torch.bmm(y[rows].float()[:, None, :], b)[:, 0, :]
    out[rows] = (out[rows].float() + delta).to(out.dtype)
