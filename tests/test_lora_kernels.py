"""The LoRA shrink and expand kernels against their torch references, and the
engine's CPU path (masked matmuls, fused parts apart) against the same references.

The cases, tolerances and interpreter switch are tests/test_layer_kernels.py's
(without CUDA the kernels run in Triton's interpreter, switched on at its
import when nothing has imported Triton yet; if something had, the CPU cases
are skipped: run this file on its own). Outputs are
poisoned: shrink's `out` starts as NaN, so a row it forgets fails; expand's
`out` is a view into a NaN-bordered tensor, and the border and the rows of
slot 0 must come back bit for bit. The stacks hold no slot 0 (slot s is row
s - 1); they start NaN-poisoned past their rows, so a kernel that reads
slot 0's would-be row, or s rather than s - 1 past the end, fails.
"""

from __future__ import annotations

import pytest
import test_layer_kernels as layer_cases  # first: it switches the interpreter on before Triton loads
import torch

from kernels import reference
from kernels.lora import lora_expand, lora_shrink

CASES, TOLERANCE, _need_kernels = layer_cases.CASES, layer_cases.TOLERANCE, layer_cases._need_kernels

# (num_tokens, in_features, out_features, width, num_loras): ranks 1 to 64, fused widths (3 x 16, 3 x 64),
# feature counts off the tiles, a batch with one token.
SHAPES = [(1, 64, 64, 1, 1), (7, 100, 96, 8, 2), (16, 576, 960, 48, 4), (5, 200, 130, 64, 1), (9, 64, 300, 4, 8), (3, 64, 80, 192, 2)]


