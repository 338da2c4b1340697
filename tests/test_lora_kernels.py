"""The LoRA shrink and expand kernels against their torch references, and the
engine's CPU path (per-slot segments) against the same references.

The cases, tolerances and interpreter switch are tests/test_layer_kernels.py's
(without CUDA the kernels run in Triton's interpreter, switched on at its
import when nothing has imported Triton yet; if something had, the CPU cases
are skipped: run this file on its own). Outputs are
poisoned: shrink's `out` starts as NaN, so a row it forgets fails; expand's
`out` is a view into a NaN-bordered tensor, and the border and the rows of
slot 0 must come back bit for bit.
"""

from __future__ import annotations

import pytest
import test_layer_kernels as layer_cases  # first: it switches the interpreter on before Triton loads
import torch

from kernels import reference
from kernels.lora import lora_expand, lora_shrink

CASES, TOLERANCE, _need_kernels = layer_cases.CASES, layer_cases.TOLERANCE, layer_cases._need_kernels

# (num_tokens, in_features, out_features, width, num_slots): ranks 1 to 64, fused widths (3 x 16, 3 x 64),
# feature counts off the tiles, a batch with one token.
SHAPES = [(1, 64, 64, 1, 2), (7, 100, 96, 8, 3), (16, 576, 960, 48, 5), (5, 200, 130, 64, 2), (9, 64, 300, 4, 9), (3, 64, 80, 192, 3)]


def _inputs(device: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0):
    num_tokens, in_features, out_features, width, num_slots = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, in_features, generator=gen).to(device, dtype)
    lora_a = torch.randn(num_slots, width, in_features, generator=gen).div(in_features**0.5).to(device, dtype)
    # Stored as the engine stores it, [out, slots, width], and passed as a [slots, width, out] view.
    lora_b = torch.randn(out_features, num_slots, width, generator=gen).div(width**0.5).to(device, dtype)
    lora_b = lora_b.permute(1, 2, 0)
    lora_a[0] = 0
    lora_b[0] = 0
    # Every slot, 0 (no adapter) included, mixed in batch order.
    slots = torch.randint(0, num_slots, (num_tokens,), generator=gen, dtype=torch.int32)
    slots[0] = 0 if num_tokens > 1 else num_slots - 1
    slots[-1] = num_slots - 1  # at least one token has an adapter
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
    x, lora_a, lora_b, _ = _inputs(device, dtype, (4, 64, 32, 8, 3))
    assert lora_shrink(x[:0], lora_a, torch.zeros(0, dtype=torch.int32, device=device)).shape == (0, 8)
    slots = torch.zeros(4, dtype=torch.int32, device=device)
    out = torch.randn(4, 32).to(device, dtype)
    before = out.clone()
    lora_expand(lora_shrink(x, lora_a, slots), lora_b, slots, out)
    assert torch.equal(out, before)


@pytest.mark.parametrize("device,dtype", CASES)
def test_wrappers_check_their_inputs(device: str, dtype: torch.dtype) -> None:
    x, lora_a, lora_b, slots = _inputs(device, dtype, (4, 64, 32, 8, 3))
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


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_masked_path_matches_reference(shape: tuple[int, ...]) -> None:
    """The engine's CPU path (a masked matmul pair over the slots in use) equals shrink + expand."""
    from inference.lora.layers import LoRABatch, add_lora_masked

    x, lora_a, lora_b, slots = _inputs("cpu", torch.float32, shape, seed=1)
    batch = LoRABatch()
    batch.set(slots, slots.numpy())
    assert batch.token_slots is not None
    out = torch.randn(shape[0], shape[2])
    want = out.clone()
    reference.lora_expand(reference.lora_shrink(x, lora_a, slots), lora_b, slots, want)
    add_lora_masked(x, lora_a, lora_b.permute(2, 0, 1), batch, out)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
