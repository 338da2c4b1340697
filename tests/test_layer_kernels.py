"""The layer kernels (RMSNorm, fused add + RMSNorm, rotary, SiLU-and-mul) against their torch references.

Same mechanism as tests/test_kernels.py: without CUDA the kernels run in
Triton's interpreter, switched on here at import when nothing has imported
Triton yet; if something already had, the CPU cases are skipped and
`test_interpreter_cases_in_subprocess` runs them in a fresh interpreter. With
CUDA, the CUDA cases (bf16, fp16) run the compiled kernels.

Kernels and references get the same inputs in the same dtype and round at the
same points, so the tolerance is a couple of ulps of that dtype. Outputs are
poisoned: `out` tensors the test passes start as NaN, and the ones a wrapper
allocates come from a `torch.empty` that fills float tensors with NaN, so an
element a kernel forgets to write fails the comparison. Inputs are views into
wider tensors (as q/k are slices of the qkv projection), and what lies around
the views must come back untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ci_tools import require_module

CUDA = torch.cuda.is_available()
if "triton" not in sys.modules and not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = require_module("triton", "pip install triton (Linux x86_64; make install does)")

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.activation import silu_and_mul  # noqa: E402
from kernels.rmsnorm import fused_add_rms_norm, rms_norm  # noqa: E402
from kernels.rotary import apply_rotary_embedding  # noqa: E402

INTERPRETER = kernels.interpreter_active()

CASES = [pytest.param("cpu", torch.float32, id="cpu-fp32"), pytest.param("cpu", torch.float16, id="cpu-fp16")]
if CUDA:
    CASES += [pytest.param("cuda", torch.bfloat16, id="cuda-bf16"), pytest.param("cuda", torch.float16, id="cuda-fp16")]

# (atol, rtol) between kernel and reference in the same dtype.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

HIDDEN_SIZES = [64, 100, 576]  # a power of two, and two that pad the tile
# (num_heads, num_kv_heads, head_dim): GQA, odd head counts, head_dims that are not powers of two.
HEAD_SHAPES = [(4, 2, 64), (9, 3, 72), (5, 5, 32), (6, 1, 96)]
NUM_TOKENS = [1, 7]


def _need_kernels(device: str) -> None:
    if device == "cpu" and not INTERPRETER:
        pytest.skip("Triton was imported before TRITON_INTERPRET=1; see test_interpreter_cases_in_subprocess")


@pytest.fixture
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrapper-allocated float outputs start as NaN instead of whatever memory held."""
    real_empty = torch.empty

    def empty(*args: object, **kwargs: object) -> torch.Tensor:
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def _randn(*shape: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOLERANCE[expected.dtype]
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _qkv(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: str,
         seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused qkv output and its q and k views: token stride (heads + 2 kv heads) * head_dim."""
    qkv = _randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device, seed=seed)
    return qkv, qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]


def _cos_sin_cache(max_positions: int, head_dim: int, device: str) -> torch.Tensor:
    """Built as the model builds it (default rope, theta 10000), scaled by a non-unit attention factor."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    freqs = torch.arange(max_positions).float()[:, None] * inv_freq[None, :]
    return (torch.cat((freqs.cos(), freqs.sin()), dim=-1) * 1.1).to(device)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rms_norm_rows(device: str, dtype: torch.dtype, hidden: int, num_tokens: int, poisoned_empty: None) -> None:
    _need_kernels(device)
    # Rows with a stride past hidden: a view of every other row of a wider tensor.
    wide = _randn(2 * num_tokens, hidden + 8, dtype=dtype, device=device, seed=hidden)
    x = wide[::2, 3 : 3 + hidden]
    weight = _randn(hidden, dtype=dtype, device=device, seed=1)
    _assert_close(rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    out = torch.full((num_tokens, hidden), float("nan"), dtype=dtype, device=device)
    assert rms_norm(x, weight, 1e-6, out=out) is out
    _assert_close(out, reference.rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_fused_add_rms_norm(device: str, dtype: torch.dtype, hidden: int, num_tokens: int,
                            poisoned_empty: None) -> None:
    _need_kernels(device)
    x = _randn(num_tokens, 2 * hidden, dtype=dtype, device=device, seed=2)[:, :hidden]  # strided rows
    residual = _randn(num_tokens, hidden, dtype=dtype, device=device, seed=3)
    weight = _randn(hidden, dtype=dtype, device=device, seed=4)
    x_before, residual_before = x.clone(), residual.clone()
    out, residual_out = fused_add_rms_norm(x, residual, weight, 1e-5)
    expected_out, expected_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-5)
    # The sum is one rounding of exact inputs, the same in both.
    torch.testing.assert_close(residual_out, expected_residual, atol=0, rtol=0)
    _assert_close(out, expected_out)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before), "inputs were modified"


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEAD_SHAPES)
def test_per_head_norm_in_place_on_qkv_slices(device: str, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                                             head_dim: int) -> None:
    """Qwen3's q/k norm: 3-D views of the qkv output, normalised in place; v and the other slice untouched."""
    _need_kernels(device)
    qkv, q, k = _qkv(7, num_heads, num_kv_heads, head_dim, dtype, device, seed=head_dim)
    q_weight = _randn(head_dim, dtype=dtype, device=device, seed=5)
    k_weight = _randn(head_dim, dtype=dtype, device=device, seed=6)
    expected_q, expected_k = reference.rms_norm(q, q_weight, 1e-6), reference.rms_norm(k, k_weight, 1e-6)
    expected_v = qkv[:, num_heads + num_kv_heads :].clone()
    assert rms_norm(q, q_weight, 1e-6, out=q) is q
    _assert_close(q, expected_q)
    assert torch.equal(k, qkv[:, num_heads : num_heads + num_kv_heads])
    rms_norm(k, k_weight, 1e-6, out=k)
    _assert_close(k, expected_k)
    assert torch.equal(qkv[:, num_heads + num_kv_heads :], expected_v), "v was written"


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEAD_SHAPES)
def test_per_head_norm_out_of_place(device: str, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                                    head_dim: int, poisoned_empty: None) -> None:
    _need_kernels(device)
    _, q, _ = _qkv(5, num_heads, num_kv_heads, head_dim, dtype, device, seed=7)
    weight = _randn(head_dim, dtype=dtype, device=device, seed=8)
    _assert_close(rms_norm(q, weight, 1e-6), reference.rms_norm(q, weight, 1e-6))


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEAD_SHAPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rotary_in_place_on_qkv_slices(device: str, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                                       head_dim: int, num_tokens: int) -> None:
    _need_kernels(device)
    max_positions = 300
    cache = _cos_sin_cache(max_positions, head_dim, device)
    qkv, q, k = _qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, seed=9)
    # Unsorted, repeated, and the first and last rows of the cache.
    positions = torch.tensor([max_positions - 1, 0, 17, 17, 250, 3, 64][:num_tokens], device=device)
    expected_q, expected_k = q.clone(), k.clone()
    reference.apply_rotary_embedding(expected_q, expected_k, positions, cache)
    expected_v = qkv[:, num_heads + num_kv_heads :].clone()
    apply_rotary_embedding(q, k, positions, cache)
    _assert_close(q, expected_q)
    _assert_close(k, expected_k)
    assert torch.equal(qkv[:, num_heads + num_kv_heads :], expected_v), "v was written"


