"""Triton fused mixture-of-experts MLP: each token through its top-k experts.

    fused_moe(hidden_states, w13, w2, topk_weights, topk_ids) -> out

`hidden_states` is `[num_tokens, hidden]`; `w13` is `[num_experts, 2 *
intermediate, hidden]` (gate rows, then up rows: the stacked gate_up
projections); `w2` is `[num_experts, hidden, intermediate]`; `topk_weights`
(float) and `topk_ids` (int64, in `[0, num_experts)`) are `[num_tokens,
top_k]`, from the router. `out[t] = sum_k topk_weights[t, k] *
down_e(silu(gate_e(x_t)) * up_e(x_t))` with `e = topk_ids[t, k]`.

How: the `num_tokens * top_k` (token, slot) pairs, pair id `t * top_k + k`,
are sorted by expert on the device (torch ops, no host sync, so the call is
CUDA-graph safe) into `sorted_pair_ids`, each expert's run padded to a
multiple of BLOCK_M with the sentinel `num_pairs`; `block_expert_ids[b]` is
the expert of tile b (`num_experts` for tiles past the last run). Then two
grouped GEMMs, one program per (tile, BLOCK_N columns):
1. gate_up: `x[token] @ w13[e].T` for the gate and the up columns at once,
   SiLU-mul in the epilogue, into `intermediate_cache[pair]`;
2. down: `intermediate_cache[pair] @ w2[e].T`, times the pair's routing
   weight, into `pair_out[pair]`.
Last, `out[t] = pair_out[t * top_k : (t + 1) * top_k].sum()`: a fixed-order
sum, so results do not depend on scheduling (no atomics).

Kernel invariants:
- Grid (max_num_tiles, cdiv(columns, BLOCK_N)) with `max_num_tiles =
  cdiv(num_pairs, BLOCK_M) + min(num_experts, num_pairs)`, a bound on the
  padded tile count that needs no host sync; tiles with no expert return at
  once. An expert with no tokens has no tile.
- Sentinel rows load zeros and are never stored; every real pair is stored
  by exactly one program per column tile, so nothing is left unwritten.
- Operands are converted to DOT_DTYPE after the load (16-bit on CUDA for the
  tensor cores, float32 in the interpreter); accumulation is float32, rounded
  to the activation dtype at the reference's rounding points (each GEMM
  output, SiLU, the product, the weighted result).
- Only the last dim of each tensor must be contiguous (strides are passed),
  but `topk_weights`/`topk_ids` must be contiguous (indexed by pair id).
  Token, pair and expert offsets are int64 (large weights overflow int32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import check_float, check_last_dim_contiguous, check_rank, check_same_device, dot_dtype
from kernels._dot import dot


@triton.jit
def _moe_gate_up_kernel(
    hidden_ptr,
    w13_ptr,
    cache_ptr,
    sorted_pair_ids_ptr,
    block_expert_ids_ptr,
    num_pairs,
    num_experts,
    hidden_size,
    intermediate,
    stride_h_tok,
    stride_w_expert,
    stride_w_row,
    stride_c_pair,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(block_expert_ids_ptr + tile)
    if expert >= num_experts:
        return
    pair = tl.load(sorted_pair_ids_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = pair < num_pairs
    token = (pair // TOP_K).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < intermediate
    w_base = w13_ptr + expert.to(tl.int64) * stride_w_expert
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden_size
        x = tl.load(hidden_ptr + token[:, None] * stride_h_tok + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(DOT_DTYPE)
        w_mask = k_mask[:, None] & col_mask[None, :]
        # [BLOCK_K, BLOCK_N] tiles of w13[e].T: gate rows `cols`, up rows `intermediate + cols`
        w_gate = tl.load(w_base + cols[None, :] * stride_w_row + ks[:, None], mask=w_mask, other=0.0)
        w_up = tl.load(w_base + (intermediate + cols[None, :]) * stride_w_row + ks[:, None], mask=w_mask, other=0.0)
        acc_gate += dot(x, w_gate.to(DOT_DTYPE), DOT_DTYPE)
        acc_up += dot(x, w_up.to(DOT_DTYPE), DOT_DTYPE)
    dtype = cache_ptr.dtype.element_ty
    gate = acc_gate.to(dtype).to(tl.float32)
    up = acc_up.to(dtype).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(cache_ptr + pair.to(tl.int64)[:, None] * stride_c_pair + cols[None, :], (silu * up).to(dtype),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _moe_down_kernel(
    cache_ptr,
    w2_ptr,
    topk_weights_ptr,
    pair_out_ptr,
    sorted_pair_ids_ptr,
    block_expert_ids_ptr,
    num_pairs,
    num_experts,
    hidden_size,
    intermediate,
    stride_c_pair,
    stride_w_expert,
    stride_w_row,
    stride_o_pair,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(block_expert_ids_ptr + tile)
    if expert >= num_experts:
        return
    pair = tl.load(sorted_pair_ids_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = pair < num_pairs
    pair = pair.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden_size
    w_base = w2_ptr + expert.to(tl.int64) * stride_w_expert
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, intermediate, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < intermediate
        a = tl.load(cache_ptr + pair[:, None] * stride_c_pair + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_base + cols[None, :] * stride_w_row + ks[:, None],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0).to(DOT_DTYPE)
        acc += dot(a, w, DOT_DTYPE)
    dtype = pair_out_ptr.dtype.element_ty
    weight = tl.load(topk_weights_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)
    weighted = acc.to(dtype).to(tl.float32) * weight[:, None]
    tl.store(pair_out_ptr + pair[:, None] * stride_o_pair + cols[None, :], weighted.to(dtype),
             mask=row_mask[:, None] & col_mask[None, :])


def _tile_config(num_pairs: int, num_experts: int, device: torch.device) -> dict:
    """BLOCK_M/N/K and launch options. Decode (up to 16 pairs per expert on
    average) gets 16-row tiles, the `tl.dot` minimum, so padding wastes
    little, and long K steps to stream the weights; prefill gets 64-row tiles
    that reuse each weight tile over many tokens. vLLM's defaults for these
    regimes; not yet tuned on hardware. The interpreter gets small tiles."""
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    if num_pairs <= 16 * num_experts:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pair_ids, block_expert_ids): pair ids grouped by expert, each
    expert's run padded to a multiple of `block_m` with `num_pairs`, and the
    expert of each `block_m` tile (`num_experts` past the last run). Sizes
    depend only on the shapes, so there is no host sync. About 25 small torch
    launches a layer: under a decode CUDA graph they cost little each, but if
    batch-1 decode is far from its roofline, one Triton kernel for this step
    (vLLM's moe_align_block_size) is the first thing to try."""
    device = topk_ids.device
    flat = topk_ids.flatten()
    num_pairs = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[sorted_experts]
    dest = (padded_end - padded)[sorted_experts] + rank
    max_num_tiles = triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)
    sorted_pair_ids = torch.full((max_num_tiles * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))
    tile_starts = torch.arange(max_num_tiles, device=device) * block_m
    block_expert_ids = torch.searchsorted(padded_end, tile_starts, right=True).to(torch.int32)
    return sorted_pair_ids, block_expert_ids


