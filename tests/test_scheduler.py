"""Scheduler, driven with a fake runner: pure data in, data out, no torch."""

from __future__ import annotations

import subprocess
import sys

from inference.block_manager import BlockManager
from inference.config import SchedulerConfig
from inference.request import Request, RequestStatus
from inference.sampling_params import SamplingParams
from inference.scheduler import Scheduler

EOS = 0


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_tokens=32, caching=True) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, max_tokens, max_model_len=512, block_size=block_size,
                             enable_prefix_caching=caching)
    return Scheduler(config, BlockManager(num_blocks, block_size, caching))


def request(rid: str, prompt: list[int], max_tokens=4, n=1, priority=0, arrival=0.0, **kw) -> Request:
    params = SamplingParams(max_tokens=max_tokens, n=n, **kw)
    leader = Request(rid, rid, 0, prompt, params, (EOS,), arrival, priority)
    leader.pending_samples = [Request(f"{rid}#{i}", rid, i, prompt, params, (EOS,), arrival, priority)
                              for i in range(1, n)]
    return leader


def step(s: Scheduler, token: int = 7):
    out = s.schedule()
    sampled = {r.request_id: [token] for r, n in out.scheduled if r.num_computed_tokens + n == r.num_tokens}
    s.update(out, sampled)
    return out


def run_all(s: Scheduler, max_steps=500) -> int:
    steps = 0
    while s.has_unfinished():
        step(s)
        steps += 1
        assert steps < max_steps
    return steps


def test_token_budget_chunks_prefills_and_puts_decodes_first():
    s = make(max_tokens=32)
    for i in range(3):
        s.add_request(request(f"r{i}", list(range(100 * i + 1, 100 * i + 41)), arrival=i))
    out = step(s)
    assert [(r.request_id, n) for r, n in out.scheduled] == [("r0", 32)]
    out = step(s)
    assert [(r.request_id, n) for r, n in out.scheduled] == [("r0", 8), ("r1", 24)]
    out = step(s)  # r0 decodes first, then r1's rest, then r2's first chunk
    assert [(r.request_id, n) for r, n in out.scheduled] == [("r0", 1), ("r1", 16), ("r2", 15)]
    assert all(n <= 32 for _, n in out.scheduled) and out.num_batched_tokens == 32


def test_max_num_seqs_bounds_the_batch():
    s = make(max_num_seqs=2)
    for i in range(4):
        s.add_request(request(f"r{i}", [1, 2, 3], arrival=i))
    out = step(s)
    assert len(out.scheduled) == 2 and s.num_waiting == 2


def test_preemption_by_recompute_loses_nothing():
    s = make(num_blocks=6, block_size=4, max_tokens=64)
    reqs = [request(f"r{i}", [i + 1] * 6, max_tokens=10, arrival=i) for i in range(4)]
    for r in reqs:
        s.add_request(r)
    run_all(s)
    assert s.stats.num_preemptions > 0
    assert all(r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 10 for r in reqs)
    assert s.block_manager.num_free_blocks == 6


def test_newest_lowest_priority_request_is_preempted():
    s = make(num_blocks=4, block_size=4, max_tokens=64)
    old = request("old", [1] * 7, max_tokens=20, arrival=0)
    new = request("new", [2] * 7, max_tokens=20, arrival=1)
    s.add_request(old)
    s.add_request(new)
    while s.stats.num_preemptions == 0:
        step(s)
    assert new.status == RequestStatus.PREEMPTED and new.block_table == [] and new.num_computed_tokens == 0
    assert old.status == RequestStatus.RUNNING


def test_priority_orders_admission():
    s = make(max_num_seqs=1)
    s.add_request(request("low", [1, 2], priority=5, arrival=0))
    s.add_request(request("high", [3, 4], priority=-1, arrival=1))
    assert [r.request_id for r, _ in step(s).scheduled] == ["high"]


def test_abort_frees_everything():
    s = make()
    r = request("r", list(range(1, 30)), max_tokens=50)
    s.add_request(r)
    step(s)
    assert s.block_manager.num_free_blocks < 64
    s.finish_request("r", RequestStatus.FINISHED_ABORTED)
    assert s.block_manager.num_free_blocks == 64 and not s.has_unfinished()
    assert step(s).finished_request_ids == ["r"]


def test_n_samples_share_prompt_blocks_with_copy_on_write():
    s = make(block_size=4)
    leader = request("r", list(range(1, 11)), n=3, max_tokens=3)  # 10 tokens: last block half full
    s.add_request(leader)
    assert s.num_waiting == 3
    out = step(s)
    assert [(r.request_id, n) for r, n in out.scheduled] == [("r", 9)]  # prompt minus its last token
    assert s.num_running == 3
    table = list(leader.block_table)
    out = step(s)  # every sample computes token 10 itself, into its own copy of the shared last block
    assert sorted(r.request_id for r, _ in out.scheduled) == ["r", "r#1", "r#2"]
    assert len(out.block_copies) == 2 and all(src == table[2] for src, _ in out.block_copies)
    tables = [s.requests[i].block_table for i in ("r", "r#1", "r#2")]
    assert all(t[:2] == table[:2] for t in tables) and len({t[2] for t in tables}) == 3
    run_all(s)
    assert s.block_manager.num_free_blocks == 64


def test_prefix_cache_hit_skips_computed_blocks_but_not_last_token():
    s = make(block_size=4, max_tokens=64)
    prompt = list(range(1, 17))  # exactly 4 blocks
    s.add_request(request("a", prompt, max_tokens=1))
    run_all(s)
    s.add_request(request("b", prompt, max_tokens=1))
    out = step(s)
    [(r, n)] = out.scheduled
    assert r.num_cached_tokens == 12 and n == 4  # the last block is recomputed for logits
    assert s.stats.prefix_cache_hits == 12 and s.stats.prefix_cache_queries == 32


def test_different_salts_never_share():
    s = make(block_size=4)
    a = request("a", list(range(1, 17)), max_tokens=1)
    a.cache_salt = "x"
    s.add_request(a)
    run_all(s)
    b = request("b", list(range(1, 17)), max_tokens=1)
    b.cache_salt = "y"
    s.add_request(b)
    step(s)
    assert b.num_cached_tokens == 0


def test_stop_conditions():
    s = make()
    r = request("r", [1, 2], max_tokens=10, min_tokens=2)
    s.add_request(r)
    step(s, token=EOS)  # eos before min_tokens: ignored
    assert r.status == RequestStatus.RUNNING
    step(s, token=EOS)
    assert r.status == RequestStatus.FINISHED_STOPPED
    r2 = request("r2", [1, 2], max_tokens=10, stop_token_ids=[9])
    s.add_request(r2)
    step(s, token=9)
    assert r2.status == RequestStatus.FINISHED_STOPPED and r2.stop_reason == 9


def test_scheduler_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_scheduler import make, request, run_all\n"
        "s = make(); s.add_request(request('r', [1, 2, 3])); run_all(s)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