@pytest.mark.parametrize("device,dtype", CASES)
def test_rotary_matches_transformers(device: str, dtype: torch.dtype) -> None:
    """The cache layout (cos half, sin half) rotates as transformers' rotate_half does."""
    _need_kernels(device)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim, max_positions = 64, 50
    cache = _cos_sin_cache(max_positions, head_dim, device)
    _, q, k = _qkv(6, 4, 2, head_dim, dtype, device, seed=10)
    positions = torch.tensor([49, 0, 1, 2, 30, 30], device=device)
    half = cache[positions].to(dtype)
    cos = torch.cat((half[:, : head_dim // 2],) * 2, dim=-1)
    sin = torch.cat((half[:, head_dim // 2 :],) * 2, dim=-1)
    # transformers wants [batch, heads, seq, dim] and cos/sin [batch, seq, dim].
    expected_q, expected_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None]
    )
    apply_rotary_embedding(q, k, positions, cache)
    _assert_close(q, expected_q[0].transpose(0, 1))
    _assert_close(k, expected_k[0].transpose(0, 1))


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("intermediate", [112, 1500])  # one partial block; two blocks, the second partial
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_silu_and_mul(device: str, dtype: torch.dtype, intermediate: int, num_tokens: int,
                      poisoned_empty: None) -> None:
    _need_kernels(device)
    x = 4 * _randn(num_tokens, 2 * intermediate + 6, dtype=dtype, device=device, seed=11)[:, 6:]  # strided rows
    _assert_close(silu_and_mul(x), reference.silu_and_mul(x))


@pytest.mark.parametrize("device,dtype", CASES)
def test_empty_batch(device: str, dtype: torch.dtype) -> None:
    _need_kernels(device)
    x = torch.zeros(0, 64, dtype=dtype, device=device)
    weight = torch.ones(64, dtype=dtype, device=device)
    assert rms_norm(x, weight, 1e-6).shape == (0, 64)
    assert [t.shape for t in fused_add_rms_norm(x, x, weight, 1e-6)] == [(0, 64), (0, 64)]
    assert silu_and_mul(x).shape == (0, 32)
    q = torch.zeros(0, 4, 64, dtype=dtype, device=device)
    apply_rotary_embedding(q, q[:, :2], torch.zeros(0, dtype=torch.int64, device=device),
                           _cos_sin_cache(4, 64, device))


@pytest.mark.parametrize("device,dtype", CASES)
def test_dispatch_routes_to_kernels(device: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_kernels(device)
    monkeypatch.setenv(kernels.INTERPRET_ENV, "1")  # CUDA tensors take the kernels anyway
    called: list[str] = []
    real_import = kernels._import_kernel
    monkeypatch.setattr(kernels, "_import_kernel", lambda name, dev: called.append(name) or real_import(name, dev))
    x = _randn(3, 64, dtype=dtype, device=device, seed=12)
    weight = _randn(64, dtype=dtype, device=device, seed=13)
    _assert_close(kernels.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    for got, expected in zip(kernels.fused_add_rms_norm(x, x, weight, 1e-6),
                             reference.fused_add_rms_norm(x, x, weight, 1e-6)):
        _assert_close(got, expected)
    _assert_close(kernels.silu_and_mul(x), reference.silu_and_mul(x))
    q, k = x.view(3, 2, 32).clone(), x.view(3, 2, 32)[:, :1].clone()
    expected_q, expected_k = q.clone(), k.clone()
    positions = torch.tensor([2, 0, 1], device=device)
    kernels.apply_rotary_embedding(q, k, positions, _cos_sin_cache(3, 32, device))
    reference.apply_rotary_embedding(expected_q, expected_k, positions, _cos_sin_cache(3, 32, device))
    _assert_close(q, expected_q)
    _assert_close(k, expected_k)
    assert called == ["rmsnorm", "rmsnorm", "activation", "rotary"]


def test_cpu_takes_no_triton_path_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.INTERPRET_ENV, raising=False)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("Triton path taken for CPU tensors")

    monkeypatch.setattr(kernels, "_import_kernel", fail)
    x, weight = torch.randn(3, 64), torch.randn(64)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    kernels.fused_add_rms_norm(x, x, weight, 1e-6)
    kernels.silu_and_mul(x)
    kernels.apply_rotary_embedding(x.view(3, 2, 32), x.view(3, 2, 32), torch.tensor([0, 1, 2]), torch.randn(3, 32))


def test_model_through_layer_kernels_matches_reference_path(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tiny architecture (Qwen3 with its q/k norm) gives the same logits through the layer kernels.

    Attention stays on the references here (tests/test_kernels.py runs the engine through it)."""
    _need_kernels("cpu")
    from transformers import AutoConfig

    from inference.attention import AttentionMetadata
    from inference.models import load_model

    _, folder, _ = tiny_model
    model = load_model(folder, AutoConfig.from_pretrained(folder), torch.float32, "cpu")
    token_ids = torch.randint(0, 384, (21,), generator=torch.Generator().manual_seed(14))
    num_tokens, block_size = len(token_ids), 16
    num_blocks = -(-num_tokens // block_size)
    attn = model.layers[0].self_attn
    for layer in model.layers:
        shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
        layer.self_attn.kv_cache = (torch.zeros(shape), torch.zeros(shape))
    meta = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens),
        block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
    )
    positions = torch.arange(100, 100 + num_tokens)  # past the first rows of the rotary cache

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            return model.compute_logits(model(token_ids, positions, meta))

    monkeypatch.delenv(kernels.INTERPRET_ENV, raising=False)
    expected = logits()
    monkeypatch.setattr(kernels, "store_kv", reference.store_kv)
    monkeypatch.setattr(kernels, "paged_attention", reference.paged_attention)
    called: list[str] = []
    real_import = kernels._import_kernel
    monkeypatch.setattr(kernels, "_import_kernel", lambda name, dev: called.append(name) or real_import(name, dev))
    monkeypatch.setenv(kernels.INTERPRET_ENV, "1")
    torch.testing.assert_close(logits(), expected, atol=1e-4, rtol=1e-4)
    assert set(called) == {"rmsnorm", "rotary", "activation"}


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_layer_kernels_replay_in_cuda_graph() -> None:
    """No host sync or allocation outside the graph pool: all four capture and replay with new inputs."""
    device, dtype = "cuda", torch.bfloat16
    x = _randn(8, 256, dtype=dtype, device=device, seed=15)
    residual = _randn(8, 256, dtype=dtype, device=device, seed=16)
    weight = _randn(256, dtype=dtype, device=device, seed=17)
    qkv, q, k = _qkv(8, 4, 2, 64, dtype, device, seed=18)
    positions = torch.arange(8, device=device)
    cache = _cos_sin_cache(64, 64, device)

    def step() -> tuple[torch.Tensor, ...]:
        apply_rotary_embedding(q, k, positions, cache)
        out, residual_out = fused_add_rms_norm(x, residual, weight, 1e-6)
        return rms_norm(out, weight, 1e-6), residual_out, silu_and_mul(x)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    for seed in (19, 20):
        x.copy_(_randn(8, 256, dtype=dtype, device=device, seed=seed))
        positions.copy_(torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(seed)).to(device))
        qkv_before = qkv.clone()
        graph.replay()
        torch.cuda.synchronize()
        out, residual_out = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
        _assert_close(outputs[0], reference.rms_norm(out, weight, 1e-6))
        _assert_close(outputs[1], residual_out)
        _assert_close(outputs[2], reference.silu_and_mul(x))
        expected_q, expected_k = qkv_before[:, :4].clone(), qkv_before[:, 4:6].clone()
        reference.apply_rotary_embedding(expected_q, expected_k, positions, cache)
        _assert_close(q, expected_q)
        _assert_close(k, expected_k)


def run_in_fresh_interpreter(test_file: str) -> None:
    """Run a kernel test file in a new process with Triton's interpreter on from the start."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.mark.skipif(INTERPRETER and not CUDA, reason="the interpreter cases ran in this process")
def test_interpreter_cases_in_subprocess() -> None:
    run_in_fresh_interpreter(__file__)
