"""Admission control and graceful shutdown, on a private server that runs one
request at a time and queues at most one. The SIGTERM test ends it, so it
runs last in this module."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from openai_schemas import check_error
from server_fixtures import sse_events, start_server

pytestmark = pytest.mark.slow

C = "/v1/completions"
SHUTDOWN_TIMEOUT_S = 30
LONG = {"prompt": "Write a long story:", "max_tokens": 40, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def server():
    server = start_server("--max-model-len", "256", "--num-kv-blocks", "64", "--max-num-seqs", "1",
                          "--max-queued-requests", "1", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S))
    yield server
    server.stop()


async def _consume(client, body: dict, first_event: asyncio.Event | None = None) -> list[dict]:
    async with client.stream("POST", C, json=body) as response:
        assert response.status_code == 200, await response.aread()
        lines = []
        async for line in response.aiter_lines():
            lines.append(line)
            if first_event is not None and line.startswith("data: "):
                first_event.set()
        return sse_events(lines)


async def _wait_for(server, name: str, value: float) -> None:
    deadline = time.monotonic() + 60
    while (await asyncio.to_thread(server.metrics)).get(name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.05)


async def _start_running_and_waiting(server, client) -> tuple[asyncio.Task, asyncio.Task]:
    """One request running (it has streamed a token) and one waiting."""
    started = asyncio.Event()
    running = asyncio.create_task(_consume(client, LONG, started))
    await started.wait()
    waiting = asyncio.create_task(_consume(client, LONG))
    await _wait_for(server, "pagedinfer_num_requests_waiting", 1)
    return running, waiting


def test_full_queue_answers_429(server):
    async def run():
        async with server.async_client() as client:
            running, waiting = await _start_running_and_waiting(server, client)
            rejected = await client.post(C, json={"prompt": "One more", "max_tokens": 2})
            assert rejected.status_code == 429
            assert int(rejected.headers["Retry-After"]) >= 1
            assert check_error(rejected)["type"] == "rate_limit_error"
            for task in (running, waiting):
                assert (await task)[-1]["usage"]["completion_tokens"] == LONG["max_tokens"]
            # With the queue drained, requests are admitted again.
            assert (await client.post(C, json={"prompt": "Again", "max_tokens": 2})).status_code == 200

    asyncio.run(run())


def test_sigterm_drains_in_flight_requests_then_exits_0(server):
    async def run() -> float:
        async with server.async_client() as client:
            running, waiting = await _start_running_and_waiting(server, client)
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.3)
            assert (await client.get("/ready")).status_code == 503
            refused = await client.post(C, json={"prompt": "Too late", "max_tokens": 2})
            assert refused.status_code == 503
            check_error(refused)
            assert (await client.get("/health")).status_code == 200  # alive while draining
            for task in (running, waiting):
                chunks = await task
                assert chunks[-1]["usage"]["completion_tokens"] == LONG["max_tokens"]
            return signalled

    signalled = asyncio.run(run())
    assert server.process.wait(timeout=SHUTDOWN_TIMEOUT_S + 10) == 0, server.log_tail()
    assert time.monotonic() - signalled < SHUTDOWN_TIMEOUT_S
