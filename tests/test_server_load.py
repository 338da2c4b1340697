"""Many concurrent streams, and streams dropped midway: the engine must free
everything a disconnected client held."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from server_fixtures import shared_server

pytestmark = pytest.mark.slow

NUM_CONCURRENT = 64
NUM_DROPPED = 20
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server():
    return shared_server()


async def _stream_one(client, index: int) -> tuple[int, int, str]:
    """(completion tokens from usage, number of content chunks, text) of one stream."""
    chat = index % 2 == 1
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True, "seed": index}
    if chat:
        body["messages"] = [{"role": "user", "content": f"Count to {index}."}]
    else:
        body["prompt"] = f"Request number {index} says"
    text, num_chunks, num_tokens = "", 0, -1
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                num_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content") if chat else choice["text"]
                text += piece or ""
                num_chunks += 1
    return num_tokens, num_chunks, text


def test_concurrent_streams_all_finish(server):
    async def run():
        async with server.async_client() as client:
            return await asyncio.gather(*(_stream_one(client, i) for i in range(NUM_CONCURRENT)))

    started = time.monotonic()
    results = asyncio.run(run())
    assert [num_tokens for num_tokens, _, _ in results] == [MAX_TOKENS] * NUM_CONCURRENT
    assert all(num_chunks >= 1 and text for _, num_chunks, text in results)
    print(f"{NUM_CONCURRENT} streams of {MAX_TOKENS} tokens in {time.monotonic() - started:.1f} s")


def _engine_idle(server) -> bool:
    metrics = server.metrics()
    return (metrics["pagedinfer_num_requests_running"] == 0
            and metrics["pagedinfer_num_requests_waiting"] == 0
            and metrics["pagedinfer_kv_cache_free_blocks"] == metrics["pagedinfer_kv_cache_total_blocks"])


def test_dropped_streams_free_the_engine(server):
    async def open_and_drop(client, index: int) -> None:
        body = {"prompt": f"Tell a long story, part {index}:", "max_tokens": 200, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            num_events = 0
            async for line in response.aiter_lines():
                num_events += line.startswith("data: ")
                if num_events == 2:
                    break  # leaving the block closes the connection midway

    async def run():
        async with server.async_client() as client:
            await asyncio.gather(*(open_and_drop(client, i) for i in range(NUM_DROPPED)))

    asyncio.run(run())
    dropped = time.monotonic()
    while not _engine_idle(server):
        assert time.monotonic() - dropped < 2.0, f"engine still busy 2 s after the disconnects: {server.metrics()}"
        time.sleep(0.05)
    with server.client() as client:
        response = client.post("/v1/completions", json={"prompt": "Still there?", "max_tokens": 2})
        assert response.status_code == 200
        assert client.get("/health").status_code == 200


def test_dropped_non_streaming_request_is_aborted(server):
    """A client that gives up on a plain request frees the engine too."""
    import httpx

    body = {"prompt": "Write an essay:", "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout), server.client() as client:
        client.post("/v1/completions", json=body, timeout=1.0)
    dropped = time.monotonic()
    while not _engine_idle(server):
        assert time.monotonic() - dropped < 2.0, f"engine still busy 2 s after the disconnect: {server.metrics()}"
        time.sleep(0.05)
