"""The suffix proposer: what it drafts from (the request's own tokens and the
outputs of earlier requests), and that every request it starts in
arctic-inference's cache is started once and stopped once whatever the
request goes through (n > 1, preemption, speculation switched off, abort).

The whole module is skipped, saying why, where arctic-inference is not
installed (`make arctic-inference` builds it).
"""

from __future__ import annotations

import pytest
import torch

from inference.request import Request
from inference.sampling_params import SamplingParams
from inference.spec_decode.config import SpeculativeConfig, suffix_decoding_installed
from inference.spec_decode.ngram import NgramProposer

pytestmark = pytest.mark.skipif(not suffix_decoding_installed(),
                                reason="arctic-inference is not installed (`make arctic-inference` builds it)")


def proposer(**fields):
    from inference.spec_decode.proposer import build_proposer

    return build_proposer(SpeculativeConfig.from_dict({"method": "suffix", "num_speculative_tokens": 4, **fields}))


def request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, request_id.split("#")[0], 0, prompt, SamplingParams(), (0,), 0.0)


def step(suffix, emitted: dict[Request, list[int]], finished: list[str] = ()) -> dict[str, list[int]]:
    """One runner step, then the scheduler's part: append what each request emitted."""
    drafts = suffix.propose(list(emitted.items()), list(finished))
    for r, tokens in emitted.items():
        r.token_ids.extend(tokens)
    return {r.request_id: d for r, d in zip(emitted, drafts)}


def test_drafts_from_an_earlier_requests_output():
    """b's tokens so far hold nothing that repeats, so n-gram lookup has nothing;
    the suffix proposer drafts what followed the same token in a's answer."""
    suffix = proposer(suffix_decoding_max_spec_factor=4.0)
    a = request("a", [1, 2, 3])
    for token in range(10, 16):
        step(suffix, {a: [token]})
    step(suffix, {}, finished=["a"])
    b = request("b", [7, 8, 9])
    assert step(suffix, {b: [10]}) == {"b": [11, 12, 13, 14]}
    assert NgramProposer(1, 3, 4).drafts([b.token_ids]) == [[]]
    # Without the cache of earlier responses only b's own tokens count: nothing to draft.
    alone = proposer(suffix_decoding_max_spec_factor=4.0, suffix_decoding_max_cached_requests=0)
    a, b = request("a", [1, 2, 3]), request("b", [7, 8, 9])
    for token in range(10, 16):
        step(alone, {a: [token]})
    step(alone, {}, finished=["a"])
    assert step(alone, {b: [10]}) == {"b": []}


def test_each_request_is_started_once_and_stopped_once():
    """arctic-inference raises on a second start or a stop of a request it
    does not hold; the cache's active requests are those started and not yet finished."""
    suffix = proposer()
    cache = suffix.cache
    first, second = request("p#0", [1, 2, 3, 1, 2]), request("p#1", [1, 2, 3, 1, 2])  # n = 2
    preempted, switched_off = request("q", [5, 6]), request("r", [7, 8])
    step(suffix, {first: [3], second: [4], preempted: [9], switched_off: [1]})
    step(suffix, {first: [1], second: [4], switched_off: [2]})  # q preempted: it samples nothing
    step(suffix, {first: [2], second: [4], preempted: [9, 9]})  # r decodes plainly now: not proposed for
    assert set(cache.active_requests) == {"p#0", "p#1", "q", "r"}
    # Finished ids name every finished request, also ones that never speculated.
    step(suffix, {preempted: [9]}, finished=["p#0", "r", "never-started"])
    assert set(cache.active_requests) == {"p#1", "q"}
    step(suffix, {}, finished=["p#1", "q"])
    assert not cache.active_requests
    assert set(cache.cached_requests) == {"p#0", "p#1", "q", "r"}  # their answers stay for later requests


def test_engine_drafts_a_repeated_request_from_the_first_answer(tiny_llama_dir):
    """The same greedy request twice: the second time its answer is in the
    cache of recent responses, so more of its guesses are accepted than the
    first time; with that cache off the second run guesses as the first did."""
    from inference import LLM

    gen = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, 256, (12,), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    accepted = {}
    for cached in (0, 100):
        llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64, speculative_config={
            "method": "suffix", "num_speculative_tokens": 4, "suffix_decoding_max_cached_requests": cached})
        runs = []
        for _ in range(2):
            before = llm.stats().spec_decode.num_accepted_tokens
            [output] = llm.generate([prompt], params, use_tqdm=False)
            runs.append((output.outputs[0].token_ids, llm.stats().spec_decode.num_accepted_tokens - before))
        assert runs[0][0] == runs[1][0]
        accepted[cached] = [n for _, n in runs]
    assert accepted[0][0] == accepted[0][1], accepted
    # The first answer drafts most of the second (32 tokens: 31 could be guessed).
    assert accepted[100][1] > max(accepted[100][0], 16), accepted
