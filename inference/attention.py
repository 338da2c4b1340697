"""The one attention call the models make, over the paged KV cache.

Models never see the cache layout: they hand this module their projected
q/k/v and get attention output back. The model runner builds one
`AttentionMetadata` per step and shares it across layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [num_tokens], -1 = do not store
    block_tables: torch.Tensor  # int32 [num_reqs, max_blocks_per_req], -1 padded
    seq_lens: torch.Tensor  # int32 [num_reqs]
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    max_query_len: int
    max_seq_len: int
    # The decode kernel's split buffers, allocated once (None: it allocates per call).
    decode_workspace: torch.Tensor | None = None


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    key_cache, value_cache = kv_cache
    kernels.store_kv(k, v, key_cache, value_cache, meta.slot_mapping)
    return kernels.paged_attention(
        q, key_cache, value_cache, meta.block_tables, meta.seq_lens,
        meta.query_start_loc, meta.max_query_len, meta.max_seq_len, scale, workspace=meta.decode_workspace,
    )