def fused_moe(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Sum over each token's top-k experts of weight * expert MLP (SiLU-gated)."""
    check_rank("hidden_states", hidden_states, 2)
    check_rank("w13", w13, 3)
    check_rank("w2", w2, 3)
    check_rank("topk_weights", topk_weights, 2)
    check_rank("topk_ids", topk_ids, 2)
    for name, t in (("hidden_states", hidden_states), ("w13", w13), ("w2", w2), ("topk_weights", topk_weights)):
        check_float(name, t)
        check_last_dim_contiguous(name, t)
    device = hidden_states.device
    check_same_device(device, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)
    num_tokens, hidden_size = hidden_states.shape
    num_experts, width, w13_hidden = w13.shape
    intermediate = width // 2
    top_k = topk_ids.shape[1]
    assert w13.dtype == w2.dtype == hidden_states.dtype, "hidden_states, w13 and w2 must share a dtype"
    assert width % 2 == 0 and w13_hidden == hidden_size, f"w13 must be [E, 2 * I, {hidden_size}], got {tuple(w13.shape)}"
    assert w2.shape == (num_experts, hidden_size, intermediate), f"w2 must be [E, H, I], got {tuple(w2.shape)}"
    assert topk_ids.dtype == torch.int64 and topk_ids.shape == topk_weights.shape == (num_tokens, top_k), (
        "topk_ids (int64) and topk_weights must both be [num_tokens, top_k]")
    assert topk_ids.is_contiguous() and topk_weights.is_contiguous(), "topk_ids/topk_weights must be contiguous"
    num_pairs = num_tokens * top_k
    pair_out = torch.empty(num_pairs, hidden_size, dtype=hidden_states.dtype, device=device)
    if num_pairs == 0:
        return pair_out.view(num_tokens, top_k, hidden_size).sum(dim=1)
    config = _tile_config(num_pairs, num_experts, device)
    block_m, block_n, block_k = config.pop("BLOCK_M"), config.pop("BLOCK_N"), config.pop("BLOCK_K")
    sorted_pair_ids, block_expert_ids = sort_by_expert(topk_ids, num_experts, block_m)
    num_tiles = block_expert_ids.shape[0]
    cache = torch.empty(num_pairs, intermediate, dtype=hidden_states.dtype, device=device)
    dot = dot_dtype(hidden_states.dtype, device)
    _moe_gate_up_kernel[(num_tiles, triton.cdiv(intermediate, block_n))](
        hidden_states, w13, cache, sorted_pair_ids, block_expert_ids, num_pairs, num_experts, hidden_size,
        intermediate, hidden_states.stride(0), w13.stride(0), w13.stride(1), cache.stride(0),
        TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_DTYPE=dot, **config,
    )
    _moe_down_kernel[(num_tiles, triton.cdiv(hidden_size, block_n))](
        cache, w2, topk_weights, pair_out, sorted_pair_ids, block_expert_ids, num_pairs, num_experts,
        hidden_size, intermediate, cache.stride(0), w2.stride(0), w2.stride(1), pair_out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_DTYPE=dot, **config,
    )
    return pair_out.view(num_tokens, top_k, hidden_size).sum(dim=1)
