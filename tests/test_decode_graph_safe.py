"""The decode kernel under CUDA-graph conditions: a grid and split count fixed
by a `max_seq_len` bound far above the real context lengths, split partials
in a caller's preallocated workspace, and batches padded with dummy rows.
The prefill kernel under a verify graph's: a fixed `max_query_len` bound
(k + 1) over rows of 1..k + 1 query tokens, padding rows, and query tokens
past the last row, with the same launch for any mix of one shape.

The batch builders, tolerances and the interpreter set-up come from
tests/test_kernels.py (imported first, so the interpreter is switched on
before Triton is imported); its `test_interpreter_cases_in_subprocess` also
runs this file when Triton was imported without the interpreter. Poisoning
as there: unreadable cache positions, `out` and the workspace start as NaN.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

# First: it switches the interpreter on before anything imports Triton.
from test_kernels import CASES, PagedBatch, _need_kernels, check_output, make_batch, poisoned_like

import kernels
import kernels.decode_attention as decode_mod
import kernels.prefill_attention as prefill_mod

H100_PROGRAMS = 4 * 132  # what `_num_programs_wanted` gives on a 132-SM device
KERNELS_DIR = str(Path(kernels.__file__).parent)


def padded_batch(group: int, head_dim: int, block_size: int, dtype: torch.dtype, device: str) -> PagedBatch:
    """Real requests with contexts of 1..70 tokens, then three dummy rows as the engine pads a
    graph bucket: `seq_len` 1, all reading the same scratch block."""
    requests = [(1, 1), (1, 2), (1, block_size), (1, 33), (1, 70)] + [(1, 1)] * 3
    batch = make_batch(requests, group, head_dim, block_size, dtype, device, seed=11)
    batch.block_tables[5:, 0] = batch.block_tables[5, 0]
    return batch


def forced_workspace(batch: PagedBatch, max_seq_len: int, num_splits: int) -> torch.Tensor:
    """A NaN-poisoned workspace sized exactly for a forced split count."""
    num_reqs = batch.seq_lens.shape[0]
    _, num_heads, head_dim = batch.query.shape
    num_kv_heads, device = batch.key_cache.shape[2], batch.query.device
    _, splits = decode_mod.split_plan(num_reqs, num_kv_heads, head_dim, max_seq_len, device, num_splits)
    numel = num_reqs * num_heads * splits * (head_dim + 2)
    return torch.full((numel,), float("nan"), device=batch.query.device)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 16), (4, 128, 16), (8, 64, 32), (3, 96, 16)])
@pytest.mark.parametrize("max_seq_len,num_splits", [(2048, 8), (2048, 64), (4096, 64)])
def test_overprovisioned_splits_match_reference(
    device: str, dtype: torch.dtype, group: int, head_dim: int, block_size: int, max_seq_len: int, num_splits: int
) -> None:
    """Up to 64 splits of a 4096-token bound over contexts of 1..70: nearly every program has nothing to do."""
    _need_kernels(device)
    batch = padded_batch(group, head_dim, block_size, dtype, device)
    workspace = forced_workspace(batch, max_seq_len, num_splits)
    out = decode_mod.decode_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
        batch.query_start_loc, max_seq_len, head_dim**-0.5, out=poisoned_like(batch.query),
        num_splits=num_splits, workspace=workspace,
    )
    check_output(out, batch, head_dim**-0.5)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("max_seq_len", [70, 2048, 40960])
def test_public_workspace_sized_by_helper(
    device: str, dtype: torch.dtype, max_seq_len: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kernels.paged_attention` with the split heuristic of an H100 and a workspace of
    `decode_workspace_numel` elements, as the engine captures a bucket."""
    _need_kernels(device)
    monkeypatch.setenv(kernels.INTERPRET_ENV, "1")  # CUDA tensors take the kernels anyway
    monkeypatch.setattr(decode_mod, "_num_programs_wanted", lambda device: H100_PROGRAMS)
    batch = padded_batch(2, 64, 16, dtype, device)
    num_reqs, num_heads, head_dim = batch.seq_lens.shape[0], batch.query.shape[1], batch.query.shape[2]
    numel = kernels.decode_workspace_numel(num_reqs, num_heads, head_dim, max_seq_len, batch.query.device)
    _, num_splits = decode_mod.split_plan(num_reqs, batch.key_cache.shape[2], head_dim, max_seq_len, device)
    assert (numel > 0) == (num_splits > 1)
    workspace = torch.full((numel,), float("nan"), device=device)
    out = kernels.paged_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
        batch.query_start_loc, 1, max_seq_len, 0.125, out=poisoned_like(batch.query), workspace=workspace,
    )
    check_output(out, batch, 0.125)


