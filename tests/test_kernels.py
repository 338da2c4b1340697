"""Triton kernels against the torch references in `kernels/reference.py`.

On a machine without CUDA the kernels run in Triton's interpreter, which must
be switched on before Triton is first imported in the process (Triton picks
interpreted or compiled functions at `@triton.jit` time). So this module sets
`TRITON_INTERPRET=1` at import when nothing has imported Triton yet; that only
changes how Triton itself behaves in this process, and nothing else runs
Triton kernels on a CPU-only machine. If Triton was already imported without
it (another test file got there first), the CPU cases are skipped here and
`test_interpreter_cases_in_subprocess` runs them in a fresh interpreter (with
those of tests/test_decode_graph_safe.py and tests/test_kernel_launches.py,
which build on this file).

With CUDA, the CUDA cases (bf16, fp16) run the compiled kernels; the CPU
cases then need the subprocess (`-k cuda` selects only the former).

Inputs are poisoned so a masking bug cannot hide: cache positions no request
may read hold NaN (the reference gets the same cache with NaN zeroed), and
`out` starts as NaN, so an unwritten row fails the comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from ci_tools import missing, require_module

CUDA = torch.cuda.is_available()
if "triton" not in sys.modules and not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = require_module("triton", "pip install triton (Linux x86_64; make install does)")

import triton.language as tl  # noqa: E402

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.decode_attention import decode_attention  # noqa: E402
from kernels.kv_store import store_kv  # noqa: E402
from kernels.prefill_attention import prefill_attention  # noqa: E402

INTERPRETER = kernels.interpreter_active()


@triton.jit
def _loop_bound_probe_kernel(n_ptr, out_ptr):
    n = tl.load(n_ptr)
    total = 0
    for _ in range(0, n):
        total += 1
    tl.store(out_ptr, total)


def _interpreter_takes_loaded_loop_bounds() -> bool:
    """The attention kernels loop up to a length read from memory. Triton 3.6's
    interpreter turns such a bound into an int with int() of a 1-element array,
    which NumPy >= 2.4 refuses; later interpreters handle it."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_bound_probe_kernel[(1,)](torch.tensor([3], dtype=torch.int32), out)
    except Exception:
        return False
    return out.item() == 3


INTERPRETER_WORKS = INTERPRETER and _interpreter_takes_loaded_loop_bounds()

CUDA_CASES = [pytest.param("cuda", torch.bfloat16, id="cuda-bf16"), pytest.param("cuda", torch.float16, id="cuda-fp16")]
CASES = [pytest.param("cpu", torch.float32, id="cpu-fp32"), pytest.param("cpu", torch.float16, id="cpu-fp16")]
if CUDA:
    CASES += CUDA_CASES

# (atol, rtol) against a float32 reference computed from the same rounded inputs.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}

NUM_KV_HEADS = 2
GQA = [1, 3, 8]
HEAD_DIMS = [64, 128]
BLOCK_SIZES = [16, 32]


def _need_kernels(device: str) -> None:
    if device == "cpu" and not INTERPRETER:
        pytest.skip("Triton was imported before TRITON_INTERPRET=1; see test_interpreter_cases_in_subprocess")
    if device == "cpu" and not INTERPRETER_WORKS:
        missing(f"Triton {triton.__version__}'s interpreter cannot loop to a loaded bound with NumPy "
                f"{np.__version__}: upgrade Triton (>= 3.7) or pin NumPy < 2.4")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PagedBatch:
    query: torch.Tensor  # [num_tokens + 2 padding rows, heads, dim]
    key_cache: torch.Tensor  # NaN wherever no request may read
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_seq_len: int
    num_tokens: int  # rows covered by requests

    def reference(self, scale: float) -> torch.Tensor:
        """float32 reference on the same values, NaN poison zeroed (it gathers whole blocks)."""
        return reference.paged_attention(
            self.query.float(), self.key_cache.nan_to_num(0.0).float(), self.value_cache.nan_to_num(0.0).float(),
            self.block_tables, self.seq_lens, self.query_start_loc, self.max_query_len, self.max_seq_len, scale,
        )


