"""Triton paged attention for decode: one query token per request.

Flash-decoding: the context of each request is cut into `num_splits` ranges of
`tokens_per_split` tokens; pass 1 (`_decode_attention_kernel`) computes one
partial softmax per (request, KV head, split) and pass 2
(`_combine_splits_kernel`) merges the partials. Batch 1 at long context would
otherwise keep only `num_kv_heads` programs busy.

Kernel invariants:
- Grid of pass 1 is (num_reqs, num_kv_heads, num_splits). A program handles
  all `group = num_heads // num_kv_heads` query heads of its KV head at once
  (GQA), so each K/V tile is loaded once per group, not once per query head.
  The group is padded to BLOCK_G >= 16 rows because `tl.dot` needs tiles of
  at least 16 on every dim; the pad rows read zeros and are never stored.
- head_dim is padded to the power of two BLOCK_D (at least 16, the GPU `tl.dot`
  minimum) and masked.
- Keys are gathered per token (block id from `block_tables`, then the offset in
  the block), so one BLOCK_N tile may span several cache blocks and any
  block_size works. Block ids of -1 are clamped to 0 before use as addresses;
  tokens at or past `seq_lens[r]` are masked off and never read.
- `tokens_per_split` is a multiple of BLOCK_N: a tile never straddles splits.
  Pass 1 skips splits starting at or past `seq_lens[r]`; pass 2 reads only the
  splits below `cdiv(seq_lens[r], tokens_per_split)`. Every tile that runs has
  at least one valid key, so the running max is finite and no exp is NaN.
- Partials are float32: running max (log2 domain), sum of exp, and the
  unnormalised accumulator. With one split (DIRECT_OUT), pass 1 normalises
  and writes `out` itself, and pass 2 is not launched. `num_splits` is a
  runtime argument so a new context length does not recompile the kernel.
- The query row of request r is `query_start_loc[r]`; a request with no query
  token (query_start_loc[r + 1] == query_start_loc[r]) writes nothing.
- Q/K/V tiles are converted to DOT_DTYPE right after their load: float32 in
  the interpreter (which computes 16-bit arithmetic wrongly), the 16-bit
  storage dtype on CUDA so tiles reach the tensor cores without a round trip
  through float32. Scores, softmax statistics and the accumulator are float32.
- `max_seq_len` (a host int) bounds every `seq_lens[r]`; the grid is sized
  from it and no launch reads a device tensor back.
- Graph safe: the grid, `num_splits`, `tokens_per_split` and every constexpr
  derive only from (num_reqs, num_kv_heads, head_dim, max_seq_len, device)
  (`split_plan`), never from the values in `seq_lens`. A caller that passes
  a constant `max_seq_len` (the engine passes `max_model_len` when it
  captures CUDA graphs) gets the same launches for every step of a batch
  size; each program reads its request's real `seq_len` from device memory,
  pass 1 returns at once for splits past it and pass 2 reads only the splits
  below it, so an over-provisioned grid costs empty programs, not results.
- Split partials live in one flat float32 buffer: part_acc, then part_max,
  then part_sum, each contiguous, at offsets the kernels derive from the grid
  (no views are made). With `workspace` it is that buffer (the call
  allocates nothing, so a captured graph keeps its addresses); without, one
  buffer is allocated per call. `workspace_numel` sizes a workspace for
  every call up to given bounds.
- `tokens_per_split` and `num_splits` are not specialised on (they vary with
  `max_seq_len`), so one compiled kernel serves every context length and the
  launch cache of `kernels/_launch.py` may reuse it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import cdiv, next_power_of_2
from kernels._dot import dot
from kernels._launch import checked_geometry, launch, tensor_key
from kernels._paged_tiles import load_kv_tile, online_softmax_update

_LOG2E = 1.4426950408889634
_MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost outweighs its parallelism
_MAX_SPLITS = 64


@triton.jit(do_not_specialize=["tokens_per_split", "num_splits"])
def _decode_attention_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    part_ptr,  # the flat partials buffer (unused with DIRECT_OUT)
    qk_scale,  # softmax scale * log2(e): the kernel uses exp2
    group,
    num_heads,
    tokens_per_split,
    num_splits,
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
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,  # constexpr: a runtime bound on d would stop vectorised loads
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # cache block size; constexpr so // and % are shifts
    BLOCK_N: tl.constexpr,
    DIRECT_OUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # In bounds: grid dim 0 is num_reqs and query_start_loc has num_reqs + 1 entries.
    q_row = tl.load(query_start_loc_ptr + req).to(tl.int64)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_row
    seq_len = tl.load(seq_lens_ptr + req)
    split_start = split * tokens_per_split
    if (q_len == 0) | (split_start >= seq_len):
        return
    split_end = tl.minimum(split_start + tokens_per_split, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + g
    g_mask = g < group
    d_mask = d < HEAD_DIM
    q_ptrs = query_ptr + q_row * stride_q_tok + heads[:, None] * stride_q_head + d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + req.to(tl.int64) * stride_bt_req
    for start in range(split_start, split_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_mask = pos < split_end
        k, v = load_kv_tile(
            key_cache_ptr, value_cache_ptr, bt_row, pos, pos_mask, d, d_mask, kv_head,
            stride_kc_block, stride_kc_off, stride_kc_head, stride_vc_block, stride_vc_off, stride_vc_head,
            BLOCK_SIZE, DOT_DTYPE,
        )

        s = dot(q, tl.trans(k), DOT_DTYPE) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(pos_mask[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_update(s, v, m_i, l_i, acc, DOT_DTYPE)

    store_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT_OUT:
        o_ptrs = out_ptr + q_row * stride_o_tok + heads[:, None] * stride_o_head + d[None, :]
        tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # Partials are contiguous [num_reqs, num_heads, num_splits(, head_dim)].
        num_parts = tl.num_programs(0).to(tl.int64) * num_heads * num_splits
        part = (req.to(tl.int64) * num_heads + heads) * num_splits + split
        tl.store(part_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=store_mask)
        tl.store(part_ptr + num_parts * HEAD_DIM + part, m_i, mask=g_mask)
        tl.store(part_ptr + num_parts * (HEAD_DIM + 1) + part, l_i, mask=g_mask)


@triton.jit(do_not_specialize=["tokens_per_split", "num_splits"])
def _combine_splits_kernel(
    out_ptr,
    part_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    num_heads,
    tokens_per_split,
    num_splits,
    stride_o_tok,
    stride_o_head,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,  # constexpr: a runtime bound on d would stop vectorised loads
    BLOCK_D: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_loc_ptr + req).to(tl.int64)  # in bounds, as in pass 1
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_row
    if q_len == 0:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    num_active = tl.cdiv(seq_len, tokens_per_split)  # splits pass 1 wrote; the rest is uninitialised

    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = (s < num_active) & (s < num_splits)
    d_mask = d < HEAD_DIM
    num_parts = tl.num_programs(0).to(tl.int64) * num_heads * num_splits
    part = (req.to(tl.int64) * num_heads + head) * num_splits + s
    acc_mask = s_mask[:, None] & d_mask[None, :]
    acc = tl.load(part_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=acc_mask, other=0.0)
    m = tl.load(part_ptr + num_parts * HEAD_DIM + part, mask=s_mask, other=float("-inf"))
    l = tl.load(part_ptr + num_parts * (HEAD_DIM + 1) + part, mask=s_mask, other=0.0)

    m_all = tl.max(m, axis=0)  # finite: split 0 always holds the request's own token
    w = tl.where(s_mask, tl.exp2(m - m_all), 0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + q_row * stride_o_tok + head * stride_o_head + d, o.to(out_ptr.dtype.element_ty), mask=d_mask)


_sm_counts: dict[int, int] = {}


def _num_programs_wanted(device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over; 1 on the interpreter (serial)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _sm_counts[index]


def _num_splits_wanted(num_reqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Split the context only as far as needed to fill the device; non-decreasing in max_seq_len and
    non-increasing in num_reqs * num_kv_heads, which `workspace_numel` relies on."""
    max_splits = cdiv(max(max_seq_len, 1), _MIN_TOKENS_PER_SPLIT)
    wanted = cdiv(_num_programs_wanted(device), num_reqs * num_kv_heads)
    return max(1, min(wanted, max_splits, _MAX_SPLITS))


