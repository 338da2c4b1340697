"""Bad input gets a 4xx in OpenAI's error shape, naming the parameter where
there is one, and never hurts the server."""

from __future__ import annotations

import httpx
import pytest
from openai_schemas import check_error
from server_fixtures import MAIN_SERVER_ARGS, shared_server

pytestmark = pytest.mark.slow

C = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Hi"}]
LONG_TEXT = "word " * 400  # over the test server's max_model_len of 256
JSON = {"Content-Type": "application/json"}

# (id, path, request keyword arguments, status, param the error should name)
CASES = [
    ("malformed json", C, {"content": b'{"prompt": "x",', "headers": JSON}, 400, None),
    ("body is a list", C, {"json": ["prompt"]}, 400, None),
    ("not json at all", C, {"content": b"prompt=x", "headers": {"Content-Type": "text/plain"}}, 400, None),
    ("invalid utf-8 bytes", C, {"content": b'{"prompt": "\xff\xfe\xfa"}', "headers": JSON}, 400, None),
    ("lone surrogate", C, {"content": b'{"prompt": "a\\ud800b"}', "headers": JSON}, 400, "prompt"),
    ("missing prompt", C, {"json": {"max_tokens": 2}}, 400, "prompt"),
    ("prompt is a number", C, {"json": {"prompt": 42}}, 400, "prompt"),
    ("empty prompt", C, {"json": {"prompt": ""}}, 400, "prompt"),
    ("empty prompt list", C, {"json": {"prompt": []}}, 400, "prompt"),
    ("token id out of vocab", C, {"json": {"prompt": [1, 10**6]}}, 400, "prompt"),
    ("negative token id", C, {"json": {"prompt": [[-1]]}}, 400, "prompt"),
    ("prompt over context", C, {"json": {"prompt": LONG_TEXT}}, 400, "prompt"),
    ("max_tokens wrong type", C, {"json": {"prompt": "x", "max_tokens": "many"}}, 400, "max_tokens"),
    ("max_tokens negative", C, {"json": {"prompt": "x", "max_tokens": -5}}, 400, "max_tokens"),
    ("max_tokens zero", C, {"json": {"prompt": "x", "max_tokens": 0}}, 400, "max_tokens"),
    ("max_tokens huge", C, {"json": {"prompt": "x", "max_tokens": 10**12}}, 400, "max_tokens"),
    ("n zero", C, {"json": {"prompt": "x", "n": 0}}, 400, "n"),
    ("n huge", C, {"json": {"prompt": "x", "n": 10**6}}, 400, "n"),
    ("temperature negative", C, {"json": {"prompt": "x", "temperature": -1}}, 400, "temperature"),
    ("temperature wrong type", C, {"json": {"prompt": "x", "temperature": "hot"}}, 400, "temperature"),
    ("temperature NaN", C, {"content": b'{"prompt": "x", "temperature": NaN}', "headers": JSON}, 400, "temperature"),
    ("top_p zero", C, {"json": {"prompt": "x", "top_p": 0}}, 400, "top_p"),
    ("top_p above one", C, {"json": {"prompt": "x", "top_p": 1.5}}, 400, "top_p"),
    ("top_k negative", C, {"json": {"prompt": "x", "top_k": -7}}, 400, "top_k"),
    ("logprobs too many", C, {"json": {"prompt": "x", "logprobs": 50}}, 400, "logprobs"),
    ("presence_penalty too big", C, {"json": {"prompt": "x", "presence_penalty": 5}}, 400, "presence_penalty"),
    ("logit_bias bad key", C, {"json": {"prompt": "x", "logit_bias": {"hello": 1}}}, 400, "logit_bias"),
    ("logit_bias out of vocab", C, {"json": {"prompt": "x", "logit_bias": {"999999": 1}}}, 400, "logit_bias"),
    ("stop_token_ids out of vocab", C, {"json": {"prompt": "x", "stop_token_ids": [10**7]}}, 400, "stop_token_ids"),
    ("min_tokens over max_tokens", C, {"json": {"prompt": "x", "max_tokens": 2, "min_tokens": 5}}, 400, "min_tokens"),
    ("seed too large", C, {"json": {"prompt": "x", "seed": 2**70}}, 400, "seed"),
    ("stream not a bool", C, {"json": {"prompt": "x", "stream": "perhaps"}}, 400, "stream"),
    ("unknown model", C, {"json": {"prompt": "x", "model": "gpt-9"}}, 404, "model"),
    ("chat missing messages", CHAT, {"json": {"max_tokens": 2}}, 400, "messages"),
    ("chat empty messages", CHAT, {"json": {"messages": []}}, 400, "messages"),
    ("chat bad role", CHAT, {"json": {"messages": [{"role": "wizard", "content": "x"}]}}, 400, "messages.0.role"),
    ("chat content wrong type", CHAT, {"json": {"messages": [{"role": "user", "content": 7}]}}, 400, None),
    ("chat image part", CHAT, {"json": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}}, 400, None),
    ("chat top_logprobs without logprobs", CHAT, {"json": {"messages": USER, "top_logprobs": 2}}, 400, "top_logprobs"),
    ("chat top_logprobs too many", CHAT, {"json": {"messages": USER, "logprobs": True, "top_logprobs": 21}},
     400, "top_logprobs"),
    ("chat over context", CHAT, {"json": {"messages": [{"role": "user", "content": LONG_TEXT}]}}, 400, "messages"),
    ("chat max_tokens over context", CHAT, {"json": {"messages": USER, "max_tokens": 100000}}, 400, "max_tokens"),
    ("chat unknown model", CHAT, {"json": {"messages": USER, "model": "nope"}}, 404, "model"),
    # structured outputs and tools
    ("response_format unknown type", CHAT, {"json": {"messages": USER, "response_format": {"type": "xml"}}},
     400, "response_format.type"),
    ("json_schema format without json_schema", CHAT,
     {"json": {"messages": USER, "response_format": {"type": "json_schema"}}}, 400, "response_format"),
    ("json_schema without schema", CHAT, {"json": {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x"}}}}, 400, "response_format.json_schema.schema"),
    ("invalid json schema", CHAT, {"json": {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}}, 400, "response_format"),
    ("structured_outputs bad regex", CHAT, {"json": {"messages": USER, "structured_outputs": {"regex": "(unclosed"}}},
     400, "structured_outputs"),
    ("structured_outputs two kinds", C, {"json": {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}},
     400, "structured_outputs"),
    ("structured_outputs empty", C, {"json": {"prompt": "x", "structured_outputs": {}}}, 400, "structured_outputs"),
    ("guided_regex bad", C, {"json": {"prompt": "x", "guided_regex": "[a-"}}, 400, "guided_regex"),
    ("guided_choice empty", C, {"json": {"prompt": "x", "guided_choice": []}}, 400, "guided_choice"),
    ("guided_json not json", C, {"json": {"prompt": "x", "guided_json": "{nope"}}, 400, "guided_json"),
    ("guided_json a number", C, {"json": {"prompt": "x", "guided_json": 5}}, 400, "guided_json"),
    ("guided_grammar undefined rule", C, {"json": {"prompt": "x", "guided_grammar": "root ::= missing"}},
     400, "guided_grammar"),
    ("two constraints at once", C, {"json": {"prompt": "x", "guided_regex": "a+", "guided_choice": ["b"]}},
     400, "guided_choice"),
    ("tool_choice unknown function", CHAT, {"json": {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {
            "name": "g"}}}}, 400, "tool_choice"),
    ("tool_choice required without tools", CHAT, {"json": {"messages": USER, "tool_choice": "required"}},
     400, "tool_choice"),
    ("tool_choice unknown mode", CHAT, {"json": {"messages": USER, "tool_choice": "sometimes"}}, 400, "tool_choice"),
    ("tool of unknown type", CHAT, {"json": {"messages": USER, "tools": [{"type": "retrieval"}]}}, 400, "tools.0.type"),
    ("tool name with spaces", CHAT, {"json": {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "get weather"}}]}}, 400, "tools.0.function.name"),
    ("tool with bad parameters schema", CHAT, {"json": {"messages": USER, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}}, 400, "tool_choice"),
    ("tool message without tool_call_id", CHAT, {"json": {"messages": [
        *USER, {"role": "tool", "content": "42"}]}}, 400, "messages.1"),
    ("assistant message without content or calls", CHAT, {"json": {"messages": [
        *USER, {"role": "assistant", "content": None}]}}, 400, "messages.1"),
    ("json format and required tools", CHAT, {"json": {"messages": USER, "response_format": {"type": "json_object"},
                                                       "tools": [{"type": "function", "function": {"name": "f"}}],
                                                       "tool_choice": "required"}}, 400, "tool_choice"),
    ("tokenize needs one input", "/tokenize", {"json": {}}, 400, None),
    ("detokenize out of vocab", "/detokenize", {"json": {"tokens": [10**9]}}, 400, "tokens"),
    ("body over the limit", C, {"content": b'{"prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}', "headers": JSON},
     413, None),
]


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.mark.parametrize("path, kwargs, status, param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(server, path, kwargs, status, param):
    with server.client() as client:
        response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    error = check_error(response)
    if param is not None:
        assert error["param"] == param, error


def test_context_error_states_both_lengths(server, smollm2_tokenizer):
    num_tokens = len(smollm2_tokenizer.encode(LONG_TEXT))  # as the server encodes a prompt
    max_model_len = int(MAIN_SERVER_ARGS[MAIN_SERVER_ARGS.index("--max-model-len") + 1])
    with server.client() as client:
        error = check_error(client.post(C, json={"prompt": LONG_TEXT}))
    assert error["code"] == "context_length_exceeded"
    stated = f"context length is {max_model_len} tokens, but the prompt has {num_tokens} tokens"
    assert stated in error["message"], error


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test-key"}],
                         ids=["missing key", "wrong key", "no Bearer"])
def test_bad_api_key(server, headers):
    response = httpx.post(f"{server.base_url}{C}", json={"prompt": "x"}, headers=headers)
    assert response.status_code == 401
    assert check_error(response)["code"] == "invalid_api_key"


def test_wrong_method(server):
    with server.client() as client:
        response = client.get(C)
    assert response.status_code == 405
    check_error(response)


def test_server_healthy_after_bad_inputs(server):
    with server.client() as client:
        assert client.get("/health").status_code == 200
        assert client.post(C, json={"prompt": "Still fine?", "max_tokens": 2}).status_code == 200


def test_plain_text_format_and_no_tools_are_accepted():
    from server.protocol import ChatCompletionRequest

    request = ChatCompletionRequest(messages=USER, tools=[], response_format={"type": "text"})
    assert request.tools == [] and request.response_format.type == "text"