def make_batch(
    requests: list[tuple[int, int]],  # (query_len, seq_len) per request
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
) -> PagedBatch:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [_cdiv(seq_len, block_size) for _, seq_len in requests]
    num_blocks = sum(blocks_per_req) + 3  # spare blocks stay all-NaN
    max_blocks = max(blocks_per_req) + 2  # trailing -1 columns
    block_tables = torch.full((len(requests), max_blocks), -1, dtype=torch.int32)
    key_cache = torch.full((num_blocks, block_size, NUM_KV_HEADS, head_dim), float("nan"))
    value_cache = key_cache.clone()
    ids = torch.randperm(num_blocks, generator=gen)  # shuffled, non-contiguous block ids
    used = 0
    for r, (_, seq_len) in enumerate(requests):
        n = blocks_per_req[r]
        block_tables[r, :n] = ids[used : used + n].to(torch.int32)
        used += n
        slots = block_tables[r, :n].long()[:, None] * block_size + torch.arange(block_size)
        slots = slots.flatten()[:seq_len]  # positions at or past seq_len stay NaN
        key_cache.view(-1, NUM_KV_HEADS, head_dim)[slots] = torch.randn(seq_len, NUM_KV_HEADS, head_dim, generator=gen)
        value_cache.view(-1, NUM_KV_HEADS, head_dim)[slots] = torch.randn(seq_len, NUM_KV_HEADS, head_dim, generator=gen)
    query_lens = [q for q, _ in requests]
    num_tokens = sum(query_lens)
    query = torch.randn(num_tokens + 2, NUM_KV_HEADS * group, head_dim, generator=gen)
    start_loc = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    return PagedBatch(
        query=query.to(device=device, dtype=dtype),
        key_cache=key_cache.to(device=device, dtype=dtype),
        value_cache=value_cache.to(device=device, dtype=dtype),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor([s for _, s in requests], dtype=torch.int32, device=device),
        query_start_loc=start_loc.to(device),
        max_query_len=max(query_lens),
        max_seq_len=max(s for _, s in requests),
        num_tokens=num_tokens,
    )


def check_output(out: torch.Tensor, batch: PagedBatch, scale: float) -> None:
    expected = batch.reference(scale)
    atol, rtol = TOLERANCE[out.dtype]
    n = batch.num_tokens
    torch.testing.assert_close(out[:n].float().cpu(), expected[:n].cpu(), atol=atol, rtol=rtol)
    assert out[n:].isnan().all(), "rows that belong to no request were written"


def poisoned_like(query: torch.Tensor) -> torch.Tensor:
    return torch.full_like(query, float("nan"))


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_store_kv(device: str, dtype: torch.dtype, head_dim: int, block_size: int) -> None:
    _need_kernels(device)
    num_blocks, num_tokens = 6, 11
    gen = torch.Generator().manual_seed(1)
    # key/value are views into a fused qkv projection: token stride > heads * dim.
    qkv = torch.randn(num_tokens, 3 * NUM_KV_HEADS, head_dim, generator=gen).to(device=device, dtype=dtype)
    key, value = qkv[:, NUM_KV_HEADS : 2 * NUM_KV_HEADS], qkv[:, 2 * NUM_KV_HEADS :]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[0, 4, 9]] = -1  # padding tokens
    slots = slots.to(device)
    cache_shape = (num_blocks, block_size, NUM_KV_HEADS, head_dim)
    key_cache = torch.randn(cache_shape, generator=gen).to(device=device, dtype=dtype)
    value_cache = torch.randn(cache_shape, generator=gen).to(device=device, dtype=dtype)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()

    store_kv(key, value, key_cache, value_cache, slots)
    reference.store_kv(key, value, expected_k, expected_v, slots)
    torch.testing.assert_close(key_cache, expected_k, atol=0, rtol=0)
    torch.testing.assert_close(value_cache, expected_v, atol=0, rtol=0)


@pytest.mark.parametrize("device,dtype", CASES)
def test_store_kv_converts_to_cache_dtype(device: str, dtype: torch.dtype) -> None:
    _need_kernels(device)
    key, value = torch.randn(2, 5, 1, 64, device=device)
    slots = torch.tensor([3, -1, 0, 7, 12], device=device)
    key_cache, value_cache = torch.zeros(2, 4, 4, 1, 64, device=device, dtype=dtype)
    store_kv(key, value, key_cache, value_cache, slots)
    valid = slots >= 0
    torch.testing.assert_close(key_cache.view(-1, 1, 64)[slots[valid]], key[valid].to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(value_cache.view(-1, 1, 64)[slots[valid]], value[valid].to(dtype), atol=0, rtol=0)


def _decode_requests(block_size: int) -> list[tuple[int, int]]:
    # Length 1, exactly one and two blocks, and lengths off the block size;
    # 150 tokens spans three 64-token tiles and, with 3 splits, every split.
    return [(1, 1), (1, block_size), (1, 2 * block_size + 5), (1, 29), (1, 150)]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("group", GQA)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_decode_attention(device: str, dtype: torch.dtype, group: int, head_dim: int, block_size: int) -> None:
    _need_kernels(device)
    batch = make_batch(_decode_requests(block_size), group, head_dim, block_size, dtype, device)
    scale = head_dim**-0.5
    out = decode_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
        batch.query_start_loc, batch.max_seq_len, scale, out=poisoned_like(batch.query), num_splits=3,
    )
    check_output(out, batch, scale)


