"""Speculative decoding's data side, no torch: the scheduler with drafts and a
fake runner (which tokens it accepts is the test's choice), and the n-gram
proposer against a plain per-request search."""

from __future__ import annotations

import random

from inference.block_manager import BlockManager
from inference.config import SchedulerConfig
from inference.request import Request, RequestStatus
from inference.sampling_params import SamplingParams
from inference.scheduler import Scheduler
from inference.spec_decode.ngram import NgramProposer
from inference.spec_decode.stats import AUTO_OFF_MIN_DRAFT_TOKENS

EOS = 0
BLOCK = 4


def make(num_blocks=64, budget=32, caching=True, disable_by_batch_size=None) -> Scheduler:
    config = SchedulerConfig(8, budget, max_model_len=512, block_size=BLOCK, enable_prefix_caching=caching,
                             num_speculative_tokens=3, spec_disable_by_batch_size=disable_by_batch_size)
    return Scheduler(config, BlockManager(num_blocks, BLOCK, caching))


def prefilled(s: Scheduler, drafts: list[int], max_tokens=32, prompt=tuple(range(1, 11))) -> Request:
    """A request past its prompt (first token 50) holding `drafts` for its next step."""
    request = Request("r", "r", 0, list(prompt), SamplingParams(max_tokens=max_tokens), (EOS,), 0.0)
    s.add_request(request)
    out = s.schedule()
    s.update(out, {"r": [50]}, {"r": drafts})
    return request


def test_rejected_drafts_give_their_blocks_back_uncached():
    s = make()
    bm = s.block_manager
    request = prefilled(s, [11, 12, 13])  # 11 tokens, 10 computed: 3 blocks
    out = s.schedule()
    assert out.scheduled == [(request, 4)] and out.spec_token_ids == {"r": [11, 12, 13]}
    assert len(request.block_table) == 4  # slots for 14 tokens
    tail = request.block_table[3]
    appended = s.update(out, {"r": [11, 60]}, {"r": [61, 62]})  # the first draft kept, then the target's 60
    assert appended == {"r": [11, 60]}
    assert request.token_ids[10:] == [50, 11, 60] and request.num_computed_tokens == 12
    assert len(request.block_table) == 3 and bm.blocks[tail].ref_cnt == 0 and bm.blocks[tail].block_hash is None
    assert len(bm.cached) == 3  # the full blocks of valid tokens, and only those
    assert bm.num_free_blocks == bm.num_blocks - 3
    spec = s.stats.spec_decode
    assert (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens) == (1, 3, 1)
    assert spec.num_accepted_tokens_per_pos == [1, 0, 0]
    assert request.spec_token_ids == [61, 62]


def test_a_stop_inside_the_accepted_run_truncates_it():
    s = make()
    request = prefilled(s, [11, EOS, 13])
    out = s.schedule()
    assert s.update(out, {"r": [11, EOS, 13, 14]}) == {"r": [11, EOS]}
    assert request.status == RequestStatus.FINISHED_STOPPED and request.output_token_ids == [50, 11, EOS]
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_drafts_are_cut_to_max_tokens_and_the_budget():
    s = make()
    request = prefilled(s, [11, 12, 13], max_tokens=3)  # one token out, two to go: one draft at most
    out = s.schedule()
    assert out.scheduled == [(request, 2)] and out.spec_token_ids == {"r": [11]}
    s = make(budget=3)
    request = prefilled(s, [11, 12, 13], prompt=(1, 2))
    out = s.schedule()
    assert out.scheduled == [(request, 3)] and out.spec_token_ids == {"r": [11, 12]}


def test_drafts_are_cut_to_num_speculative_tokens():
    s = make()
    request = prefilled(s, [11, 12, 13, 14, 15])
    assert s.schedule().spec_token_ids == {"r": [11, 12, 13]}
    assert request.spec_token_ids == [11, 12, 13, 14, 15]  # scheduling reads the drafts, never cuts them


def test_a_batch_of_disable_by_batch_size_requests_verifies_no_drafts():
    s = make(disable_by_batch_size=2)
    request = prefilled(s, [11, 12, 13])
    assert s.schedule().spec_token_ids == {"r": [11, 12, 13]}  # one running: below the limit
    s2 = make(disable_by_batch_size=2)
    first = prefilled(s2, [11, 12])
    second = Request("q", "q", 0, [5, 6, 7], SamplingParams(max_tokens=8), (EOS,), 0.0)
    s2.add_request(second)
    out = s2.schedule()  # "q" admitted this step: the step started with one running
    s2.update(out, {"r": [11, 70], "q": [80]}, {"r": [71, 72], "q": [81]})
    out = s2.schedule()  # two running now: decode plainly, keep the drafts for later
    assert out.spec_token_ids == {} and dict(out.scheduled) == {first: 1, second: 1}
    assert first.spec_token_ids == [71, 72] and request.spec_token_ids == [11, 12, 13]


def test_no_room_for_drafts_decodes_plainly_without_preempting():
    s = make(num_blocks=3)
    request = prefilled(s, [11, 12, 13], prompt=tuple(range(1, 12)))  # 11 computed of 12: 3 blocks, all there is
    out = s.schedule()
    assert out.scheduled == [(request, 1)] and out.spec_token_ids == {}
    assert s.stats.num_preemptions == 0


def test_mostly_wrong_guesses_switch_a_request_off():
    s = make(num_blocks=256)
    request = prefilled(s, [11, 12, 13], max_tokens=500)
    num_steps = 0
    while not request.spec_off:
        out = s.schedule()
        s.update(out, {"r": [99]}, {"r": [11, 12, 13]})  # every draft rejected
        num_steps += 1
    assert num_steps == -(-AUTO_OFF_MIN_DRAFT_TOKENS // 3) and request.spec_token_ids == []
    out = s.schedule()
    assert out.scheduled == [(request, 1)] and out.spec_token_ids == {}


def test_preemption_drops_the_drafts():
    s = make()
    request = prefilled(s, [11, 12, 13])
    s._preempt(request)
    assert request.spec_token_ids == [] and request.block_table == []


def reference_ngram(context: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The longest suffix (max_n down to min_n) seen before; what followed its first occurrence."""
    for n in range(max_n, min_n - 1, -1):
        if len(context) <= n:
            continue
        suffix = context[-n:]
        for start in range(len(context) - n):
            if context[start : start + n] == suffix:
                return context[start + n : start + n + k]
    return []


def test_ngram_matches_a_plain_search_over_a_batch():
    rng = random.Random(0)
    contexts = [[rng.randrange(4) for _ in range(rng.randrange(1, 40))] for _ in range(200)]
    contexts += [[1, 2, 3, 9, 1, 2, 3], [5], [], [7, 7, 7, 7]]
    for min_n, max_n, k in ((1, 3, 4), (2, 5, 2), (3, 3, 16)):
        proposer = NgramProposer(min_n, max_n, k)
        assert proposer.drafts(contexts) == [reference_ngram(c, min_n, max_n, k) for c in contexts]
    assert NgramProposer(1, 3, 4).drafts([[1, 2, 3, 9, 1, 2, 3]]) == [[9, 1, 2, 3]]
