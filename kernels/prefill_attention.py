"""Triton paged attention for prefill, chunked prefill and mixed batches.

Variable-length causal attention: the queries are each request's new tokens
(rows `query_start_loc[r]:query_start_loc[r + 1]`), the keys and values come
from the paged cache and cover the earlier context plus this chunk (stored by
`store_kv` before the call). Query token j of request r sits at absolute
position `seq_lens[r] - q_len(r) + j` and sees keys at positions <= its own.
Decode rows (q_len 1) are just short requests here.

Kernel invariants:
- Grid is (cdiv(max_query_len, BLOCK_Q), num_reqs, num_kv_heads), query
  tiles in reverse order along dim 0 (the longest first). Programs whose
  first query token is past their request's q_len return at once.
- A program's tile has BLOCK_M = BLOCK_Q * BLOCK_G rows: BLOCK_Q query tokens
  times the (power-of-two padded) GQA group of query heads that share the KV
  head, row i being token i // BLOCK_G and head i % BLOCK_G of the group. The
  group thus shares every K/V tile load, and decode rows still fill BLOCK_G
  rows of the `tl.dot`. BLOCK_M and BLOCK_N are >= 16 (`tl.dot` minimum).
- Pad rows (token past q_len, or head past the group) load zeros and are not
  stored. Every row, pad rows included, sees key position 0, so the running
  max is finite after the first tile and no exp is NaN.
- Causal block skipping: key tiles wholly before the tile's first query
  position are seen by every row and run without any mask; only the tiles
  from there to the tile's last query position are masked; none after it run.
- Softmax in exp2 (the scale times log2(e) is folded into `qk_scale`), with
  the normalisation by the running sum delayed to the single division at
  the end; the accumulator is only rescaled by exp2(old max - new max).
- Tile shape (BLOCK_M, BLOCK_N) and launch options (num_warps, num_stages:
  software pipelining of the K/V loads) come from `PREFILL_CONFIGS`. On CUDA,
  `triton.autotune` picks one per (head_dim, BLOCK_G, dtypes, length bucket
  of max_query_len) the first time that key is seen, keeps it in memory and
  in Triton's on-disk cache (`cache_results`), and later calls launch the
  chosen config's compiled kernel through `kernels/_launch.py`. The engine
  meets every bucket at start-up (`prefill_tuning_lengths`), so no tuning
  runs inside a serving step. The
  interpreter runs `INTERPRETER_CONFIG`; tests and the compile check run
  every config explicitly.
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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels._checks import cdiv, len_bucket, next_power_of_2
from kernels._dot import dot
from kernels._launch import checked_geometry, launch
from kernels._paged_tiles import load_kv_tile, online_softmax_update

_LOG2E = 1.4426950408889634


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    block_m: int  # tile rows: query tokens x padded GQA group
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int

    def fits(self, block_g: int, head_dim: int, element_bytes: int) -> bool:
        """The tile holds at least one token of the group, and its Q tile and one K and one V tile take
        at most 64 KiB: wide heads and float32 get smaller tiles. Past that, registers spill and the
        pipelined K/V tiles overflow shared memory (the compile check measured float32 128x64 tiles of
        head_dim 128 at 197 KB on sm_80 and 262 KB on sm_90)."""
        tile_bytes = (self.block_m + 2 * self.block_n) * next_power_of_2(head_dim) * element_bytes
        return self.block_m >= block_g and tile_bytes <= 64 * 1024


# Ampere and Hopper: 128-row tiles with 8 warps feed the tensor cores; 2-3 stages overlap the K/V
# gathers with the dots. 64x32 is the 16-bit one for head_dim > 128 and float32 up to 128, 32x16
# the float32 one for head_dim > 128.
# The compile check shows the 16-bit ones spilling at most 8 bytes of registers on sm_80 and none on
# sm_90 (4 warps at 128 rows, or at 64 rows with 3 stages or head_dim 256, spill up to 56 bytes).
PREFILL_CONFIGS = (
    PrefillConfig(128, 64, 8, 2),
    PrefillConfig(128, 64, 8, 3),
    PrefillConfig(128, 32, 8, 3),
    PrefillConfig(64, 64, 4, 2),
    PrefillConfig(64, 32, 8, 2),
    PrefillConfig(32, 16, 4, 1),
)
INTERPRETER_CONFIG = PrefillConfig(64, 64, 4, 1)  # the interpreter is fastest with few, mid-size tiles


@triton.jit(do_not_specialize=["len_bucket"])
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
    len_bucket,  # unused by the code: a key of the autotuner
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,  # constexpr: a runtime bound on d would stop vectorised loads
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # cache block size; constexpr so // and % are shifts
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # the tuned parameters come last: the autotuner passes them by name
    BLOCK_N: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // BLOCK_G
    # Last query tiles first: under the causal mask they see the most keys, so the longest programs
    # start first and the short ones fill the tail of the grid.
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)
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

    rows = tl.arange(0, BLOCK_M)
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

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + req.to(tl.int64) * stride_bt_req
    # Keys before the tile's first query position are visible to every row: whole tiles of them
    # need no mask. The tile's last query token decides how far keys are needed at all.
    unmasked_end = (context_len + tile_start) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(seq_len, context_len + tile_start + BLOCK_Q)
    all_keys = tl.full([BLOCK_N], 1, tl.int1)
    for start in range(0, unmasked_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        k, v = load_kv_tile(
            key_cache_ptr, value_cache_ptr, bt_row, pos, all_keys, d, d_mask, kv_head,
            stride_kc_block, stride_kc_off, stride_kc_head, stride_vc_block, stride_vc_off, stride_vc_head,
            BLOCK_SIZE, DOT_DTYPE,
        )
        s = dot(q, tl.trans(k), DOT_DTYPE) * qk_scale  # [BLOCK_M, BLOCK_N]
        m_i, l_i, acc = online_softmax_update(s, v, m_i, l_i, acc, DOT_DTYPE)
    for start in range(unmasked_end, kv_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_mask = pos < kv_end
        k, v = load_kv_tile(
            key_cache_ptr, value_cache_ptr, bt_row, pos, pos_mask, d, d_mask, kv_head,
            stride_kc_block, stride_kc_off, stride_kc_head, stride_vc_block, stride_vc_off, stride_vc_head,
            BLOCK_SIZE, DOT_DTYPE,
        )
        s = dot(q, tl.trans(k), DOT_DTYPE) * qk_scale
        visible = pos_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = online_softmax_update(s, v, m_i, l_i, acc, DOT_DTYPE)

    o = acc / l_i[:, None]
    o_ptrs = out_ptr + (q_rows * stride_o_tok + heads * stride_o_head)[:, None] + d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=io_mask)


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = named_args | kwargs
    return [c for c in configs
            if _config_of(c).fits(args["BLOCK_G"], args["HEAD_DIM"], args["query_ptr"].element_size())]


def _config_of(config: triton.Config) -> PrefillConfig:
    return PrefillConfig(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


# A short timing per config (the tile choice is clear-cut), once per key per machine with cache_results.
_prefill_attention_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                           num_stages=c.num_stages) for c in PREFILL_CONFIGS],
    key=["HEAD_DIM", "BLOCK_G", "len_bucket"],  # and, added by the autotuner, every tensor's dtype
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
    cache_results=True,
)(_prefill_attention_kernel)

# (geometry key, length bucket) -> the config the autotuner chose for it
_tuned_configs: dict[tuple, PrefillConfig] = {}


def tuned_configs() -> dict[tuple, PrefillConfig]:
    """The autotuner's choices so far: (head_dim, BLOCK_G, length bucket, dtypes...) -> config."""
    return {tuple(key): _config_of(config) for key, config in _prefill_attention_tuned.cache.items()}


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
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its paged context.

    `config` forces a tile config (tests and the compile check go through each);
    by default CUDA autotunes and the interpreter runs `INTERPRETER_CONFIG`.
    """
    if out is None:
        out = torch.empty_like(query)
    geo = checked_geometry(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out)
    num_reqs = seq_lens.shape[0]
    if num_reqs == 0 or max_query_len == 0:
        return out

    group = geo.num_heads // geo.num_kv_heads
    block_g = next_power_of_2(group)
    bucket = len_bucket(max_query_len)
    args = (
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out,
        scale * _LOG2E, group, *geo.strides, bucket,
        block_g, geo.head_dim, geo.block_d, geo.block_size, geo.dot_dtype,
    )
    if config is None and query.device.type != "cuda":
        config = INTERPRETER_CONFIG
    if config is None:
        config = _tuned_configs.get((geo.key, bucket))
    if config is None:
        # First call of this key: the autotuner times the configs on it (or reads its disk cache),
        # then launches the best one; later calls launch that one directly.
        _prefill_attention_tuned[lambda meta: (cdiv(max_query_len, meta["BLOCK_M"] // block_g), num_reqs,
                                               geo.num_kv_heads)](*args)
        _tuned_configs[(geo.key, bucket)] = _config_of(_prefill_attention_tuned.best_config)
        return out
    # The byte limit is the GPU's (registers, shared memory); the interpreter has neither.
    assert query.device.type != "cuda" or config.fits(block_g, geo.head_dim, query.element_size()), \
        f"{config} does not fit group {group} (padded {block_g}), {query.dtype}, " \
        f"head_dim {geo.head_dim}"
    launch(
        _prefill_attention_kernel, ("prefill", geo.key, config),
        (cdiv(max_query_len, config.block_m // block_g), num_reqs, geo.num_kv_heads),
        args + (config.block_m, config.block_n), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
