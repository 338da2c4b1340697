"""The engine core in its own process, seen from outside the server.

A killed core turns /health to 503 within 2 s and fails the open streams
with an error event; SIGTERM then still exits 0 and leaves no process
behind, and neither does a front end killed outright. A burst of 256 streams
with 50 random disconnects leaves the engine idle with every block free.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
from server_fixtures import children, kill_mid_stream, shared_server, spawned_children, start_server, wait_gone

pytestmark = pytest.mark.slow

NUM_BURST = 256
NUM_DISCONNECTS = 50
BURST_MAX_TOKENS = 8
C = "/v1/completions"


def _core_pid(server) -> int:
    """The spawned engine core among the server's children."""
    [core_pid] = spawned_children(server.process.pid)
    return core_pid


def test_killed_core_gives_503_fails_open_streams_and_exits_1(tiny_llama_dir):
    # Generic process handling: the tiny model starts faster than SmolLM2.
    server = start_server("--model", str(tiny_llama_dir), "--max-model-len", "256", "--num-kv-blocks", "64",
                          "--shutdown-timeout", "10")
    try:
        children_pids = children(server.process.pid)
        core_pid = _core_pid(server)

        events, waited = asyncio.run(kill_mid_stream(server, core_pid, max_wait_s=2.0))
        assert "error" in events[-1] and "Generation failed" in events[-1]["error"]["message"]
        assert waited < 2.0
        with server.client() as client:
            refused = client.post(C, json={"prompt": "Anyone?", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
        # It then exits 1 by itself, for its supervisor to restart it.
        assert server.process.wait(timeout=30) == 1, server.log_tail()
        wait_gone(children_pids, timeout=5)
    finally:
        server.stop()


def test_killed_front_end_leaves_no_core_behind(tiny_llama_dir):
    server = start_server("--model", str(tiny_llama_dir), "--max-model-len", "256", "--num-kv-blocks", "64")
    try:
        core_pid = _core_pid(server)
        server.process.kill()
        server.process.wait(timeout=10)
        wait_gone([core_pid], timeout=5)  # it polls its parent once a second
    finally:
        server.stop()


def test_burst_with_random_disconnects_leaves_the_engine_idle():
    server = shared_server()
    rng = random.Random(19)
    dropped = set(rng.sample(range(NUM_BURST), NUM_DISCONNECTS))

    async def one(client, index: int) -> int | None:
        """Completion tokens of a stream read to the end; None for one dropped midway."""
        body = {"prompt": f"Burst request {index} says", "max_tokens": BURST_MAX_TOKENS, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        drop_after = rng.randint(1, BURST_MAX_TOKENS // 2) if index in dropped else None
        async with client.stream("POST", C, json=body) as response:
            assert response.status_code == 200, await response.aread()
            num_events, num_tokens = 0, -1
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                num_events += 1
                if num_events == drop_after:
                    return None  # leaving the block closes the connection midway
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    num_tokens = chunk["usage"]["completion_tokens"]
            return num_tokens

    async def run() -> list[int | None]:
        async with server.async_client() as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(NUM_BURST))), timeout=180)

    results = asyncio.run(run())
    finished = time.monotonic()
    assert [r for i, r in enumerate(results) if i not in dropped] == [BURST_MAX_TOKENS] * (NUM_BURST - NUM_DISCONNECTS)
    while True:
        metrics = server.metrics()
        if (metrics["pagedinfer_num_requests_running"] == 0 and metrics["pagedinfer_num_requests_waiting"] == 0
                and metrics["pagedinfer_kv_cache_free_blocks"] == metrics["pagedinfer_kv_cache_total_blocks"]):
            break
        assert time.monotonic() - finished < 5.0, f"engine still busy 5 s after the burst: {metrics}"
        time.sleep(0.05)
