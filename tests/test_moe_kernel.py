"""The fused MoE kernel against its torch reference (transformers' expert loop).

Same mechanism as tests/test_layer_kernels.py, whose set-up, cases and
poisoning fixture this file imports: without CUDA the kernel runs in
Triton's interpreter, switched on at import when nothing has imported Triton
yet; otherwise the CPU cases are skipped here and run in a fresh
interpreter by `test_interpreter_cases_in_subprocess`. With CUDA, the bf16
and fp16 cases run the compiled kernel. Outputs are poisoned: the wrapper's
`torch.empty` buffers start as NaN, so a pair the kernel forgets is caught.
"""

from __future__ import annotations

import pytest
import torch

# First: it switches the interpreter on before anything imports Triton.
from test_layer_kernels import (  # noqa: F401 (poisoned_empty: a fixture)
    CASES, CUDA, INTERPRETER, _need_kernels, poisoned_empty, run_in_fresh_interpreter,
)

import kernels
from kernels import reference
from kernels.moe import fused_moe, sort_by_expert

# (atol, rtol) between kernel and reference in the same dtype; 16-bit outputs
# differ by the reference's per-expert rounding of the running sum.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}

# (num_tokens, hidden, intermediate, num_experts, top_k): decode and prefill
# sizes, dims off a power of two, 64 experts with most of them empty, top-k
# up to 8 (all experts), and tiles that several experts' runs pad.
SHAPES = [
    (1, 64, 32, 8, 2),
    (3, 48, 40, 4, 1),
    (7, 64, 96, 16, 4),
    (5, 32, 16, 64, 8),
    (40, 64, 48, 8, 8),
    (70, 80, 24, 32, 3),
]


def _inputs(num_tokens: int, hidden: int, intermediate: int, num_experts: int, top_k: int, dtype: torch.dtype,
            device: str, skew: bool = False, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Weights scaled by 1/sqrt(fan-in) so outputs stay O(1); routing from a softmax over random logits, or,
    with `skew`, logits that send most tokens to the first experts and none to some."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, intermediate, generator=gen) / intermediate**0.5
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if skew:
        logits -= 3 * torch.arange(num_experts)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return (x.to(device, dtype), w13.to(device, dtype), w2.to(device, dtype), weights.to(device), ids.to(device))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOLERANCE[expected.dtype]
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_fused_moe_matches_reference(device: str, dtype: torch.dtype, shape: tuple[int, ...],
                                     poisoned_empty: None) -> None:
    _need_kernels(device)
    args = _inputs(*shape, dtype, device)
    _assert_close(fused_moe(*args), reference.fused_moe(*args))


@pytest.mark.parametrize("device,dtype", CASES)
def test_skewed_routing_with_empty_experts(device: str, dtype: torch.dtype, poisoned_empty: None) -> None:
    """Most pairs on a few experts (runs of several tiles), many experts with no token at all."""
    _need_kernels(device)
    args = _inputs(50, 64, 32, 16, 2, dtype, device, skew=True)
    counts = torch.bincount(args[4].flatten().cpu(), minlength=16)
    assert counts.max() > 32 and (counts == 0).sum() >= 4
    _assert_close(fused_moe(*args), reference.fused_moe(*args))


@pytest.mark.parametrize("device,dtype", CASES)
def test_strided_hidden_states_and_16_bit_weights(device: str, dtype: torch.dtype, poisoned_empty: None) -> None:
    """Rows of a wider activation (only the last dim is contiguous); Qwen3-MoE's weights in the activation dtype."""
    _need_kernels(device)
    x, w13, w2, weights, ids = _inputs(9, 64, 48, 8, 2, dtype, device, seed=1)
    wide = torch.zeros(9, 80, dtype=dtype, device=device)
    wide[:, 8:72] = x
    args = (wide[:, 8:72], w13, w2, weights.to(dtype), ids)
    _assert_close(fused_moe(*args), reference.fused_moe(*args))


@pytest.mark.parametrize("device,dtype", CASES)
def test_empty_batch(device: str, dtype: torch.dtype) -> None:
    _need_kernels(device)
    x, w13, w2, weights, ids = _inputs(1, 32, 16, 4, 2, dtype, device)
    assert fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 32)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [(1, 8, 2, 16), (50, 16, 2, 16), (9, 64, 8, 4)])
