"""Every sampling field of a completion request reaches the engine.

Schema tests (tests/test_server_schema.py) show the server accepts these
fields; here each one must change what comes back. For each field a request
with it must give what the offline engine gives with the same
SamplingParams, written out by hand (not through server/protocol.py, which is
what is under test), while the offline engine without the field gives
something else: a server that dropped the field would answer like the
latter. `priority` and `cache_salt` act across requests, so they get tests of
their own: a higher priority overtakes in the queue, and another salt misses
the prefix cache.

The tiny Llama's shared server (float32, one request at a time, so that two
queued requests show the scheduler's order) serves the module.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from server_fixtures import shared_server, tiny_server_args

from inference import LLM, SamplingParams

C = "/v1/completions"
EOS = 256  # the tiny tokenizer's <eos>
PROMPT = [ord(c) for c in "Once upon a time, "]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server(tiny_llama_chat_dir):
    return shared_server(*tiny_server_args(tiny_llama_chat_dir))


@pytest.fixture(scope="module")
def llm(tiny_llama_chat_dir) -> LLM:
    return LLM(model=str(tiny_llama_chat_dir), dtype="float32", max_model_len=256, num_kv_blocks=64, max_num_seqs=1)


def offline(llm: LLM, **params) -> tuple[str, str, int]:
    """(text, finish reason, completion tokens) of PROMPT with these SamplingParams."""
    params = {"max_tokens": MAX_TOKENS, "temperature": 0.0, **params}
    [output] = llm.generate([PROMPT], SamplingParams(**params), use_tqdm=False)
    sample = output.outputs[0]
    return sample.text, sample.finish_reason, len(sample.token_ids)


def served(server, **fields) -> tuple[str, str, int]:
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0, **fields}
    with server.client() as client:
        reply = client.post(C, json=body)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    return choice["text"], choice["finish_reason"], reply.json()["usage"]["completion_tokens"]


# (the field under test, request fields, the same as SamplingParams): the
# other fields set the scene in both the request and the engine run without
# the field: a seed and a temperature, or a logit bias that makes greedy
# decoding repeat "A" (65), for the penalties to act on, or choose <eos>.
A_BIAS = ({"logit_bias": {"65": 0.8}}, {"logit_bias": {65: 0.8}})
EOS_BIAS = ({"logit_bias": {str(EOS): 100}}, {"logit_bias": {EOS: 100.0}})


def case(field: str, scene: tuple[dict, dict], value) -> tuple[str, dict, dict]:
    return field, {**scene[0], field: value}, {**scene[1], field: value}


CASES = [
    case("top_k", ({"temperature": 2.0, "seed": 3}, {"temperature": 2.0, "seed": 3}), 2),
    case("min_p", ({"temperature": 2.0, "seed": 4}, {"temperature": 2.0, "seed": 4}), 0.8),
    case("presence_penalty", A_BIAS, 2.0),
    case("frequency_penalty", A_BIAS, 2.0),
    case("repetition_penalty", A_BIAS, 2.0),
    ("logit_bias", {"logit_bias": {"65": 100}}, {"logit_bias": {65: 100.0}}),
    case("min_tokens", EOS_BIAS, 5),
    case("ignore_eos", EOS_BIAS, True),
    ("skip_special_tokens", {**EOS_BIAS[0], "ignore_eos": True, "skip_special_tokens": False},
     {**EOS_BIAS[1], "ignore_eos": True, "skip_special_tokens": False}),
]


@pytest.mark.parametrize("field,fields,params", CASES, ids=[c[0] for c in CASES])
def test_field_reaches_the_engine(server, llm, field, fields, params):
    without = offline(llm, **{k: v for k, v in params.items() if k != field})
    expected = offline(llm, **params)
    assert expected != without, f"{field} changes nothing offline: the case proves nothing"
    assert served(server, **fields) == expected


def test_stop_token_ids_reach_the_engine(server, llm):
    [greedy] = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    stop = greedy.outputs[0].token_ids[3]
    expected = offline(llm, stop_token_ids=[stop])
    assert expected[1:] == ("stop", greedy.outputs[0].token_ids.index(stop) + 1)
    assert served(server, stop_token_ids=[stop]) == expected


def test_seed_reaches_the_engine(server, llm):
    expected = offline(llm, temperature=1.5, seed=7)
    assert expected != offline(llm, temperature=1.5, seed=8)
    # Unseeded, twelve tokens drawn at temperature 1.5 would hardly repeat the seeded ones.
    assert served(server, temperature=1.5, seed=7) == expected


def test_higher_priority_overtakes_in_the_queue(server):
    """With one request running and two queued, the one with the lower
    priority value runs first, though it came second."""

    async def finish_order() -> list[str]:
        async with server.async_client() as client:
            first_token = asyncio.Event()

            async def run(name: str, body: dict) -> str:
                body = {"prompt": PROMPT, "temperature": 0.0, "ignore_eos": True, "stream": True, **body}
                async with client.stream("POST", C, json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            first_token.set()
                return name

            done: list[str] = []
            # Long enough to outlast the two queueings below on a fast engine (a tiny model's
            # step takes under a millisecond with one thread): max_model_len is 1024.
            running = asyncio.create_task(run("running", {"max_tokens": 1000}))
            await first_token.wait()
            tasks = [asyncio.create_task(run("normal", {"max_tokens": 4}))]
            await wait_for_waiting(server, 1)
            tasks.append(asyncio.create_task(run("urgent", {"max_tokens": 4, "priority": -1})))
            await wait_for_waiting(server, 2)
            for task in asyncio.as_completed([running, *tasks]):
                done.append(await task)
            return done

    assert asyncio.run(finish_order()) == ["running", "urgent", "normal"]


async def wait_for_waiting(server, count: int) -> None:
    deadline = time.monotonic() + 30
    while (await asyncio.to_thread(server.metrics)).get("pagedinfer_num_requests_waiting") != count:
        assert time.monotonic() < deadline, f"never {count} requests waiting"
        await asyncio.sleep(0.02)


def test_cache_salt_separates_prefix_caches(server):
    prompt = [ord(c) for c in "A prompt of more than two blocks of sixteen tokens, for the salt test."]

    def cached_tokens(**fields) -> int:
        with server.client() as client:
            reply = client.post(C, json={"prompt": prompt, "max_tokens": 1, **fields})
        assert reply.status_code == 200, reply.text
        return reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached_tokens(cache_salt="tenant-a") == 0
    assert cached_tokens(cache_salt="tenant-a") >= 32  # the same salt hits
    assert cached_tokens(cache_salt="tenant-b") == 0  # dropped, it would hit too
    assert cached_tokens() == 0
