"""A model's paged KV cache tensors, and forwards into a scratch one.

`allocate_kv_cache` gives each attention layer its key and value tensors,
`[num_blocks, block_size, num_kv_heads, head_dim]`, and binds them to the
layer (`self_attn.kv_cache`), where the attention call finds them. The model
runner's cache holds the block manager's blocks plus its scratch block; a
draft model's (inference/spec_decode/draft_model.py) holds its own pool.

`profile_forward` runs a batch of new tokens against a scratch cache of its
own, bound for that forward only: how the runner warms the kernels, tunes
the prefill configs and measures a step's peak memory before any cache of
the right size exists.

Invariants: every block starts zeroed (a padding row that reads the scratch
block reads zeros, never NaN); after `profile_forward` every layer is bound
to the cache it had before.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

from inference.attention import AttentionMetadata


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros, but on the CPU from calloc: the OS's zero pages, faulted in
    as blocks are first written rather than all at start-up (torch.zeros
    writes every byte: 0.7-2.7 s of a 135M model's start with the default
    KV budget on a 2-core VM)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def _layout(model: nn.Module) -> tuple[int, int, torch.dtype, torch.device]:
    """(num_kv_heads, head_dim, dtype, device) of the model's cache."""
    attn = model.layers[0].self_attn
    weight = next(model.parameters())
    return attn.num_kv_heads, attn.head_dim, weight.dtype, weight.device


def allocate_kv_cache(model: nn.Module, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`num_blocks` zeroed blocks per layer, in the model's dtype and on its device, bound to its layers."""
    num_kv_heads, head_dim, dtype, device = _layout(model)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = []
    for layer in model.layers:
        kv = (_zeros(shape, dtype, device), _zeros(shape, dtype, device))
        layer.self_attn.kv_cache = kv
        caches.append(kv)
    return caches


def kv_cache_bytes(caches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Bytes of an `allocate_kv_cache` result."""
    return sum(t.numel() * t.element_size() for kv in caches for t in kv)


@torch.inference_mode()
def profile_forward(model: nn.Module, num_tokens: int, num_reqs: int, max_model_len: int,
                    block_size: int) -> torch.Tensor:
    """A forward of `num_tokens` new tokens split evenly over `num_reqs`
    requests, or over more where a request would pass `max_model_len`, as the
    scheduler never builds one: its positions would index past the rotary
    table. Into a scratch cache; returns the last logits."""
    num_reqs = max(num_reqs, -(-num_tokens // max_model_len))
    per_req = num_tokens // num_reqs
    num_tokens = per_req * num_reqs
    num_kv_heads, head_dim, dtype, device = _layout(model)
    blocks_per_req = -(-per_req // block_size)
    shape = (num_reqs * blocks_per_req, block_size, num_kv_heads, head_dim)
    bound = [layer.self_attn.kv_cache for layer in model.layers]
    for layer in model.layers:
        layer.self_attn.kv_cache = (torch.empty(shape, device=device, dtype=dtype),
                                    torch.empty(shape, device=device, dtype=dtype))
    arange = functools.partial(torch.arange, dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        slot_mapping=(arange(num_reqs)[:, None] * blocks_per_req * block_size + arange(per_req)).flatten().long(),
        block_tables=arange(num_reqs * blocks_per_req).view(num_reqs, blocks_per_req),
        seq_lens=torch.full((num_reqs,), per_req, dtype=torch.int32, device=device),
        query_start_loc=arange(num_reqs + 1) * per_req,
        max_query_len=per_req,
        max_seq_len=per_req,
    )
    positions = arange(per_req).long().repeat(num_reqs)
    try:
        hidden = model(torch.zeros(num_tokens, dtype=torch.long, device=device), positions, meta)
        return model.compute_logits(hidden[-1:])
    finally:
        for layer, kv_cache in zip(model.layers, bound):
            layer.self_attn.kv_cache = kv_cache
