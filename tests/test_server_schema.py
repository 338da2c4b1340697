"""Every response body and every stream chunk validates against OpenAI's
published schemas (tests/schemas/openai)."""

from __future__ import annotations

import pytest
from openai_schemas import check_error, validate
from server_fixtures import shared_server, sse_events

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": " hello."}]}]

COMPLETIONS = {
    "plain": {"prompt": "Hello, my name is", "max_tokens": 6},
    "n2 prompt list": {"prompt": ["One", "Two"], "max_tokens": 4, "n": 2},
    "token ids": {"prompt": [[9906, 28, 957, 1462, 314]], "max_tokens": 4, "temperature": 0},
    "logprobs": {"prompt": "Hello", "max_tokens": 4, "logprobs": 3},
    "echo": {"prompt": "Hello", "max_tokens": 3, "echo": True},
    "stop": {"prompt": "1, 2, 3,", "max_tokens": 12, "stop": [","], "temperature": 0},
    "vllm extras": {"prompt": "Hi", "max_tokens": 4, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2,
                    "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [2], "logit_bias": {"28": -5},
                    "presence_penalty": 0.5, "frequency_penalty": 0.5, "user": "u1", "priority": 1,
                    "cache_salt": "tenant-a", "skip_special_tokens": False},
}
CHATS = {
    "plain": {"messages": MESSAGES, "max_tokens": 6},
    "max_completion_tokens": {"messages": MESSAGES, "max_completion_tokens": 3},
    "n2 logprobs": {"messages": MESSAGES, "max_tokens": 4, "n": 2, "logprobs": True, "top_logprobs": 2},
    "all roles": {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
                  "max_tokens": 4},
}


def _num_choices(body: dict) -> int:
    """n per prompt; `prompt` is one string or token list, or a list of them."""
    prompt = body["prompt"]
    several = isinstance(prompt, list) and not all(isinstance(t, int) for t in prompt)
    return body.get("n", 1) * (len(prompt) if several else 1)


@pytest.fixture(scope="module")
def http():
    with shared_server().client() as client:
        yield client


def _stream(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response.iter_lines())


@pytest.mark.parametrize("body", COMPLETIONS.values(), ids=COMPLETIONS.keys())
def test_completion_response(http, body):
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    validate(response.json(), "CreateCompletionResponse")
    choices = response.json()["choices"]
    assert sorted(c["index"] for c in choices if c["finish_reason"]) == list(range(_num_choices(body)))


def test_completion_echo_with_logprobs(http):
    response = http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 3, "echo": True,
                                                   "logprobs": 1})
    assert response.status_code == 200, response.text
    body = response.json()
    validate(body, "EchoLogprobsCompletionResponse")
    choice = body["choices"][0]
    assert choice["text"].startswith("Hello there")
    token_logprobs = choice["logprobs"]["token_logprobs"]
    assert token_logprobs[0] is None  # nothing precedes the first prompt token
    assert all(isinstance(lp, float) for lp in token_logprobs[1:])
    assert len(choice["logprobs"]["tokens"]) == body["usage"]["prompt_tokens"] + 3


@pytest.mark.parametrize("body", COMPLETIONS.values(), ids=COMPLETIONS.keys())
def test_completion_stream_chunks(http, body):
    chunks = _stream(http, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    for chunk in chunks:
        validate(chunk, "StreamedCompletionResponse")
    assert chunks[-1]["choices"] == [] and "usage" in chunks[-1]
    finished = [c["choices"][0]["index"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == list(range(_num_choices(body)))  # each choice of each prompt, once


@pytest.mark.parametrize("body", CHATS.values(), ids=CHATS.keys())
def test_chat_response(http, body):
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    validate(response.json(), "CreateChatCompletionResponse")


@pytest.mark.parametrize("body", CHATS.values(), ids=CHATS.keys())
def test_chat_stream_chunks(http, body):
    chunks = _stream(http, "/v1/chat/completions",
                     {**body, "stream": True, "stream_options": {"include_usage": True}})
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    n = body.get("n", 1)
    assert [c["choices"][0]["delta"].get("role") for c in chunks[:n]] == ["assistant"] * n
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


def test_models_response(http):
    response = http.get("/v1/models")
    assert response.status_code == 200
    validate(response.json(), "ListModelsResponse")


@pytest.mark.parametrize("path, body, status", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 99}, 400),
    ("/v1/nowhere", {}, 404),
])
def test_error_responses(http, path, body, status):
    response = http.post(path, json=body)
    assert response.status_code == status
    check_error(response)


def test_tokenize_round_trip(http):
    tokens = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 256
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert chat["count"] > tokens["count"]


def test_version_and_metrics(http):
    assert http.get("/version").json()["version"]
    metrics = shared_server().metrics()
    assert metrics["pagedinfer_ready"] == 1.0
    assert metrics["pagedinfer_kv_cache_total_blocks"] == 512
