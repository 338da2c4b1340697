"""The C++ CPU kernels (`kernels/cpu/`) against the torch references.

Outputs start as NaN, so a row a kernel should write and does not shows; the
attention caches hold NaN wherever no request may read (the reference gets
them zeroed, since it gathers whole blocks), so reading past a sequence shows
too. float32 must agree to ~1e-5 (the kernels sum in another order than
torch); float16/bfloat16 compute in float32 and round where transformers
does, so they agree to a rounding step of the storage dtype.
"""

from __future__ import annotations

import sys

import pytest
import torch

import kernels
from kernels import cpu_ops, reference

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the CPU kernels build on Linux")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (atol, rtol) against the reference in the same dtype
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
# (num_heads, num_kv_heads, head_dim): GQA groups 1, 3, 4, 8 and odd head_dims;
# 36 is no multiple of the 8- or 16-lane vectors, so the kernels' plain loops run
HEAD_SHAPES = [(9, 3, 64), (4, 4, 32), (8, 2, 80), (16, 2, 128), (6, 2, 36)]
# (query_len, seq_len) per request: decode rows with short and long contexts,
# a first prompt chunk, a later chunk starting mid-block, a one-token context
BATCHES = {
    "decode": [(1, 1), (1, 17), (1, 64), (1, 300), (1, 33)],
    "mixed": [(1, 40), (24, 24), (1, 5), (9, 70), (1, 129)],
}


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert cpu_ops.available(), "the CPU kernels did not build (see the warning logged by kernels.cpu_ops)"


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _paged_batch(requests: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(len(requests) * 7 + head_dim)
    blocks = [-(-seq_len // block_size) for _, seq_len in requests]
    num_blocks = sum(blocks) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache, value_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    block_tables = torch.full((len(requests), max(blocks) + 1), -1, dtype=torch.int32)
    ids = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    for r, (_, seq_len) in enumerate(requests):
        block_tables[r, : blocks[r]] = ids[sum(blocks[:r]) : sum(blocks[: r + 1])]
        slots = (block_tables[r, : blocks[r]].long()[:, None] * block_size + torch.arange(block_size)).flatten()
        for cache in (key_cache, value_cache):
            cache.view(-1, num_kv_heads, head_dim)[slots[:seq_len]] = torch.randn(
                seq_len, num_kv_heads, head_dim, generator=gen)
    query_lens = [n for n, _ in requests]
    # q as a strided view of a fused qkv output, two rows past the last request
    qkv = torch.randn(sum(query_lens) + 2, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    return dict(
        query=qkv[:, :num_heads], key_cache=key_cache.to(dtype), value_cache=value_cache.to(dtype),
        block_tables=block_tables, seq_lens=torch.tensor([s for _, s in requests], dtype=torch.int32),
        query_start_loc=torch.tensor([0] + query_lens).cumsum(0).to(torch.int32),
        max_query_len=max(query_lens), max_seq_len=max(s for _, s in requests),
    )


def _reference_attention(batch: dict, scale: float) -> torch.Tensor:
    clean = dict(batch, key_cache=batch["key_cache"].nan_to_num(0.0), value_cache=batch["value_cache"].nan_to_num(0.0))
    return reference.paged_attention(**clean, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEAD_SHAPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("kind", BATCHES)
def test_paged_attention(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                         kind: str) -> None:
    batch = _paged_batch(BATCHES[kind], num_heads, num_kv_heads, head_dim, block_size, dtype)
    num_tokens = int(batch["query_start_loc"][-1])
    out = torch.full(batch["query"].shape, float("nan"), dtype=dtype)
    cpu_ops.paged_attention(**batch, scale=head_dim**-0.5, out=out)
    expected = _reference_attention(batch, head_dim**-0.5)
    _assert_close(out[:num_tokens], expected[:num_tokens])
    assert out[num_tokens:].isnan().all(), "rows that belong to no request were written"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_kernel_computes_prompt_rows_too(dtype: torch.dtype) -> None:
    """The C++ kernel is causal for any query length; the wrapper sends prompt
    chunks to SDPA only because matrix products are faster there."""
    batch = _paged_batch(BATCHES["mixed"], 8, 2, 64, 16, dtype)
    out = torch.full(batch["query"].shape, float("nan"), dtype=dtype)
    torch.ops.pagedinfer_cpu.paged_attention(
        batch["query"], batch["key_cache"], batch["value_cache"], batch["block_tables"], batch["seq_lens"],
        batch["query_start_loc"], batch["max_seq_len"], 0.125, batch["max_query_len"], out,
    )
    num_tokens = int(batch["query_start_loc"][-1])
    _assert_close(out[:num_tokens], _reference_attention(batch, 0.125)[:num_tokens])


def test_attention_rejects_a_block_id_outside_the_cache() -> None:
    batch = _paged_batch(BATCHES["decode"], 4, 4, 32, 16, torch.float32)
    batch["block_tables"][1, 0] = batch["key_cache"].shape[0]
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_ops.paged_attention(**batch, scale=0.1)
    batch["block_tables"][1, 0] = 0
    batch["seq_lens"][2] = batch["max_seq_len"] + 1
    with pytest.raises(RuntimeError, match="max_seq_len"):
        cpu_ops.paged_attention(**batch, scale=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [8, 16])
def test_store_kv(dtype: torch.dtype, block_size: int) -> None:
    num_tokens, num_kv_heads, head_dim, num_blocks = 23, 3, 64, 6
    kv = _randn(num_tokens, 2 * num_kv_heads, head_dim, dtype=dtype, seed=1)  # key and value: views of one output
    key, value = kv[:, :num_kv_heads], kv[:, num_kv_heads:]
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(2))[:num_tokens]
    slots[[0, 5, 22]] = -1  # padding rows are not stored
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    cpu_ops.store_kv(key, value, *caches, slots)
    reference.store_kv(key, value, *expected, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    with pytest.raises(RuntimeError, match="past the cache"):
        cpu_ops.store_kv(key, value, *caches, torch.full_like(slots, num_blocks * block_size))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 100, 576])
@pytest.mark.parametrize("num_rows", [1, 7, 48])
def test_rms_norms(dtype: torch.dtype, hidden: int, num_rows: int) -> None:
    x = _randn(num_rows, hidden, dtype=dtype, seed=3)
    residual = _randn(num_rows, hidden, dtype=dtype, seed=4)
    weight = (1 + 0.1 * _randn(hidden, dtype=torch.float32, seed=5)).to(dtype)
    _assert_close(cpu_ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    out, residual_out = cpu_ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    expected, expected_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(residual_out, expected_residual)  # one rounded add, as torch does it
    _assert_close(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEAD_SHAPES)
def test_per_head_norm_in_place_on_qkv_slices(dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                                              head_dim: int) -> None:
    qkv = _randn(5, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, seed=6)
    q = qkv[:, :num_heads]
    weight = (1 + 0.1 * _randn(head_dim, dtype=torch.float32, seed=7)).to(dtype)
    expected = reference.rms_norm(q, weight, 1e-6)
    untouched = qkv[:, num_heads:].clone()
    cpu_ops.rms_norm(q, weight, 1e-6, out=q)
    _assert_close(q, expected)
    assert torch.equal(qkv[:, num_heads:], untouched), "k or v was written"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEAD_SHAPES)
def test_rotary_embedding(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    qkv = _randn(11, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, seed=8)
    expected = qkv.clone()
    positions = torch.tensor([0, 1, 2, 17, 511, 3, 100, 4, 4, 9, 1000])
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    freqs = torch.arange(1024).float()[:, None] * inv_freq[None, :]
    cos_sin_cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * 1.1
    for t in (qkv, expected):
        q, k = t[:, :num_heads], t[:, num_heads : num_heads + num_kv_heads]
        (cpu_ops if t is qkv else reference).apply_rotary_embedding(q, k, positions, cos_sin_cache)
    _assert_close(qkv, expected)
    assert torch.equal(qkv[:, num_heads + num_kv_heads :], expected[:, num_heads + num_kv_heads :]), "v was written"
    with pytest.raises(RuntimeError, match="outside"):
        cpu_ops.apply_rotary_embedding(q, k, torch.full_like(positions, 1024), cos_sin_cache)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("intermediate", [64, 100, 1536])
def test_silu_and_mul(dtype: torch.dtype, intermediate: int) -> None:
    wide = _randn(9, 2 * intermediate + 8, dtype=dtype, seed=9) * 4  # rows strided past 2 * intermediate
    x = wide[:, : 2 * intermediate]
    _assert_close(cpu_ops.silu_and_mul(x), reference.silu_and_mul(x))


def test_dispatch_takes_the_cpu_kernels() -> None:
    assert kernels._cpu() is cpu_ops


# (out_features, in_features): panel tails of 1, 7 and 4 columns on both
# vector widths (16/32-column panels), one-column and odd in_features, SmolLM2's gate_up
LINEAR_SHAPES = [(1, 5), (7, 64), (100, 33), (17, 576), (1536, 576)]


@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 5, 6, 7, 13, 48])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_kernel_matches_f_linear(num_rows: int, shape: tuple[int, int], bias: bool) -> None:
    out_features, in_features = shape
    weight = _randn(out_features, in_features, dtype=torch.float32, seed=10) * 0.05
    b = _randn(out_features, dtype=torch.float32, seed=11) if bias else None
    wide = _randn(num_rows, in_features + 3, dtype=torch.float32, seed=12)  # rows strided past in_features
    x = wide[:, :in_features]
    out = torch.full((num_rows, out_features), float("nan"))
    torch.ops.pagedinfer_cpu.linear(x, torch.ops.pagedinfer_cpu.pack_linear_weight(weight), b, out)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_rows", [1, 16, 512, 600])
def test_packed_linear_routes_by_row_count(num_rows: int) -> None:
    from kernels import cpu_linear

    weight = _randn(96, 64, dtype=torch.float32, seed=10)
    packed = cpu_linear.pack_weight(weight)
    assert packed is not None
    x = _randn(num_rows, 64, dtype=torch.float32, seed=12)
    torch.testing.assert_close(cpu_linear.linear(x, weight, None, packed), torch.nn.functional.linear(x, weight))
    assert cpu_linear.pack_weight(weight.to(torch.bfloat16)) is None, "only float32 weights are packed"


def test_linear_kernel_rejects_bad_arguments() -> None:
    weight = _randn(40, 24, dtype=torch.float32, seed=1)
    packed = torch.ops.pagedinfer_cpu.pack_linear_weight(weight)
    x = _randn(3, 24, dtype=torch.float32, seed=2)
    cases = {
        "other in_features": (_randn(3, 20, dtype=torch.float32, seed=2), packed, None, torch.empty(3, 40)),
        # out_features is checked to the panel (16 or 32 columns): 70 is past both.
        "more out_features than packed": (x, packed, None, torch.empty(3, 70)),
        "fewer out_features than packed": (x, packed, None, torch.empty(3, 16)),
        "out rows": (x, packed, None, torch.empty(4, 40)),
        "float64 x": (x.double(), packed, None, torch.empty(3, 40)),
        "x strided in its last dim": (_randn(24, 3, dtype=torch.float32, seed=3).t(), packed, None, torch.empty(3, 40)),
        "short bias": (x, packed, torch.zeros(39), torch.empty(3, 40)),
        "not packed": (x, weight, None, torch.empty(3, 40)),
    }
    for args in cases.values():  # the keys say what is wrong
        with pytest.raises(RuntimeError, match="linear: "):
            torch.ops.pagedinfer_cpu.linear(*args)
