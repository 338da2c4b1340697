"""The C++ CPU kernels (`kernels/cpu/`) against the torch references.

Outputs start as NaN, so a row a kernel should write and does not shows; the
attention caches hold NaN wherever no request may read (the reference gets
them zeroed, since it gathers whole blocks), so reading past a sequence shows
too. float32 must agree to ~1e-5 (the kernels sum in another order than
torch); float16/bfloat16 compute in float32 and round where transformers
does, so they agree to a rounding step of the storage dtype.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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
    # Speculative verify rows (the C++ kernel up to SHORT_QUERY_LEN = 17 tokens), either side of the bound.
    "verify": [(5, 40), (17, 300), (1, 64), (18, 18), (18, 90), (3, 200)],
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
    assert cpu_linear.pack_weight(weight.half()) is None, "float16 weights are not packed"


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


def _bad_calls() -> dict[str, tuple[Callable[[], object], str]]:
    """One wrong argument per call, keyed by what is wrong: (the call, the error it must raise).

    Calls go through `cpu_ops`, as the engine's do, where the wrapper takes the
    argument (outputs it allocates itself go to torch.ops directly), so
    `test_argument_checks_survive_python_O` shows that no check is a Python assert.
    """
    f32, bf16, ops = torch.float32, torch.bfloat16, torch.ops.pagedinfer_cpu
    x, weight = _randn(3, 8, dtype=f32, seed=1), torch.ones(8)

    def norm(**bad: object) -> object:
        return cpu_ops.rms_norm(**{"x": x, "weight": weight, "eps": 1e-6, **bad})

    def fused(**bad: object) -> object:
        return cpu_ops.fused_add_rms_norm(**{"x": x, "residual": x.clone(), "weight": weight, "eps": 1e-6, **bad})

    def fused_op(**bad: object) -> object:
        args = {"x": x, "residual": x.clone(), "weight": weight, "eps": 1e-6, "out": torch.empty_like(x),
                "residual_out": torch.empty_like(x)}
        return ops.fused_add_rms_norm(**{**args, **bad})

    def silu_op(**bad: object) -> object:
        return ops.silu_and_mul(**{"x": x, "out": torch.empty(3, 4), **bad})

    qk = _randn(5, 6, 16, dtype=f32, seed=2)
    cos_sin_cache = torch.ones(32, 16)

    def rotary(**bad: object) -> object:
        args = {"query": qk[:, :4], "key": qk[:, 4:], "positions": torch.arange(5), "cos_sin_cache": cos_sin_cache}
        return cpu_ops.apply_rotary_embedding(**{**args, **bad})

    caches = torch.zeros(2, 4, 8, 2, 16)

    def store(**bad: object) -> object:
        args = {"key": qk[:, :2], "value": qk[:, 2:4], "key_cache": caches[0], "value_cache": caches[1],
                "slot_mapping": torch.arange(5)}
        return cpu_ops.store_kv(**{**args, **bad})

    batch = _paged_batch(BATCHES["decode"], 4, 4, 32, 16, f32)  # seq_lens up to 300: up to 19 blocks of 16

    def attend(**bad: object) -> object:
        return cpu_ops.paged_attention(**{**batch, "scale": 0.1, **bad})

    num_rows, qsl = batch["query"].shape[0], batch["query_start_loc"]
    return {
        "rms_norm: 4-D x": (lambda: norm(x=x.view(3, 2, 2, 2)), r"rms_norm: x must be \[rows"),
        "rms_norm: int32 x": (lambda: norm(x=x.int()), "rms_norm: x must be float32"),
        "rms_norm: x strided in its last dim": (lambda: norm(x=_randn(8, 3, dtype=f32, seed=3).t()),
                                                "rms_norm: x must be contiguous in its last dim"),
        "rms_norm: short weight": (lambda: norm(weight=torch.ones(7)), "rms_norm: weight must be"),
        "rms_norm: bfloat16 weight": (lambda: norm(weight=weight.to(bf16)), "rms_norm: weight must be"),
        "rms_norm: strided weight": (lambda: norm(weight=torch.ones(16)[::2]), "rms_norm: weight must be"),
        "rms_norm: out of another shape": (lambda: norm(out=torch.empty(3, 9)), "rms_norm: out must be"),
        "rms_norm: bfloat16 out": (lambda: norm(out=torch.empty(3, 8, dtype=bf16)), "rms_norm: out must be"),
        "fused_add_rms_norm: 1-D x": (lambda: fused(x=weight, residual=weight), "fused_add_rms_norm: x must be"),
        "fused_add_rms_norm: short weight": (lambda: fused(weight=torch.ones(7)), "fused_add_rms_norm: weight must"),
        "fused_add_rms_norm: residual with a row more": (lambda: fused(residual=_randn(4, 8, dtype=f32, seed=4)),
                                                         "fused_add_rms_norm: residual must be"),
        "fused_add_rms_norm: bfloat16 residual": (lambda: fused(residual=x.to(bf16)),
                                                  "fused_add_rms_norm: residual must be"),
        "fused_add_rms_norm: out of another shape": (lambda: fused_op(out=torch.empty(3, 4)),
                                                     "fused_add_rms_norm: out must be"),
        "fused_add_rms_norm: residual_out strided in its last dim": (
            lambda: fused_op(residual_out=torch.empty(8, 3).t()), "fused_add_rms_norm: residual_out must be"),
        "silu_and_mul: 3-D x": (lambda: cpu_ops.silu_and_mul(x.view(3, 2, 4)), r"silu_and_mul: x must be \[tokens"),
        "silu_and_mul: odd x width": (lambda: cpu_ops.silu_and_mul(x[:, :7]), r"silu_and_mul: x must be \[tokens"),
        "silu_and_mul: int32 x": (lambda: cpu_ops.silu_and_mul(x.int()), "silu_and_mul: x must be float32"),
        "silu_and_mul: x strided in its last dim": (lambda: cpu_ops.silu_and_mul(x[:, ::2]),
                                                    "silu_and_mul: x must be contiguous"),
        "silu_and_mul: out of another width": (lambda: silu_op(out=torch.empty(3, 8)), "silu_and_mul: out must be"),
        "silu_and_mul: bfloat16 out": (lambda: silu_op(out=torch.empty(3, 4, dtype=bf16)),
                                       "silu_and_mul: out must be"),
        "rotary_embedding: 2-D query": (lambda: rotary(query=qk[:, 0]), "rotary_embedding: query and key must be"),
        "rotary_embedding: float64 query and key": (lambda: rotary(query=qk[:, :4].double(), key=qk[:, 4:].double()),
                                                    "rotary_embedding: query must be float32"),
        "rotary_embedding: bfloat16 key": (lambda: rotary(key=qk[:, 4:].to(bf16)), "rotary_embedding: key is"),
        "rotary_embedding: int32 positions": (lambda: rotary(positions=torch.arange(5, dtype=torch.int32)),
                                              "rotary_embedding: positions must be"),
        "rotary_embedding: strided positions": (lambda: rotary(positions=torch.arange(10)[::2]),
                                                "rotary_embedding: positions must be"),
        "rotary_embedding: a position short": (lambda: rotary(positions=torch.arange(4)),
                                               "rotary_embedding: one position per token"),
        "rotary_embedding: key of another head_dim": (lambda: rotary(key=qk[:, 4:, :8]),
                                                      "rotary_embedding: query and key need one even head_dim"),
        "rotary_embedding: odd head_dim": (lambda: rotary(query=qk[:, :4, :15], key=qk[:, 4:, :15],
                                                          cos_sin_cache=torch.ones(32, 15)),
                                           "rotary_embedding: query and key need one even head_dim"),
        "rotary_embedding: float16 cos_sin_cache": (lambda: rotary(cos_sin_cache=cos_sin_cache.half()),
                                                    "rotary_embedding: cos_sin_cache must be"),
        "rotary_embedding: cos_sin_cache of another head_dim": (lambda: rotary(cos_sin_cache=torch.ones(32, 8)),
                                                                "rotary_embedding: cos_sin_cache must be"),
        "store_kv: 3-D key_cache": (lambda: store(key_cache=caches[0, 0]), r"store_kv: key_cache must be \[blocks"),
        "store_kv: int32 caches": (lambda: store(key_cache=caches[0].int(), value_cache=caches[1].int()),
                                   "store_kv: key_cache must be float32"),
        "store_kv: value_cache of another shape": (lambda: store(value_cache=caches[1, :1]),
                                                   "store_kv: value_cache must be"),
        "store_kv: bfloat16 key": (lambda: store(key=qk[:, :2].to(bf16)), "store_kv: key must be"),
        "store_kv: value with another head count": (lambda: store(value=qk[:, 2:5]), "store_kv: value must be"),
        "store_kv: a slot short": (lambda: store(slot_mapping=torch.arange(4)), "store_kv: key must be"),
        "store_kv: int32 slot_mapping": (lambda: store(slot_mapping=torch.arange(5, dtype=torch.int32)),
                                         "store_kv: slot_mapping must be"),
        "store_kv: key strided in its last dim": (lambda: store(key=_randn(5, 2, 32, dtype=f32, seed=5)[..., ::2]),
                                                  "store_kv: key must be"),
        "paged_attention: 2-D query": (lambda: attend(query=batch["query"][:, 0]),
                                       r"paged_attention: query must be \[tokens"),
        "paged_attention: float64 query": (lambda: attend(query=batch["query"].double()),
                                           "paged_attention: query must be float32"),
        "paged_attention: out with a row less": (lambda: attend(out=torch.empty(num_rows - 1, 4, 32)),
                                                 "paged_attention: out must be"),
        "paged_attention: bfloat16 out": (lambda: attend(out=torch.empty(num_rows, 4, 32, dtype=bf16)),
                                          "paged_attention: out must be"),
        "paged_attention: 3-D key_cache": (lambda: attend(key_cache=batch["key_cache"][0]),
                                           r"paged_attention: key_cache must be \[blocks"),
        "paged_attention: bfloat16 caches": (lambda: attend(key_cache=batch["key_cache"].to(bf16),
                                                            value_cache=batch["value_cache"].to(bf16)),
                                             "paged_attention: key_cache is BFloat16"),
        "paged_attention: value_cache of another shape": (lambda: attend(value_cache=batch["value_cache"][:-1]),
                                                          "paged_attention: value_cache must be"),
        "paged_attention: caches of another head_dim": (
            lambda: attend(key_cache=batch["key_cache"][..., :16], value_cache=batch["value_cache"][..., :16]),
            "paged_attention: the caches' head_dim"),
        "paged_attention: heads that do not split into the KV heads": (
            lambda: attend(query=torch.zeros(num_rows, 6, 32), out=torch.empty(num_rows, 6, 32)),
            "paged_attention: 6 query heads do not split into 4 KV heads"),
        "paged_attention: int64 block_tables": (lambda: attend(block_tables=batch["block_tables"].long()),
                                                "paged_attention: block_tables must be int32"),
        "paged_attention: block_tables with a row less": (lambda: attend(block_tables=batch["block_tables"][:-1]),
                                                          "paged_attention: block_tables must be int32"),
        "paged_attention: int64 seq_lens": (lambda: attend(seq_lens=batch["seq_lens"].long()),
                                            "paged_attention: seq_lens must be"),
        "paged_attention: query_start_loc an entry short": (lambda: attend(query_start_loc=qsl[:-1]),
                                                            "paged_attention: query_start_loc needs"),
        "paged_attention: query_start_loc past the query rows": (
            lambda: attend(query_start_loc=torch.cat([qsl[:-1], qsl[-1:] + num_rows])),
            r"paged_attention: query_start_loc\[5\]"),
        "paged_attention: decreasing query_start_loc": (lambda: attend(query_start_loc=qsl.flip(0)),
                                                        r"paged_attention: query_start_loc\[1\]"),
        # The block-table bound: a request whose seq_len needs more blocks than a table row holds.
        "paged_attention: block_tables narrower than a request's blocks": (
            lambda: attend(block_tables=batch["block_tables"][:, :2]),
            "paged_attention: request 2 needs 4 blocks, the table has 2"),
        "pack_linear_weight: 1-D weight": (lambda: ops.pack_linear_weight(torch.ones(8)),
                                           "pack_linear_weight: weight must be 2-D float32"),
        "pack_linear_weight: 3-D weight": (lambda: ops.pack_linear_weight(torch.ones(2, 8, 4)),
                                           "pack_linear_weight: weight must be 2-D float32"),
        "pack_linear_weight: float64 weight": (lambda: ops.pack_linear_weight(torch.ones(8, 4, dtype=torch.float64)),
                                               "pack_linear_weight: weight must be 2-D float32"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_ops_reject_bad_arguments(case: str) -> None:
    call, message = _bad_calls()[case]
    with pytest.raises(RuntimeError, match=message):
        call()


def test_argument_checks_survive_python_O() -> None:
    """The rejection tests again under `python -O`, which strips asserts: no check may be one."""
    done = subprocess.run(
        [sys.executable, "-O", "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "reject"],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