def _block_n(head_dim: int) -> int:
    return 64 if head_dim <= 128 else 32  # K and V tiles stay in registers


def split_plan(
    num_reqs: int, num_kv_heads: int, head_dim: int, max_seq_len: int, device: torch.device,
    num_splits: int | None = None,
) -> tuple[int, int]:
    """(tokens_per_split, num_splits) of a call, a function of these arguments alone.

    `num_splits` forces a count instead of the heuristic; as splits are whole
    BLOCK_N tiles, fewer may result.
    """
    if num_splits is None:
        num_splits = _num_splits_wanted(num_reqs, num_kv_heads, max_seq_len, device)
    block_n = _block_n(head_dim)
    tokens_per_split = cdiv(cdiv(max(max_seq_len, 1), num_splits), block_n) * block_n
    return tokens_per_split, cdiv(max_seq_len, tokens_per_split)


def _partials_numel(num_reqs: int, num_heads: int, head_dim: int, num_splits: int) -> int:
    """float32 elements of part_acc, part_max and part_sum; none with one split (pass 1 writes `out`)."""
    return 0 if num_splits <= 1 else num_reqs * num_heads * num_splits * (head_dim + 2)


def workspace_numel(max_num_reqs: int, num_heads: int, head_dim: int, max_seq_len: int, device: torch.device) -> int:
    """float32 elements of a `workspace` that serves every heuristic call on `device` with
    num_reqs <= max_num_reqs and max_seq_len <= the given one, for any num_kv_heads.

    One KV head is the worst case (the fewer programs, the more splits), and a
    call splits at most as often as `_num_splits_wanted` says.
    """
    return max(
        _partials_numel(r, num_heads, head_dim, _num_splits_wanted(r, 1, max_seq_len, device))
        for r in range(1, max_num_reqs + 1)
    )


