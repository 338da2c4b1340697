"""AsyncLLM's process handling and failure handling.

The real engine cannot be made to fail on demand, so these tests run AsyncLLM
over a small scripted core that follows EngineCore's interface, in the same
spawned core process the server uses; the server tests run the real one.
Factories are module-level functions so the spawn context can pickle them.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time

import pytest
from conftest import build_tiny_tokenizer

from inference.async_engine import AsyncLLM
from inference.request_stream import EngineDeadError, RequestFailedError
from inference.config import EngineConfig
from inference.core_protocol import EngineStats, SampleOutput, StepOutputs
from inference.sampling_params import SamplingParams
from inference.startup_phases import StartupPhases


A = ord("a") - ord("!")  # the byte-level tokenizer numbers printable bytes from "!"


class ScriptedCore:
    """One token per step per request, "abc...";  `fail_steps` makes step() raise,
    `fail_abort` makes aborting raise too, which kills the core process."""

    def __init__(self, folder: str, fail_steps: int = 0, fail_abort: bool = False) -> None:
        self.config = EngineConfig(model=folder, dtype="float32", device="cpu", block_size=16, max_num_seqs=8,
                                   max_num_batched_tokens=64, max_model_len=10**7)
        self.vocab_size = 257
        self.startup = StartupPhases()
        self.requests: dict[str, tuple[list[int], int]] = {}  # id -> (tokens so far, max_tokens)
        self.fail_steps = fail_steps
        self.fail_abort = fail_abort

    def add_request(self, add):
        self.requests[add.request_id] = ([], add.params.max_tokens)

    def abort_requests(self, request_ids):
        for request_id in request_ids:
            self.requests.pop(request_id, None)

    def abort_all(self):
        if self.fail_abort:
            raise RuntimeError("abort broke")
        request_ids = list(self.requests)
        self.requests.clear()
        return request_ids

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("kernel exploded")
        outputs = []
        for request_id, (tokens, max_tokens) in list(self.requests.items()):
            tokens.append(A + len(tokens) % 26)
            finished = len(tokens) == max_tokens
            if finished:
                del self.requests[request_id]
            outputs.append(SampleOutput(request_id, 0, [tokens[-1]], finish_reason="length" if finished else None))
        now = time.monotonic()
        return StepOutputs(outputs, now, now)

    def stats(self):
        return EngineStats(num_running=len(self.requests), num_waiting=0, num_total_blocks=8, num_free_blocks=8,
                           kv_cache_usage=0.0, kv_waste_ratio=0.0, num_preemptions=0, prefix_cache_queries=0,
                           prefix_cache_hits=0, prompt_tokens_computed=0)


def _no_weights() -> ScriptedCore:
    raise OSError("no weights")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("scripted-core")
    build_tiny_tokenizer(folder)
    return str(folder)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def _started(folder: str, **kwargs) -> AsyncLLM:
    llm = AsyncLLM(functools.partial(ScriptedCore, folder, **kwargs))
    await llm.wait_ready()
    return llm


def test_outputs_arrive_in_order_from_another_process(folder):
    async def main():
        llm = await _started(folder)
        assert llm.core_pid != os.getpid()
        outputs = [o async for o in llm.generate("a", [1], SamplingParams(max_tokens=3))]
        await llm.shutdown()
        return outputs

    outputs = run(main())
    # Outputs are cumulative; a reader that fell behind gets several steps at once.
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    assert lengths == sorted(set(lengths)) and lengths[-1] == 3
    assert outputs[-1].finished and all(not o.finished for o in outputs[:-1])
    assert outputs[-1].outputs[0].text == "abc"


def test_stop_string_finishes_in_the_front_end(folder):
    async def main():
        llm = await _started(folder)
        outputs = [o async for o in llm.generate("s", [1], SamplingParams(max_tokens=50, stop=["cd"]))]
        await asyncio.sleep(0.1)
        assert llm.stats().num_running == 0  # the abort reached the core
        await llm.shutdown()
        return outputs[-1].outputs[0]

    final = run(main())
    assert (final.text, final.finish_reason, final.stop_reason) == ("ab", "stop", "cd")


def test_bad_input_fails_that_request_only(folder):
    async def main():
        llm = await _started(folder)
        with pytest.raises(ValueError, match="empty"):
            await llm.add_request("bad", [], SamplingParams())
        outputs = [o async for o in llm.generate("good", [1], SamplingParams(max_tokens=2))]
        assert outputs[-1].finished and llm.num_unfinished == 0
        await llm.shutdown()

    run(main())


def test_failed_step_fails_its_requests_and_the_core_goes_on(folder):
    async def main():
        llm = await _started(folder, fail_steps=1)
        with pytest.raises(RequestFailedError, match="kernel exploded"):
            async for _ in llm.generate("doomed", [1], SamplingParams(max_tokens=5)):
                pass
        assert llm.is_alive
        outputs = [o async for o in llm.generate("later", [1], SamplingParams(max_tokens=2))]
        assert outputs[-1].finished
        await llm.shutdown()

    run(main())


def test_closing_the_iterator_aborts_the_request(folder):
    async def main():
        llm = await _started(folder)
        outputs = llm.generate("dropped", [1], SamplingParams(max_tokens=10**6))
        await anext(outputs)
        await outputs.aclose()
        assert llm.num_unfinished == 0
        while llm.stats().num_running:
            await asyncio.sleep(0.01)
        await llm.shutdown()

    run(main())


def test_cancelled_consumer_aborts_the_request(folder):
    async def consume(llm):
        async for _ in llm.generate("cancelled", [1], SamplingParams(max_tokens=10**6)):
            pass

    async def main():
        llm = await _started(folder)
        task = asyncio.create_task(consume(llm))
        while not llm.stats().num_running:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while llm.stats().num_running:
            await asyncio.sleep(0.01)
        await llm.shutdown()

    run(main())


def test_failed_load_reports_dead():
    async def main():
        llm = AsyncLLM(_no_weights)
        with pytest.raises(EngineDeadError, match="no weights"):
            await llm.wait_ready()
        assert not llm.is_alive and not llm.is_ready
        with pytest.raises(EngineDeadError):
            await llm.add_request("x", [1], SamplingParams())
        await llm.shutdown()

    run(main())


def test_crashed_core_fails_open_requests_and_reports_dead(folder):
    # A step fails, and then aborting its requests fails too: the core process dies.
    async def main():
        llm = await _started(folder, fail_steps=1, fail_abort=True)
        with pytest.raises(EngineDeadError):
            async for _ in llm.generate("victim", [1], SamplingParams(max_tokens=5)):
                pass
        assert not llm.is_alive
        await llm.shutdown()

    run(main())


def test_killed_core_fails_open_requests_at_once(folder):
    async def main():
        llm = await _started(folder)
        stream = await llm.add_request("open", [1], SamplingParams(max_tokens=10**6))
        await anext(stream)
        os.kill(llm.core_pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(EngineDeadError, match="exited"):
            async for _ in stream:
                pass
        assert time.monotonic() - killed < 2 and not llm.is_alive
        await llm.shutdown()

    run(main())


def test_shutdown_fails_open_streams_and_stops_the_core(folder):
    async def main():
        llm = await _started(folder)
        stream = await llm.add_request("open", [1], SamplingParams(max_tokens=10**6))
        await llm.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        return llm.core_pid

    pid = run(main())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
