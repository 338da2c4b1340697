"""The scheduler's LoRA slot limit, with a fake runner: pure data, no torch."""

from __future__ import annotations

from inference.block_manager import BlockManager
from inference.config import SchedulerConfig
from inference.request import Request
from inference.sampling_params import SamplingParams
from inference.scheduler import LORA_PATIENCE_STEPS, Scheduler


def make(max_loras: int, max_num_seqs: int = 8) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, 64, max_model_len=512, block_size=4, max_loras=max_loras)
    return Scheduler(config, BlockManager(256, 4))


def request(rid: str, lora: str | None, arrival: float, max_tokens: int = 6) -> Request:
    return Request(rid, rid, 0, [1, 2, 3, 4, 5], SamplingParams(max_tokens=max_tokens, ignore_eos=True), (0,),
                   arrival, lora_name=lora)


def run(s: Scheduler) -> tuple[list[set[str]], dict[str, int]]:
    """Drive to the end; each step's adapters, and the step each request first ran in."""
    loras_per_step, first_step = [], {}
    while s.has_unfinished():
        out = s.schedule()
        loras_per_step.append({r.lora_name for r, _ in out.scheduled if r.lora_name})
        for r, _ in out.scheduled:
            first_step.setdefault(r.request_id, len(loras_per_step))
        s.update(out, {r.request_id: [9] for r, n in out.scheduled if r.num_computed_tokens + n == r.num_tokens})
    return loras_per_step, first_step


def test_no_step_holds_more_adapters_than_slots():
    s = make(max_loras=2)
    for i, lora in enumerate(["a", "b", "c", None, "a", "d", None, "c"]):
        s.add_request(request(f"r{i}", lora, float(i)))
    loras_per_step, first_step = run(s)
    assert max(len(loras) for loras in loras_per_step) == 2
    assert set().union(*loras_per_step) == {"a", "b", "c", "d"}
    # A base request behind a waiting adapter is not held up by it.
    assert first_step["r3"] == 1 and first_step["r6"] == 1
    assert len(first_step) == 8


def test_a_waiting_adapter_is_not_starved_by_a_busy_one():
    """Adapter "a" keeps getting new requests, which pass "b" waiting for the
    one slot until b's patience runs out; then the running "a" requests drain
    and b gets the slot."""
    s = make(max_loras=1)
    s.add_request(request("a0", "a", 0.0))
    s.add_request(request("b0", "b", 1.0))
    steps = 0
    while "b0" in s.requests and s.requests["b0"].num_computed_tokens == 0:
        s.add_request(request(f"a{steps + 1}", "a", 2.0 + steps))
        out = s.schedule()
        assert len({r.lora_name for r, _ in out.scheduled}) == 1
        s.update(out, {r.request_id: [9] for r, n in out.scheduled if r.num_computed_tokens + n == r.num_tokens})
        steps += 1
        assert steps < LORA_PATIENCE_STEPS + 20, "b0 never ran"
    assert steps > LORA_PATIENCE_STEPS  # "a" requests passed it meanwhile
