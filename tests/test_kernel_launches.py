"""The attention wrappers' launch path: every prefill tile config the autotuner may pick, the
autotuner itself (CUDA), and the launch cache (checks once per geometry, compiled handles).

The batch builders, tolerances and the interpreter set-up come from
tests/test_kernels.py (imported first, so the interpreter is switched on
before Triton is imported); its `test_interpreter_cases_in_subprocess` also
runs this file when Triton was imported without the interpreter. Poisoning
as there: unreadable cache positions and `out` start as NaN.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

# First: it switches the interpreter on before anything imports Triton.
from test_kernels import (
    CASES, CUDA, CUDA_CASES, PagedBatch, _decode_requests, _need_kernels, _prefill_requests, check_output, make_batch,
    poisoned_like,
)

import kernels._launch as launch_mod
import kernels.prefill_attention as prefill_mod
from kernels.decode_attention import decode_attention
from kernels.prefill_attention import PREFILL_CONFIGS, PrefillConfig, prefill_attention


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("config", PREFILL_CONFIGS, ids=str)
def test_prefill_every_tuning_config(device: str, dtype: torch.dtype, config: PrefillConfig) -> None:
    """Each config the autotuner may pick, on a group of 3 (padded to 4) and a long context:
    whole unmasked key tiles, diagonal tiles and several query tiles per request."""
    _need_kernels(device)
    batch = make_batch(_prefill_requests(16) + [(40, 230)], 3, 64, 16, dtype, device, seed=9)
    out = prefill_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
        batch.query_start_loc, batch.max_query_len, 0.1, out=poisoned_like(batch.query), config=config,
    )
    check_output(out, batch, 0.1)


@pytest.mark.parametrize("device,dtype", CASES)
def test_cached_launches(device: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both attention wrappers check a geometry once, then launch through the cache with the same
    results; a new geometry is checked again, and the per-call request-count checks always run."""
    _need_kernels(device)
    checked: list[str] = []
    real = launch_mod.check_attention_args
    monkeypatch.setattr(launch_mod, "check_attention_args", lambda *a: checked.append("check") or real(*a))
    launch_mod.GEOMETRIES.clear()
    decode = make_batch(_decode_requests(16), 4, 64, 16, dtype, device, seed=2)
    prefill = make_batch(_prefill_requests(16), 4, 64, 16, dtype, device, seed=2)

    def run_both(decode: PagedBatch, prefill: PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        d = decode_attention(decode.query, decode.key_cache, decode.value_cache, decode.block_tables, decode.seq_lens,
                             decode.query_start_loc, decode.max_seq_len, 0.1, out=poisoned_like(decode.query),
                             num_splits=2)
        p = prefill_attention(prefill.query, prefill.key_cache, prefill.value_cache, prefill.block_tables,
                              prefill.seq_lens, prefill.query_start_loc, prefill.max_query_len, 0.1,
                              out=poisoned_like(prefill.query))
        return d, p

    first = run_both(decode, prefill)
    assert checked == ["check", "check"]
    handles = dict(launch_mod.HANDLES)
    second = run_both(decode, prefill)
    assert checked == ["check", "check"], "a known geometry was checked again"
    if device == "cuda":  # the second calls went through the compiled handles the first ones left
        assert launch_mod.HANDLES == handles and handles
    for a, b, batch in zip(first, second, (decode, prefill)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)
        check_output(b, batch, 0.1)

    # Fewer requests, same geometry: not checked again, still right.
    fewer = replace(decode, block_tables=decode.block_tables[:3], seq_lens=decode.seq_lens[:3],
                    query_start_loc=decode.query_start_loc[:4], max_seq_len=37, num_tokens=3)
    check_output(run_both(fewer, prefill)[0], fewer, 0.1)
    assert len(checked) == 2
    bad_args = decode.query, decode.key_cache, decode.value_cache
    with pytest.raises(AssertionError, match="one row per request"):
        decode_attention(*bad_args, decode.block_tables[:-1], decode.seq_lens, decode.query_start_loc, 150, 0.1)
    with pytest.raises(AssertionError, match="num_reqs \\+ 1"):
        prefill_attention(prefill.query, prefill.key_cache, prefill.value_cache, prefill.block_tables,
                          prefill.seq_lens, prefill.query_start_loc[:-1], prefill.max_query_len, 0.1)
    with pytest.raises(AssertionError, match="head_dim"):
        decode_attention(decode.query[..., :32], *bad_args[1:], decode.block_tables, decode.seq_lens,
                         decode.query_start_loc, 150, 0.1)
    with pytest.raises(AssertionError, match="seq_lens must be torch.int32"):
        prefill_attention(prefill.query, prefill.key_cache, prefill.value_cache, prefill.block_tables,
                          prefill.seq_lens.long(), prefill.query_start_loc, prefill.max_query_len, 0.1)


@pytest.mark.skipif(not CUDA, reason="the autotuner times configs on a GPU; the interpreter runs a fixed one")
@pytest.mark.parametrize("device,dtype", CUDA_CASES)
def test_prefill_autotuned(device: str, dtype: torch.dtype) -> None:
    """Without a forced config CUDA autotunes once per key, then launches the chosen config."""
    batch = make_batch(_prefill_requests(16), 8, 128, 16, dtype, device, seed=6)
    for _ in range(2):
        out = prefill_attention(
            batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
            batch.query_start_loc, batch.max_query_len, 0.1, out=poisoned_like(batch.query),
        )
        check_output(out, batch, 0.1)
    assert set(prefill_mod.tuned_configs().values()) <= set(PREFILL_CONFIGS)
    assert prefill_mod.tuned_configs()
