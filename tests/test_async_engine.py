"""AsyncLLM's threading and failure handling.

The real engine cannot be made to fail on demand, so these tests drive
AsyncLLM with a small scripted engine that follows LLMEngine's interface;
the server tests run the real one.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from inference.async_engine import AsyncLLM, EngineDeadError, RequestFailedError
from inference.engine import EngineStats
from inference.outputs import CompletionOutput, RequestOutput
from inference.sampling_params import SamplingParams


class ScriptedEngine:
    """One token per step per request; `fail_steps` makes step() raise."""

    def __init__(self, fail_steps: int = 0, fail_abort: bool = False) -> None:
        self.config = None
        self.requests: dict[str, tuple[list[int], int]] = {}  # id -> (tokens so far, max_tokens)
        self.aborted: list[str] = []
        self.fail_steps = fail_steps
        self.fail_abort = fail_abort
        self.thread_ids: set[int] = set()

    def add_request(self, request_id, prompt, params, *, priority=0, arrival_time=None, cache_salt=None):
        self.thread_ids.add(threading.get_ident())
        if not prompt:
            raise ValueError("prompt is empty")
        self.requests[request_id] = ([], params.max_tokens)

    def abort_request(self, request_id):
        if self.fail_abort:
            raise RuntimeError("abort broke")
        self.requests.pop(request_id, None)
        self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        self.thread_ids.add(threading.get_ident())
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("kernel exploded")
        outputs = []
        for request_id, (tokens, max_tokens) in list(self.requests.items()):
            tokens.append(len(tokens))
            finished = len(tokens) == max_tokens
            if finished:
                del self.requests[request_id]
            sample = CompletionOutput(0, "x" * len(tokens), list(tokens), "length" if finished else None)
            outputs.append(RequestOutput(request_id, None, [1], [sample], finished=finished))
        return outputs

    def stats(self):
        return EngineStats(num_running=len(self.requests), num_waiting=0, num_total_blocks=8, num_free_blocks=8,
                           kv_cache_usage=0.0, kv_waste_ratio=0.0, num_preemptions=0, prefix_cache_queries=0,
                           prefix_cache_hits=0, prompt_tokens_computed=0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


async def _started(engine: ScriptedEngine) -> AsyncLLM:
    llm = AsyncLLM(lambda: engine)
    await llm.wait_ready()
    return llm


def test_outputs_arrive_in_order_and_only_the_loop_thread_touches_the_engine():
    engine = ScriptedEngine()

    async def main():
        llm = await _started(engine)
        outputs = [o async for o in llm.generate("a", [1], SamplingParams(max_tokens=3))]
        await llm.shutdown()
        return outputs

    outputs = run(main())
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 2, 3]
    assert outputs[-1].finished and not outputs[0].finished
    assert engine.thread_ids and threading.get_ident() not in engine.thread_ids


def test_bad_input_fails_that_request_only():
    async def main():
        llm = await _started(ScriptedEngine())
        with pytest.raises(ValueError, match="empty"):
            await llm.add_request("bad", [], SamplingParams())
        outputs = [o async for o in llm.generate("good", [1], SamplingParams(max_tokens=2))]
        assert outputs[-1].finished and llm.num_unfinished == 0
        await llm.shutdown()

    run(main())


def test_failed_step_fails_its_requests_and_the_loop_goes_on():
    engine = ScriptedEngine(fail_steps=1)

    async def main():
        llm = await _started(engine)
        with pytest.raises(RequestFailedError, match="kernel exploded"):
            async for _ in llm.generate("doomed", [1], SamplingParams(max_tokens=5)):
                pass
        assert engine.aborted == ["doomed"] and llm.is_alive
        outputs = [o async for o in llm.generate("later", [1], SamplingParams(max_tokens=2))]
        assert outputs[-1].finished
        await llm.shutdown()

    run(main())


def test_closing_the_iterator_aborts_the_request():
    engine = ScriptedEngine()

    async def main():
        llm = await _started(engine)
        outputs = llm.generate("dropped", [1], SamplingParams(max_tokens=1000))
        await anext(outputs)
        await outputs.aclose()
        while "dropped" not in engine.aborted:
            await asyncio.sleep(0.01)
        assert llm.num_unfinished == 0
        await llm.shutdown()

    run(main())


def test_cancelled_consumer_aborts_the_request():
    engine = ScriptedEngine()

    async def consume(llm):
        async for _ in llm.generate("cancelled", [1], SamplingParams(max_tokens=10**6)):
            pass

    async def main():
        llm = await _started(engine)
        task = asyncio.create_task(consume(llm))
        while not engine.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while "cancelled" not in engine.aborted:
            await asyncio.sleep(0.01)
        await llm.shutdown()

    run(main())


def test_failed_load_reports_dead():
    def factory():
        raise OSError("no weights")

    async def main():
        llm = AsyncLLM(factory)
        with pytest.raises(EngineDeadError, match="no weights"):
            await llm.wait_ready()
        assert not llm.is_alive and not llm.is_ready
        with pytest.raises(EngineDeadError):
            await llm.add_request("x", [1], SamplingParams())

    run(main())


def test_crashed_loop_fails_open_requests_and_reports_dead():
    # A step fails, and then aborting its request fails too: the loop thread dies.
    engine = ScriptedEngine(fail_steps=1, fail_abort=True)

    async def main():
        llm = await _started(engine)
        with pytest.raises(EngineDeadError):
            async for _ in llm.generate("victim", [1], SamplingParams(max_tokens=5)):
                pass
        assert not llm.is_alive

    run(main())


def test_shutdown_fails_open_streams():
    async def main():
        llm = await _started(ScriptedEngine())
        stream = await llm.add_request("open", [1], SamplingParams(max_tokens=10**6))
        await llm.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass

    run(main())