@pytest.mark.parametrize("device,dtype", CASES)
def test_workspace_call_allocates_nothing(device: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `out` and `workspace` given, no tensor is created by code under kernels/."""
    _need_kernels(device)
    batch = padded_batch(2, 64, 16, dtype, device)
    workspace = forced_workspace(batch, 2048, 16)
    out = poisoned_like(batch.query)
    allocations: list[str] = []
    for name in ("empty", "empty_like", "empty_strided", "zeros", "zeros_like", "full", "full_like", "ones", "tensor"):
        real = getattr(torch, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(KERNELS_DIR):
                allocations.append(f"torch.{_name} in {caller}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    result = decode_mod.decode_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
        batch.query_start_loc, 2048, 0.125, out=out, num_splits=16, workspace=workspace,
    )
    monkeypatch.undo()
    assert allocations == []
    assert result is out
    assert not workspace.isnan().all(), "the partials were not written to the workspace"
    check_output(out, batch, 0.125)


def test_workspace_is_checked() -> None:
    batch = padded_batch(2, 64, 16, torch.float32, "cpu")
    workspace = forced_workspace(batch, 2048, 16)
    args = (batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
            batch.query_start_loc, 2048, 0.125)
    for bad, message in ((workspace[:-1], "this call needs"), (workspace.half(), "float32"),
                         (workspace.view(2, -1), "1-D")):
        with pytest.raises(AssertionError, match=message):
            decode_mod.decode_attention(*args, num_splits=16, workspace=bad)


@pytest.mark.parametrize("num_programs", [1, 4 * 108, H100_PROGRAMS])  # interpreter, A100, H100
@pytest.mark.parametrize("max_seq_len", [2048, 40960])
def test_workspace_numel_bounds_every_heuristic_call(
    num_programs: int, max_seq_len: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any batch size, KV head count and smaller `max_seq_len` fits, and the split plan depends
    only on its arguments (a graph captured at a bucket keeps its grid)."""
    monkeypatch.setattr(decode_mod, "_num_programs_wanted", lambda device: num_programs)
    num_heads, head_dim, max_num_reqs = 32, 128, 256
    bound = decode_mod.workspace_numel(max_num_reqs, num_heads, head_dim, max_seq_len, "cuda")
    assert bound <= max_num_reqs * num_heads * 64 * (head_dim + 2)
    for num_reqs in range(1, max_num_reqs + 1):
        for num_kv_heads in (1, 2, 8, 32):
            for seq_len in (1, 255, 257, 1000, max_seq_len - 1, max_seq_len):
                plan = decode_mod.split_plan(num_reqs, num_kv_heads, head_dim, seq_len, "cuda")
                assert plan == decode_mod.split_plan(num_reqs, num_kv_heads, head_dim, seq_len, "cuda")
                assert decode_mod._partials_numel(num_reqs, num_heads, head_dim, plan[1]) <= bound


VERIFY_LEN = 5  # k + 1 with 4 speculative tokens
VERIFY_ROWS = 8


def verify_batch(requests: list[tuple[int, int]], dtype: torch.dtype, device: str, seed: int) -> PagedBatch:
    """Real (query_len <= VERIFY_LEN, seq_len) rows padded as the engine pads a verify graph shape:
    rows of `seq_len` 1 on one scratch block up to VERIFY_ROWS, VERIFY_ROWS * VERIFY_LEN query tokens
    (those past the last row's in no row), and block tables as wide as the engine's, whatever the mix."""
    num_real = len(requests)
    batch = make_batch(requests + [(1, 1)] * (VERIFY_ROWS - num_real), 3, 64, 16, dtype, device, seed=seed)
    batch.block_tables[num_real:, 0] = batch.block_tables[num_real, 0]
    tables = torch.full((VERIFY_ROWS, 8), -1, dtype=torch.int32, device=device)
    tables[:, : batch.block_tables.shape[1]] = batch.block_tables
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(VERIFY_ROWS * VERIFY_LEN, *batch.query.shape[1:], generator=gen)
    return replace(batch, query=query.to(device=device, dtype=dtype), block_tables=tables,
                   max_query_len=VERIFY_LEN)


@pytest.mark.parametrize("device,dtype", CASES)
def test_verify_shape_launches_alike_for_any_mix(device: str, dtype: torch.dtype,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two verify steps of one graph shape with other real mixes (query lengths 1..k + 1, contexts
    1..70, two and five padding rows): the prefill launch (config, grid, every non-tensor argument)
    comes from the shape alone, and each output is right, rows in no request unwritten."""
    _need_kernels(device)
    monkeypatch.setenv(kernels.INTERPRET_ENV, "1")  # CUDA tensors take the kernels anyway
    mixes = ([(1, 1), (5, 40), (3, 17), (2, 70), (5, 5), (1, 33)], [(5, 9), (4, 16), (1, 2)])
    batches = [verify_batch(requests, dtype, device, seed) for seed, requests in enumerate(mixes)]

    def attend(batch: PagedBatch) -> torch.Tensor:
        return kernels.paged_attention(
            batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
            batch.query_start_loc, VERIFY_LEN, 4096, 0.125, out=poisoned_like(batch.query),
        )

    attend(batches[0])  # on CUDA the first call of a key autotunes; the launches after it replay
    launches: list[tuple] = []
    real_launch = prefill_mod.launch

    def recording_launch(kernel, key, grid, args, **options):
        launches.append((key, grid, [a for a in args if not isinstance(a, torch.Tensor)], options))
        return real_launch(kernel, key, grid, args, **options)

    monkeypatch.setattr(prefill_mod, "launch", recording_launch)
    for batch in batches:
        check_output(attend(batch), batch, 0.125)
    assert len(launches) == 2 and launches[0] == launches[1]