def _partials(
    num_reqs: int, num_heads: int, head_dim: int, num_splits: int, workspace: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """The flat partials buffer of a call: `workspace` (its size checked), or a new buffer when it is None."""
    numel = _partials_numel(num_reqs, num_heads, head_dim, num_splits)
    if workspace is None:
        return torch.empty(numel, dtype=torch.float32, device=device)
    assert workspace.numel() >= numel, (
        f"workspace has {workspace.numel()} elements, this call needs {numel} "
        f"({num_reqs} requests x {num_heads} heads x {num_splits} splits x (head_dim {head_dim} + 2))"
    )
    return workspace


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_seq_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each request's single new token over its paged context.

    `num_splits` overrides the split heuristic (tests use it to force pass 2).
    `workspace` (flat float32, sized by `workspace_numel` for heuristic calls)
    holds the split partials; with it and `out` given the call allocates nothing.
    Checks run once per geometry and launches reuse the compiled kernels (`kernels/_launch.py`).
    """
    if out is None:
        out = torch.empty_like(query)
    geo = checked_geometry(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out, workspace)
    num_reqs = seq_lens.shape[0]
    if num_reqs == 0 or max_seq_len == 0:
        return out

    num_heads, head_dim, num_kv_heads = geo.num_heads, geo.head_dim, geo.num_kv_heads
    tokens_per_split, num_splits = split_plan(num_reqs, num_kv_heads, head_dim, max_seq_len, query.device, num_splits)
    direct = num_splits == 1
    # Pass 1 writes `out` itself with one split: the partials pointer is then a placeholder.
    partials = out if direct else _partials(num_reqs, num_heads, head_dim, num_splits, workspace, query.device)
    group = num_heads // num_kv_heads
    launch(
        _decode_attention_kernel, ("decode", geo.key, direct, tensor_key(partials)),
        (num_reqs, num_kv_heads, num_splits),
        (query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out, partials,
         scale * _LOG2E, group, num_heads, tokens_per_split, num_splits, *geo.strides,
         max(16, next_power_of_2(group)), head_dim, geo.block_d, geo.block_size, _block_n(head_dim), direct,
         geo.dot_dtype),
        num_warps=4,
    )
    if not direct:
        block_s = next_power_of_2(num_splits)
        launch(
            _combine_splits_kernel, ("combine", geo.key, block_s, tensor_key(partials)), (num_reqs, num_heads, 1),
            (out, partials, seq_lens, query_start_loc, num_heads, tokens_per_split, num_splits,
             out.stride(0), out.stride(1), block_s, head_dim, geo.block_d),
            num_warps=4,
        )
    return out
