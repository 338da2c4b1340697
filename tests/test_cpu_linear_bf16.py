"""The AVX512-BF16 linear kernel (kernels/cpu/linear_bf16.cpp) and its dispatch in kernels/cpu_linear.py.

Two oracles: the float32 product of the same bf16 values rounded once to bf16
(what the kernel computes, up to float32 summation order: at most one bf16
step apart where the two sums straddle a rounding boundary), and torch's bf16
F.linear (oneDNN, also float32 sums rounded once; two steps allowed, for its
own blocking). Skipped where the CPU (so the build) lacks avx512_bf16.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_linear, cpu_ops

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the CPU kernels build on Linux")

# One bf16 step is at most 2**-7 of the value (8 significant bits); atol for sums that cancel to near 0,
# where float32 summation order alone moves them (measured 1.6e-5 at 1536 unit-scale terms).
ONE_STEP = {"atol": 1e-4, "rtol": 2.0**-7}
TWO_STEPS = {"atol": 1e-2, "rtol": 2.0**-6}
# (out_features, in_features): panel tails (32-column panels) of 1, 7, 4 and 17 columns, in_features 1,
# odd ones and an odd one past a cache line of pairs, and SmolLM2's down shape.
SHAPES = [(1, 5), (7, 64), (100, 33), (17, 1), (49, 577), (576, 1536)]


@pytest.fixture(scope="module", autouse=True)
def bf16_kernel() -> None:
    assert cpu_ops.available(), "the CPU kernels did not build (see the warning logged by kernels.cpu_ops)"
    if not torch.ops.pagedinfer_cpu.has_linear_bf16():
        pytest.skip("this CPU has no avx512_bf16: the bf16 linear kernel is not built")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = torch.full((x.shape[0], weight.shape[0]), float("nan"), dtype=torch.bfloat16)  # poisoned
    torch.ops.pagedinfer_cpu.linear_bf16(x, torch.ops.pagedinfer_cpu.pack_linear_weight_bf16(weight), bias, out)
    return out


@pytest.mark.parametrize("num_rows", [1, 2, 5, 12, 13, 30])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_the_float32_product_rounded_once(num_rows: int, shape: tuple[int, int], bias: bool) -> None:
    out_features, in_features = shape
    weight = _randn(out_features, in_features, seed=10)
    b = _randn(out_features, seed=11) if bias else None
    # Rows strided past in_features and starting at an odd element: pairs are read unaligned, and an odd
    # in_features' last element is followed by a NaN the kernel must not multiply in.
    wide = _randn(num_rows, in_features + 3, seed=12)
    wide[:, in_features + 1] = float("nan")
    x = wide[:, 1 : in_features + 1]
    expected = x.float() @ weight.float().T + (b.float() if bias else 0.0)
    torch.testing.assert_close(_run(x, weight, b).float(), expected.to(torch.bfloat16).float(), **ONE_STEP)


@pytest.mark.parametrize("num_rows", [1, 16, 48])
@pytest.mark.parametrize("shape", [(960, 576), (192, 576), (3072, 576), (576, 1536)], ids=str)
def test_matches_torch_bf16_f_linear(num_rows: int, shape: tuple[int, int]) -> None:
    out_features, in_features = shape
    weight = _randn(out_features, in_features, seed=20) * 0.05
    b = _randn(out_features, seed=21)
    x = _randn(num_rows, in_features, seed=22)
    torch.testing.assert_close(_run(x, weight, b).float(), F.linear(x, weight, b).float(), **TWO_STEPS)


@pytest.mark.parametrize("num_rows", [1, 512, 600])
def test_cpu_linear_packs_bf16_and_routes_by_row_count(num_rows: int) -> None:
    assert cpu_linear.packs(torch.bfloat16)
    weight = _randn(96, 63, seed=30)
    packed = cpu_linear.pack_weight(weight)
    assert packed is not None and packed.dtype == torch.bfloat16
    x = _randn(num_rows, 63, seed=31)
    out = cpu_linear.linear(x, weight, None, packed)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x, weight).float(), **TWO_STEPS)


def test_env_switch_keeps_bf16_on_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_linear.CPU_BF16_LINEAR_ENV, "0")
    cpu_linear.has_bf16_kernel.cache_clear()
    try:
        assert not cpu_linear.packs(torch.bfloat16) and cpu_linear.pack_weight(_randn(8, 8, seed=1)) is None
        assert cpu_linear.packs(torch.float32), "the switch is bf16's alone"
    finally:
        monkeypatch.undo()
        cpu_linear.has_bf16_kernel.cache_clear()


@pytest.fixture
def bf16_mode(monkeypatch: pytest.MonkeyPatch):
    """Set PAGEDINFER_CPU_BF16_LINEAR for the test (its reads are cached: cleared both ways)."""

    def set_mode(mode: str) -> None:
        monkeypatch.setenv(cpu_linear.CPU_BF16_LINEAR_ENV, mode)
        cpu_linear.has_bf16_kernel.cache_clear()
        cpu_linear.packs_onednn.cache_clear()

    yield set_mode
    monkeypatch.undo()
    cpu_linear.has_bf16_kernel.cache_clear()
    cpu_linear.packs_onednn.cache_clear()


@pytest.mark.parametrize("num_rows", [1, 15, 16, 48, 600])
def test_onednn_takes_batches_from_its_row_count(bf16_mode, num_rows: int) -> None:
    """PAGEDINFER_CPU_BF16_LINEAR=onednn (the default split on AMX CPUs): oneDNN's packed primitive from
    ONEDNN_MIN_ROWS rows, which is torch's bf16 F.linear (the same oneDNN), the kernel below."""
    bf16_mode("onednn")
    if not cpu_linear.packs_onednn():
        pytest.skip("torch's oneDNN has no bf16 on this CPU")
    weight = _randn(200, 96, seed=40) * 0.1
    bias = _randn(200, seed=41)
    packed, onednn = cpu_linear.pack_weight(weight), cpu_linear.pack_onednn(weight)
    assert packed is not None and onednn is not None
    x = _randn(num_rows + 3, 96, seed=42)[3:]
    out = cpu_linear.linear(x, weight, bias, packed, onednn)
    if num_rows >= cpu_linear.ONEDNN_MIN_ROWS:
        torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, cpu_linear.linear(x, weight, bias, packed), rtol=0, atol=0)
    torch.testing.assert_close(out.float(), F.linear(x, weight, bias).float(), **TWO_STEPS)