def test_sort_by_expert_covers_every_pair_once(num_tokens: int, num_experts: int, top_k: int, block_m: int) -> None:
    """Pure torch: each pair in exactly one tile of its expert; empty experts get no tile."""
    *_, ids = _inputs(num_tokens, 8, 8, num_experts, top_k, torch.float32, "cpu", skew=True)
    sorted_pair_ids, block_expert_ids = sort_by_expert(ids, num_experts, block_m)
    num_pairs = ids.numel()
    tiles = sorted_pair_ids.view(-1, block_m)
    assert tiles.shape[0] == block_expert_ids.shape[0]
    seen = []
    for tile, expert in zip(tiles.tolist(), block_expert_ids.tolist()):
        pairs = [p for p in tile if p < num_pairs]
        if expert == num_experts:
            assert not pairs
            continue
        assert pairs, "a tile with no pair"
        assert all(ids.flatten()[p] == expert for p in pairs)
        seen += pairs
    assert sorted(seen) == list(range(num_pairs))
    assert set(block_expert_ids.tolist()) - {num_experts} == set(ids.flatten().tolist())


@pytest.mark.parametrize("device,dtype", CASES)
def test_dispatch_routes_to_kernel(device: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_kernels(device)
    monkeypatch.setenv(kernels.INTERPRET_ENV, "1")
    called: list[str] = []
    real_import = kernels._import_kernel
    monkeypatch.setattr(kernels, "_import_kernel", lambda name, dev: called.append(name) or real_import(name, dev))
    args = _inputs(4, 32, 16, 4, 2, dtype, device)
    _assert_close(kernels.fused_moe(*args), reference.fused_moe(*args))
    assert called == ["moe"]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_replays_new_routing() -> None:
    """Sorting by expert needs no host sync, so a captured call replays correctly with other routing."""
    x, w13, w2, weights, ids = _inputs(64, 128, 96, 16, 4, torch.bfloat16, "cuda")
    fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    for seed in (1, 2):
        new = _inputs(64, 128, 96, 16, 4, torch.bfloat16, "cuda", skew=seed == 2, seed=seed)
        for dst, src in zip((x, weights, ids), (new[0], new[3], new[4])):
            dst.copy_(src)
        graph.replay()
        _assert_close(out, reference.fused_moe(x, w13, w2, weights, ids))


def test_moe_model_through_the_kernel_matches_reference_path(tiny_moe_model,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen3-MoE and Mixtral logits with the experts in the kernel (attention and the layer kernels stay on
    the references: their own tests cover them)."""
    _need_kernels("cpu")
    from test_models import PROMPTS, _prefill_logits
    from transformers import AutoConfig

    from inference.models import load_model

    _, folder, _ = tiny_moe_model
    model = load_model(folder, AutoConfig.from_pretrained(folder), torch.float32, "cpu")
    monkeypatch.delenv(kernels.INTERPRET_ENV, raising=False)
    expected = _prefill_logits(model, PROMPTS[1])
    for name in ("store_kv", "paged_attention", "rms_norm", "fused_add_rms_norm", "apply_rotary_embedding",
                 "silu_and_mul"):
        monkeypatch.setattr(kernels, name, getattr(reference, name))
    monkeypatch.setenv(kernels.INTERPRET_ENV, "1")
    torch.testing.assert_close(_prefill_logits(model, PROMPTS[1]), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(INTERPRETER and not CUDA, reason="the interpreter cases ran in this process")
def test_interpreter_cases_in_subprocess() -> None:
    run_in_fresh_interpreter(__file__)