def _inputs(device: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0):
    num_tokens, in_features, out_features, width, num_loras = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, in_features, generator=gen).to(device, dtype)
    # One NaN row on each side of the stacks: slot s must read row s - 1 and nothing else.
    a_store = torch.full((num_loras + 2, width, in_features), float("nan")).to(device, dtype)
    lora_a = a_store[1:-1]
    lora_a.copy_(torch.randn(num_loras, width, in_features, generator=gen).div(in_features**0.5))
    # Stored as the engine stores it, [out, slots, width], and passed as a [slots, width, out] view.
    b_store = torch.full((out_features, num_loras + 2, width), float("nan")).to(device, dtype)
    b_store[:, 1:-1] = torch.randn(out_features, num_loras, width, generator=gen).div(width**0.5)
    lora_b = b_store.permute(1, 2, 0)[1:-1]
    # Every slot, 0 (no adapter) included, mixed in batch order.
    slots = torch.randint(0, num_loras + 1, (num_tokens,), generator=gen, dtype=torch.int32)
    slots[0] = 0 if num_tokens > 1 else num_loras
    slots[-1] = num_loras  # at least one token has the last slot
    return x, lora_a, lora_b, slots.to(device)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_lora_shrink(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    _need_kernels(device)
    x, lora_a, _, slots = _inputs(device, dtype, shape)
    out = torch.full((shape[0], shape[3]), float("nan"), device=device)
    lora_shrink(x, lora_a, slots, out)
    torch.testing.assert_close(out, reference.lora_shrink(x, lora_a, slots), atol=1e-5, rtol=1e-5)
    assert (out[slots == 0] == 0).all()


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_lora_expand(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    _need_kernels(device)
    x, lora_a, lora_b, slots = _inputs(device, dtype, shape)
    num_tokens, out_features = shape[0], shape[2]
    y = reference.lora_shrink(x, lora_a, slots)
    padded = torch.full((num_tokens, out_features + 8), float("nan"), device=device, dtype=dtype)
    out = padded[:, 4 : 4 + out_features]
    out.copy_(torch.randn(num_tokens, out_features).to(device, dtype))
    want = out.clone()
    reference.lora_expand(y, lora_b, slots, want)
    base_rows = out[slots == 0].clone()
    lora_expand(y, lora_b, slots, out)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)
    assert torch.equal(out[slots == 0], base_rows)
    assert padded[:, :4].isnan().all() and padded[:, 4 + out_features :].isnan().all()


@pytest.mark.parametrize("device,dtype", CASES)
def test_empty_batch_and_all_base(device: str, dtype: torch.dtype) -> None:
    _need_kernels(device)
    x, lora_a, lora_b, _ = _inputs(device, dtype, (4, 64, 32, 8, 2))
    assert lora_shrink(x[:0], lora_a, torch.zeros(0, dtype=torch.int32, device=device)).shape == (0, 8)
    slots = torch.zeros(4, dtype=torch.int32, device=device)
    out = torch.randn(4, 32).to(device, dtype)
    before = out.clone()
    lora_expand(lora_shrink(x, lora_a, slots), lora_b, slots, out)
    assert torch.equal(out, before)


@pytest.mark.parametrize("device,dtype", CASES)
def test_wrappers_check_their_inputs(device: str, dtype: torch.dtype) -> None:
    x, lora_a, lora_b, slots = _inputs(device, dtype, (4, 64, 32, 8, 2))
    with pytest.raises(AssertionError, match="token_slots must be torch.int32"):
        lora_shrink(x, lora_a, slots.long())
    with pytest.raises(AssertionError, match="x has 32 features"):
        lora_shrink(x[:, :32].contiguous(), lora_a, slots)
    with pytest.raises(AssertionError, match="contiguous in its last dim"):
        lora_shrink(x, lora_a.transpose(1, 2).contiguous().transpose(1, 2), slots)
    with pytest.raises(AssertionError, match="y must be float32"):
        lora_expand(x[:, :8].double(), lora_b, slots, torch.zeros(4, 32, device=device, dtype=dtype))
    with pytest.raises(AssertionError, match="token_slots has 3 rows"):
        lora_shrink(x, lora_a, slots[:3])


@pytest.mark.parametrize("num_parts", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_masked_path_matches_reference(shape: tuple[int, ...], num_parts: int) -> None:
    """The engine's CPU LoRA linear (base and masked shrink in one call, each fused part's expand on its
    own output rows) equals F.linear plus shrink + expand part by part, packed or not."""
    from inference.lora.layers import LoRABatch, OutPart, linear_lora_masked
    from kernels import cpu_linear

    num_tokens, in_features, out_features, rank, num_loras = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, in_features + 3, generator=gen)[:, :in_features]  # strided rows
    base = torch.nn.Linear(in_features, out_features)
    lora_a = torch.randn(num_parts, num_loras, rank, in_features, generator=gen).div(in_features**0.5)
    lora_b_t = torch.randn(out_features, num_loras, rank, generator=gen).div(rank**0.5)
    bounds = [out_features * p // num_parts for p in range(num_parts + 1)]
    parts = [OutPart(lo, hi - lo, 0) for lo, hi in zip(bounds, bounds[1:])]
    slots = torch.randint(0, num_loras + 1, (num_tokens,), generator=gen, dtype=torch.int32)
    slots[-1] = num_loras
    batch = LoRABatch()
    batch.set(slots)
    with torch.no_grad():
        want = base(x)
        for p, part in enumerate(parts):
            rows = slice(part.row, part.row + part.num_rows)
            y = reference.lora_shrink(x, lora_a[p], slots)
            reference.lora_expand(y, lora_b_t[rows].permute(1, 2, 0), slots, want[:, rows])
        width = num_loras * rank
        base.packed_weight = None
        got = linear_lora_masked(x, base, lora_a, lora_b_t, parts, batch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        base.packed_weight = cpu_linear.pack_weight(base.weight)
        packed_a = cpu_linear.pack_weight(lora_a.view(-1, in_features))
        packed_b = [cpu_linear.pack_weight(lora_b_t[p.row : p.row + p.num_rows].view(p.num_rows, width)) for p in parts]
        assert packed_a is not None, "the C++ kernels must be built for the packed case"
        got = linear_lora_masked(x, base, lora_a, lora_b_t, parts, batch, packed_a, packed_b)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        plain = cpu_linear.linear(x, base.weight, base.bias, base.packed_weight)
        assert torch.equal(got[slots == 0], plain[slots == 0])  # base rows exactly as without LoRA


def test_cpu_lora_linear_rejects_a_slot_past_the_stacks() -> None:
    from kernels import cpu_linear

    weight, lora_a, lora_b = torch.randn(32, 16), torch.randn(2 * 4, 16), torch.randn(32, 2 * 4)
    packed = [cpu_linear.pack_weight(w) for w in (weight, lora_a, lora_b)]
    assert all(p is not None for p in packed), "the C++ kernels must be built"
    x = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="token 1 has slot 3, past the 2 slots"):
        cpu_linear.lora_linear(x, packed[0], None, packed[1], [packed[2]], [32], torch.tensor([1, 3, 0], dtype=torch.int32), 2, 4)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("num_parts", [1, 3])
def test_device_path_matches_reference(device: str, dtype: torch.dtype, num_parts: int) -> None:
    """The engine's device path (what the decode graphs capture): a shrink and an expand a fused part,
    slots read from a view of a longer step buffer, parts writing their own columns of the output."""
    _need_kernels(device)
    from inference.lora.layers import OutPart, add_lora_kernels

    num_tokens, in_features, rank, num_loras = 6, 64, 8, 3
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(num_tokens, in_features, generator=gen).to(device, dtype)
    lora_a = torch.randn(num_parts, num_loras, rank, in_features, generator=gen).div(8).to(device, dtype)
    rows = [48, 16, 16][:num_parts]
    lora_b_t = torch.randn(sum(rows), num_loras, rank, generator=gen).div(3).to(device, dtype)
    parts = [OutPart(sum(rows[:p]), n, 0) for p, n in enumerate(rows)]
    buffer = torch.tensor([0, 3, 1, 0, 2, 3, 7, 7], dtype=torch.int32, device=device)  # the tail: past the batch
    slots = buffer[:num_tokens]
    out = torch.randn(num_tokens, sum(rows), generator=gen).to(device, dtype)
    want = out.clone()
    for p, part in enumerate(parts):
        cols = slice(part.row, part.row + part.num_rows)
        reference.lora_expand(reference.lora_shrink(x, lora_a[p], slots), lora_b_t[cols].permute(1, 2, 0), slots,
                              want[:, cols])
    before = out.clone()
    add_lora_kernels(x, lora_a, lora_b_t, parts, slots, out)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)
    assert torch.equal(out[slots == 0], before[slots == 0])
    assert not torch.equal(out, before)