def _prefill_requests(block_size: int) -> list[tuple[int, int]]:
    return [
        (13, 13),  # whole prompt, not a multiple of the block size
        (1, 37),  # a decode row in the mixed batch
        (9, block_size + 12),  # a chunk starting mid-block after earlier context
        (1, 1),  # a one-token prompt
        (70, 75),  # several query tiles; the chunk starts mid-block
    ]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("group", GQA)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_prefill_attention(device: str, dtype: torch.dtype, group: int, head_dim: int, block_size: int) -> None:
    _need_kernels(device)
    batch = make_batch(_prefill_requests(block_size), group, head_dim, block_size, dtype, device)
    scale = 0.7 * head_dim**-0.5  # not the default 1/sqrt(d): the parameter must be used
    out = prefill_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
        batch.query_start_loc, batch.max_query_len, scale, out=poisoned_like(batch.query),
    )
    check_output(out, batch, scale)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("head_dim,block_d", [(96, 128), (8, 16)])
def test_other_head_dim(
    device: str, dtype: torch.dtype, head_dim: int, block_d: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """head_dim 96 runs in a padded 128-wide tile, and head_dim 8 in a 16-wide one (a GPU's `tl.dot`
    needs 16), in both kernels."""
    _need_kernels(device)
    monkeypatch.setenv(kernels.INTERPRET_ENV, "1")
    from kernels._launch import GEOMETRIES

    for requests in (_decode_requests(16), _prefill_requests(16)):
        batch = make_batch(requests, 4, head_dim, 16, dtype, device, seed=3)
        out = kernels.paged_attention(
            batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
            batch.query_start_loc, batch.max_query_len, batch.max_seq_len, 0.1, out=poisoned_like(batch.query),
        )
        check_output(out, batch, 0.1)
    assert {g.block_d for g in GEOMETRIES.values() if g.head_dim == head_dim} == {block_d}


@pytest.mark.parametrize("device,dtype", CASES)
def test_dispatch_routes_to_kernels(device: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Public API: decode kernel for max_query_len == 1 (heuristic split count), prefill otherwise."""
    _need_kernels(device)
    monkeypatch.setenv(kernels.INTERPRET_ENV, "1")  # CUDA tensors take the kernels anyway
    called: list[str] = []
    import kernels.decode_attention as decode_mod
    import kernels.prefill_attention as prefill_mod

    for mod, name in ((decode_mod, "decode_attention"), (prefill_mod, "prefill_attention")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: called.append(_name) or _real(*a, **k))
    for requests in (_decode_requests(32), _prefill_requests(32)):
        batch = make_batch(requests, 2, 64, 32, dtype, device, seed=5)
        out = kernels.paged_attention(
            batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
            batch.query_start_loc, batch.max_query_len, batch.max_seq_len, 0.125, out=poisoned_like(batch.query),
        )
        check_output(out, batch, 0.125)
    assert called == ["decode_attention", "prefill_attention"]


def test_cpu_takes_no_triton_path_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.INTERPRET_ENV, raising=False)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("Triton path taken for CPU tensors")

    monkeypatch.setattr(kernels, "_import_kernel", fail)
    batch = make_batch(_prefill_requests(16), 2, 64, 16, torch.float32, "cpu")
    out = kernels.paged_attention(
        batch.query, batch.key_cache.nan_to_num(0.0), batch.value_cache.nan_to_num(0.0), batch.block_tables,
        batch.seq_lens, batch.query_start_loc, batch.max_query_len, batch.max_seq_len, 0.125,
    )
    torch.testing.assert_close(out[: batch.num_tokens], batch.reference(0.125)[: batch.num_tokens])


@pytest.mark.slow
def test_kernels_compile_for_cuda_without_gpu() -> None:
    """Triton's compiler (not the interpreter) accepts every launch configuration and prefill tuning
    config, down to sm_80 and sm_90 machine code, within each target's shared memory."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        missing("this Triton has no CUDA backend (Linux x86_64 wheels ship one)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--arch", "80", "90"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


GPU_IMAGE_TRITON = Path(__file__).parents[1] / ".venv" / "triton-gpu-image"


@pytest.mark.slow
def test_kernels_compile_under_the_gpu_image_triton() -> None:
    """The GPU image's own Triton (3.6, installed beside the venv by `make test`) compiles every launch
    configuration, prefill tuning config, MoE tile and edge geometry (head_dim 8 to 256, block sizes 8
    to 64, GQA 1 to 32; fp16, bf16 and fp32) to sm_80 and sm_90 machine code, within each target's
    shared memory, with no float32 dot in TF32. Its compile cache lives beside it, so a second run
    only loads the results."""
    if not GPU_IMAGE_TRITON.is_dir():
        missing(f"{GPU_IMAGE_TRITON} is missing: `make triton-gpu-image` installs it")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # First on the path, so it shadows the venv's Triton; the kernels come from this checkout.
    env["PYTHONPATH"] = os.pathsep.join([str(GPU_IMAGE_TRITON), str(Path(__file__).parents[1])])
    # Content-addressed, so a kernel edit recompiles only what it changed; outside the checkout, like the
    # prepared model and the C++ kernels, so a second clone on the machine reuses it too.
    env["TRITON_CACHE_DIR"] = str(Path.home() / ".cache" / "pagedinfer" / "triton-gpu-image")
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--arch", "80", "90", "--edges", "--jobs", "2"],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "triton 3.6.0:" in proc.stdout, proc.stdout[-300:]


# They reuse this file's helpers, so their interpreter cases need this fallback too.
DEPENDENT_TESTS = [str(Path(__file__).with_name(name)) for name in ("test_decode_graph_safe.py",
                                                                    "test_kernel_launches.py")]


@pytest.mark.skipif(INTERPRETER and not CUDA, reason="the interpreter cases ran in this process")
def test_interpreter_cases_in_subprocess() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, *DEPENDENT_TESTS, "-q", "-p", "no:cacheprovider"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graph-buckets"])
def test_engine_greedy_tokens_match_reference_path(
    tiny_llama_dir, monkeypatch: pytest.MonkeyPatch, enforce_eager: bool
) -> None:
    """The engine on a tiny random Llama gives the same greedy tokens through the kernels as through the references.

    Chunked prefill (32 tokens a step) puts chunks that start mid-block next to decode rows in one batch.
    With graph buckets, decode batches run padded, with the grid sized for max_model_len and the split
    workspace the runner preallocated, as a captured CUDA graph runs them.
    """
    _need_kernels("cpu")
    from inference import LLM, SamplingParams

    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 21, 40, 1)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def greedy() -> list[list[int]]:
        llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64, block_size=16,
                  max_num_batched_tokens=32, enforce_eager=enforce_eager)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    monkeypatch.delenv(kernels.INTERPRET_ENV, raising=False)
    expected = greedy()
    calls: list[str] = []
    real_import = kernels._import_kernel
    monkeypatch.setattr(kernels, "_import_kernel", lambda name, device: calls.append(name) or real_import(name, device))
    monkeypatch.setenv(kernels.INTERPRET_ENV, "1")
    assert greedy() == expected
    assert {"kv_store", "decode_attention", "prefill_attention"} <= set(calls)


def test_engine_verifies_drafts_through_the_prefill_kernel(tiny_llama_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """Speculative decoding's verifying steps (a request's last token and its drafts as one query over its
    paged context) run through the Triton prefill kernel and give the reference path's greedy tokens
    without speculation. One-token prompts: only verifying steps have queries longer than one token."""
    _need_kernels("cpu")
    from inference import LLM, SamplingParams

    prompts = [[5], [7], [9]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def greedy(**kwargs) -> tuple[LLM, list[list[int]]]:
        llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64, block_size=16, **kwargs)
        return llm, [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    monkeypatch.delenv(kernels.INTERPRET_ENV, raising=False)
    _, expected = greedy()
    calls: list[str] = []
    real_import = kernels._import_kernel
    monkeypatch.setattr(kernels, "_import_kernel", lambda name, device: calls.append(name) or real_import(name, device))
    monkeypatch.setenv(kernels.INTERPRET_ENV, "1")
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
    llm, tokens = greedy(speculative_config=spec)
    assert tokens == expected
    assert llm.stats().spec_decode.num_accepted_tokens > 0 and "prefill_attention" in calls
