"""`pagedinfer serve --tensor-parallel-size 2` seen from outside, on the tiny Llama.

The official `openai` client gets the offline TP=1 engine's greedy text for
completions and chat, and chat answers whole and streamed alike. Killing one rank's
process turns /health to 503 within 5 s and fails the open stream; the
server then exits 1 by itself. SIGTERM on a healthy server drains the open
stream and exits 0.
Neither leaves a process behind: not the core, not a rank.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import openai
import pytest
from server_fixtures import kill_mid_stream, spawned_children, sse_events, start_server, wait_gone

pytestmark = pytest.mark.slow

C = "/v1/completions"
PROMPTS = ["hello world", "the quick brown fox"]
MESSAGES = [{"role": "user", "content": "Say something."}]
SERVER_ARGS = ("--max-model-len", "256", "--num-kv-blocks", "64", "--tensor-parallel-size", "2")


@pytest.fixture(scope="module")
def model_dir(tiny_chat_llama_dir):
    return tiny_chat_llama_dir


@pytest.fixture(scope="module")
def server(model_dir):
    server = start_server("--model", str(model_dir), "--shutdown-timeout", "20", *SERVER_ARGS)
    yield server
    server.stop()


def _core_and_ranks(server) -> tuple[int, list[int]]:
    [core_pid] = spawned_children(server.process.pid)
    ranks = spawned_children(core_pid)
    assert len(ranks) == 1, ranks
    return core_pid, ranks


def test_openai_client_completions_chat_and_streaming(server, model_dir):
    from inference import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="float32", max_model_len=256, num_kv_blocks=64)
    expected = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)
    # The chat prompt as the template renders it (it writes any special tokens itself).
    chat_prompt = llm.tokenizer.encode(
        llm.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)
    [offline_chat] = llm.generate([chat_prompt], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    model = model_dir.name
    for prompt, offline in zip(PROMPTS, expected):
        response = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
        assert response.choices[0].text == offline.outputs[0].text
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == offline_chat.outputs[0].text
    assert chat.choices[0].finish_reason == offline_chat.outputs[0].finish_reason
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (
        len(chat_prompt), len(offline_chat.outputs[0].token_ids))
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == chat.choices[0].message.content


def test_killed_rank_gives_503_within_5s_and_leaves_nothing(model_dir):
    server = start_server("--model", str(model_dir), "--shutdown-timeout", "10", *SERVER_ARGS)
    try:
        core_pid, ranks = _core_and_ranks(server)

        events, waited = asyncio.run(kill_mid_stream(server, ranks[0], max_wait_s=5.0))
        assert "error" in events[-1] and "Generation failed" in events[-1]["error"]["message"]
        assert waited < 5.0
        wait_gone([core_pid, *ranks], timeout=5)
        assert "tensor-parallel rank 1 exited with code -9" in server.log_tail(20000)
        assert server.process.wait(timeout=30) == 1, server.log_tail()  # by itself, for a restart
    finally:
        server.stop()


def test_sigterm_drains_and_exits_0_leaving_nothing(server):
    core_pid, ranks = _core_and_ranks(server)
    body = {"prompt": "Write a long story:", "max_tokens": 60, "ignore_eos": True, "stream": True}
    result: dict[str, list] = {}

    def stream() -> None:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            with client.stream("POST", C, json=body) as response:
                lines = []
                for line in response.iter_lines():
                    lines.append(line)
                    if len(lines) == 1:
                        result["started"] = []
                result["events"] = sse_events(lines)

    thread = threading.Thread(target=stream)
    thread.start()
    deadline = time.monotonic() + 30
    while "started" not in result:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.process.send_signal(signal.SIGTERM)
    thread.join(timeout=60)
    assert server.process.wait(timeout=40) == 0, server.log_tail()
    text = "".join(e["choices"][0]["text"] for e in result["events"] if e.get("choices"))
    assert result["events"][-1]["choices"][0]["finish_reason"] == "length" and text
    wait_gone([core_pid, *ranks], timeout=5)
