"""/v1/completions/render and /v1/chat/completions/render on a real server:
vLLM's response shape, token ids equal to the tokenizer and chat template
applied here with transformers, nothing generated, and bad input answered in
OpenAI's error shape."""

from __future__ import annotations

import httpx
import pytest
from openai_schemas import check_error
from server_fixtures import MAIN_SERVER_ARGS, shared_server

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = int(MAIN_SERVER_ARGS[MAIN_SERVER_ARGS.index("--max-model-len") + 1])
RENDER = "/v1/completions/render"
CHAT_RENDER = "/v1/chat/completions/render"
MESSAGES = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]
# vLLM's GenerateRequest, field for field (vllm/entrypoints/serve/disagg/protocol.py).
GENERATE_REQUEST_FIELDS = {
    "request_id", "token_ids", "features", "sampling_params", "model", "stream", "stream_options",
    "cache_salt", "priority", "kv_transfer_params",
}


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def http(server):
    with server.client() as client:
        yield client


def generated_tokens(server) -> float:
    return server.metrics()["pagedinfer_generation_tokens_total"]


def test_completion_render_is_a_list_of_generate_requests(http, server, tokenizer):
    before = generated_tokens(server)
    body = {"prompt": ["The capital of France is", "Hello"], "max_tokens": 5, "temperature": 0.25,
            "top_p": 0.5, "stop": ["\n"], "cache_salt": "tenant-a", "priority": 3}
    response = http.post(RENDER, json=body)
    assert response.status_code == 200, response.text
    rendered = response.json()
    assert isinstance(rendered, list) and len(rendered) == 2
    assert rendered[0]["token_ids"] == tokenizer.encode("The capital of France is")
    assert rendered[1]["token_ids"] == tokenizer.encode("Hello")
    for item in rendered:
        assert set(item) == GENERATE_REQUEST_FIELDS  # no templated prompt for a plain completion
        assert item["request_id"].startswith("cmpl-")
        assert item["features"] is None and item["kv_transfer_params"] is None
        assert item["model"] is None and item["stream"] is False and item["stream_options"] is None
        assert item["cache_salt"] == "tenant-a" and item["priority"] == 3
        params = item["sampling_params"]
        assert params["max_tokens"] == 5 and params["temperature"] == 0.25 and params["top_p"] == 0.5
        assert params["stop"] == ["\n"] and params["n"] == 1
    assert rendered[0]["request_id"] != rendered[1]["request_id"]
    [ids_prompt] = http.post(RENDER, json={"prompt": [1, 2, 3]}).json()
    assert ids_prompt["token_ids"] == [1, 2, 3] and ids_prompt["sampling_params"]["max_tokens"] == 16
    assert generated_tokens(server) == before, "render generated tokens"


def test_chat_render_matches_the_template_and_what_the_engine_runs(http, tokenizer):
    model = http.get("/v1/models").json()["data"][0]["id"]
    for add_generation_prompt in (True, False):
        body = {"model": model, "messages": MESSAGES, "add_generation_prompt": add_generation_prompt}
        response = http.post(CHAT_RENDER, json=body)
        assert response.status_code == 200, response.text
        rendered = response.json()
        assert set(rendered) == GENERATE_REQUEST_FIELDS | {"prompt"}
        assert rendered["request_id"].startswith("chatcmpl-") and rendered["model"] == model
        text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert rendered["prompt"] == text
        ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=add_generation_prompt,
                                            return_dict=False)
        assert rendered["token_ids"] == list(ids)
        # No max_tokens: the engine would get all the room left, as /v1/chat/completions gives it.
        assert rendered["sampling_params"]["max_tokens"] == MAX_MODEL_LEN - len(ids)

    # The ids are the prompt the generating endpoint runs.
    completion = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}).json()
    rendered = http.post(CHAT_RENDER, json={"messages": MESSAGES, "max_tokens": 1}).json()
    assert completion["usage"]["prompt_tokens"] == len(rendered["token_ids"])


def test_render_keeps_stream_options_as_vllm_does(http):
    body = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    response = http.post(CHAT_RENDER, json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    rendered = response.json()
    assert rendered["stream"] is True and rendered["stream_options"] == {"include_usage": True}


def test_render_carries_the_grammar_the_engine_would_get(http):
    body = {"messages": MESSAGES, "structured_outputs": {"choice": ["red", "green"]}}
    rendered = http.post(CHAT_RENDER, json=body).json()
    assert rendered["sampling_params"]["structured_outputs"]["choice"] == ["red", "green"]


LONG_TEXT = "word " * 400  # over the test server's max_model_len

# (id, path, body, status, param the error names, code)
BAD = [
    ("unknown model", RENDER, {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ("unknown model, chat", CHAT_RENDER, {"model": "nope", "messages": MESSAGES}, 404, "model", "model_not_found"),
    ("prompt over context", RENDER, {"prompt": LONG_TEXT}, 400, "prompt", "context_length_exceeded"),
    ("messages over context", CHAT_RENDER, {"messages": [{"role": "user", "content": LONG_TEXT}]}, 400, "messages",
     "context_length_exceeded"),
    ("token id out of vocab", RENDER, {"prompt": [1, 10**6]}, 400, "prompt", None),
    ("no messages", CHAT_RENDER, {"messages": []}, 400, "messages", None),
    ("temperature negative", RENDER, {"prompt": "x", "temperature": -1}, 400, "temperature", None),
    ("bad grammar", CHAT_RENDER, {"messages": MESSAGES, "structured_outputs": {"regex": "("}}, 400,
     "structured_outputs", None),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_input_gets_an_openai_error(http, path, body, status, param, code):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = check_error(response)
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def test_render_needs_the_api_key(server):
    response = httpx.post(f"{server.base_url}{RENDER}", json={"prompt": "x"})
    assert response.status_code == 401
    assert check_error(response)["code"] == "invalid_api_key"