def test_onednn_copies_only_where_asked(bf16_mode) -> None:
    weight = _randn(8, 8, seed=1)
    bf16_mode("kernel")
    assert not cpu_linear.packs_onednn() and cpu_linear.pack_onednn(weight) is None
    bf16_mode("1")
    assert cpu_linear.packs_onednn() == ("amx_bf16" in cpu_ops.cpu_info("flags").split())
    bf16_mode("onednn")
    assert cpu_linear.pack_onednn(weight.float()) is None, "bf16 weights only"


def test_rejects_bad_arguments() -> None:
    ops = torch.ops.pagedinfer_cpu
    weight = _randn(40, 25, seed=1)
    packed = ops.pack_linear_weight_bf16(weight)
    x = _randn(3, 25, seed=2)
    out = torch.empty(3, 40, dtype=torch.bfloat16)
    cases = {
        # 24 input features pack into as many k pairs as 25: the view's shape still tells them apart.
        "other in_features, same pairs": (_randn(3, 24, seed=2), packed, None, out),
        "more out_features than packed": (x, packed, None, torch.empty(3, 70, dtype=torch.bfloat16)),
        "fewer out_features than packed": (x, packed, None, torch.empty(3, 8, dtype=torch.bfloat16)),
        "out rows": (x, packed, None, torch.empty(4, 40, dtype=torch.bfloat16)),
        "float32 x": (x.float(), packed, None, out),
        "float32 out": (x, packed, None, torch.empty(3, 40)),
        "x strided in its last dim": (_randn(25, 3, seed=3).t(), packed, None, out),
        "short bias": (x, packed, torch.zeros(39, dtype=torch.bfloat16), out),
        "float32 bias": (x, packed, torch.zeros(40), out),
        "not packed": (x, weight, None, out),
        "packed copied without its pad row": (x, packed.contiguous(), None, out),
        "float32 pack": (x, ops.pack_linear_weight(weight.float()), None, out),
    }
    for args in cases.values():  # the keys say what is wrong
        with pytest.raises(RuntimeError, match="linear_bf16: "):
            ops.linear_bf16(*args)
    for bad in (torch.ones(8, dtype=torch.bfloat16), torch.ones(8, 4)):
        with pytest.raises(RuntimeError, match="pack_linear_weight_bf16: weight must be 2-D bfloat16"):
            ops.pack_linear_weight_bf16(bad)


def test_a_packed_layer_keeps_and_counts_both_copies(bf16_mode) -> None:
    from inference.parallel.layers import PackableLinear

    bf16_mode("onednn")
    if not cpu_linear.packs_onednn():
        pytest.skip("torch's oneDNN has no bf16 on this CPU")
    layer = PackableLinear(64, 48, bias=True).to(torch.bfloat16)
    assert layer.pack() == 2 * 48 * 64 * 2
    x = _randn(32, 64, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
