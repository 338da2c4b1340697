"""Automatic prefix caching: savings, correctness, salts, eviction under pressure."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    kwargs = dict(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=2048, max_num_batched_tokens=512)
    return LLM(enable_prefix_caching=True, **kwargs), LLM(enable_prefix_caching=False, **kwargs)


def test_shared_system_prompt_computes_90_percent_fewer_prompt_tokens(engines):
    cached, uncached = engines
    rng = random.Random(0)
    system = [rng.randrange(256) for _ in range(512)]
    prompts = [system + [rng.randrange(256) for _ in range(32)] for _ in range(32)]
    before = [e.stats().prompt_tokens_computed for e in engines]
    with_cache = cached.generate(prompts, GREEDY, use_tqdm=False)
    without = uncached.generate(prompts, GREEDY, use_tqdm=False)
    computed_on = cached.stats().prompt_tokens_computed - before[0]
    computed_off = uncached.stats().prompt_tokens_computed - before[1]
    assert computed_off == 32 * 544
    reduction = 1 - computed_on / computed_off
    print(f"prompt tokens computed: {computed_on} with caching, {computed_off} without ({reduction:.1%} fewer)")
    assert reduction >= 0.90
    assert [o.outputs[0].token_ids for o in with_cache] == [o.outputs[0].token_ids for o in without]
    assert cached.stats().prefix_cache_hit_rate > 0.85


def test_multi_turn_chat_reuses_all_full_blocks_of_the_previous_turn(engines):
    llm = engines[0]
    rng = random.Random(1)
    conversation = [rng.randrange(256) for _ in range(37)]
    previous_full_blocks = 0
    for turn in range(4):
        [out] = llm.generate([conversation], GREEDY, use_tqdm=False)
        if turn:
            assert out.num_cached_tokens == previous_full_blocks * 16
        generated = out.outputs[0].token_ids
        # Turn k computed its prompt and all generated tokens but the last.
        previous_full_blocks = (len(conversation) + len(generated) - 1) // 16
        conversation = conversation + generated + [rng.randrange(256) for _ in range(21)]


def test_different_salts_never_share_blocks(engines):
    engine = engines[0].engine
    prompt = list(range(64))
    for salt in ("tenant-a", "tenant-b"):
        engine.add_request(salt, prompt, GREEDY, cache_salt=salt)
        while engine.has_unfinished_requests():
            engine.step()
    engine.add_request("a-again", prompt, GREEDY, cache_salt="tenant-a")
    engine.step()
    assert engine.scheduler.requests["a-again"].num_cached_tokens == 48
    while engine.has_unfinished_requests():
        engine.step()
    a = engine.scheduler.blocks.hasher.hash_blocks(prompt, 16, "tenant-a")
    b = engine.scheduler.blocks.hasher.hash_blocks(prompt, 16, "tenant-b")
    assert not set(a) & set(b)


def _check_pool(scheduler) -> None:
    """Reference counts match the block tables, and every block a running
    request holds still carries the data its hash claims."""
    bm = scheduler.block_manager
    refs = [0] * bm.num_blocks
    for request in scheduler.requests.values():
        for block_id in request.block_table:
            refs[block_id] += 1
    assert [b.ref_cnt for b in bm.blocks] == refs
    for request in scheduler.running:
        expected = scheduler.blocks.hasher.hash_blocks(
            request.token_ids[: request.num_computed_tokens], bm.block_size, request.cache_salt
        )
        for block_id, block_hash in zip(request.block_table, expected):
            block = bm.blocks[block_id]
            assert block.block_hash in (None, block_hash)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(8, 70)), min_size=4, max_size=10), st.integers(0, 10**6))
def test_eviction_under_pressure_keeps_outputs_correct(tiny_llama_dir, shapes, seed):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(256) for _ in range(40)] for _ in range(6)]
    prompts = [prefixes[p][: n // 2] + [rng.randrange(256) for _ in range(n - n // 2)] for p, n in shapes]
    expected = [o.outputs[0].token_ids for o in _reference_llm(tiny_llama_dir).generate(prompts, GREEDY, use_tqdm=False)]
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=14, block_size=8, max_num_batched_tokens=64)
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out.outputs[0].token_ids
        _check_pool(engine.scheduler)
    assert [results[i] for i in range(len(prompts))] == expected
    assert engine.stats().num_free_blocks == 14


_REFERENCE: dict[str, LLM] = {}


def _reference_llm(folder) -> LLM:
    key = str(folder)
    if key not in _REFERENCE:
        _REFERENCE[key] = LLM(model=key, dtype="float32", num_kv_blocks=512, enable_prefix_caching=False)
    return _REFERENCE[key]
