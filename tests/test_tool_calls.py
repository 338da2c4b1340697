"""Tool calling: the parsers and prompt rendering on their own, then the
official `openai` client against a live server: `required` and named
choices always give calls whose arguments validate, streamed and not, every
chunk fits OpenAI's schema; `auto` and tool history messages work."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from openai_schemas import validate
from server_fixtures import API_KEY, STRUCTURED_SERVER_ARGS, shared_server

from server.chat_tools import conversation, parse_required, tool_choice_spec
from server.protocol import ChatMessage
from server.protocol_structured import ToolDefinition
from server.tool_parsers import HermesToolParser, Llama3JsonToolParser, parse_tool_calls, parser_for_template

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 24}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


# ---- parsers and rendering, no server ------------------------------------------


def test_hermes_parser_streams_content_and_whole_calls():
    text = 'Let me check. <tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
    parser = HermesToolParser()
    pieces = [parser.feed(text[:end], end == len(text)) for end in range(1, len(text) + 1)]
    content = "".join(c for c, _ in pieces)
    calls = [call for _, found in pieces for call in found]
    assert content == "Let me check. "  # never a piece of the markup
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"timezone": "UTC"})]
    assert parse_tool_calls(HermesToolParser, "plain <tool_call>{broken</tool_call>") == (
        "plain <tool_call>{broken</tool_call>", [])


def test_llama3_json_parser():
    content, calls = parse_tool_calls(
        Llama3JsonToolParser, '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}')
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("a", '{"x": 1}'), ("b", "{}")]
    assert parse_tool_calls(Llama3JsonToolParser, "Hello there") == ("Hello there", [])
    assert parse_tool_calls(Llama3JsonToolParser, '{"not": "a call"}') == ('{"not": "a call"}', [])
    assert parser_for_template("{{ '<|python_tag|>' }}") is Llama3JsonToolParser
    assert parser_for_template("plain template") is HermesToolParser


def test_templates_without_tools_get_the_hermes_system_message_and_history():
    tools = [ToolDefinition.model_validate(t) for t in TOOLS]
    messages = [ChatMessage.model_validate(m) for m in [
        {"role": "system", "content": "Be brief."}, *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]]
    rendered = conversation(messages, tools, native=False)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert rendered[0]["content"].startswith("Be brief.") and '"name": "get_time"' in rendered[0]["content"]
    assert rendered[2]["content"].startswith("<tool_call>\n") and '"Paris"' in rendered[2]["content"]
    assert rendered[3]["content"] == "<tool_response>\n18 C, sunny\n</tool_response>"
    native = conversation(messages, tools, native=True)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "celsius"}
    assert native[3] == {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_1"}


def test_required_grammar_schema_accepts_only_declared_calls():
    tools = [ToolDefinition.model_validate(t) for t in TOOLS]
    schema = json.loads(tool_choice_spec(tools, "required", parallel=False).json)
    good = [{"name": "get_time", "parameters": {"timezone": "CET"}}]
    jsonschema.validate(good, schema)
    for bad in ([], good * 2, [{"name": "get_time", "parameters": {"city": "x"}}], [{"name": "nope", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert [c.name for c in parse_required(json.dumps(good))] == ["get_time"]
    assert parse_required('[{"name": "get_ti') is None


# ---- live server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def new_client():
    """A client per event loop: an async client's connections belong to the loop that opened them."""
    server = shared_server(*STRUCTURED_SERVER_ARGS)
    return lambda: openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=600)


def check_calls(tool_calls, names: set[str]) -> None:
    assert tool_calls
    for call in tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


async def _create(client, tool_choice, seed: int | None, stream: bool, **extra):
    response = await client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=128, stream=stream,
        temperature=0.0 if seed is None else 1.0, seed=seed, **extra)
    if not stream:
        return response
    return [chunk async for chunk in response]


def _assemble(chunks) -> tuple[list, str | None]:
    """Tool calls and finish reason from streamed chunks, each chunk validated."""
    calls: dict[int, dict] = {}
    reason = None
    for chunk in chunks:
        validate(chunk.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionStreamResponse")
        for choice in chunk.choices:
            reason = choice.finish_reason or reason
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    tool_calls = [openai.types.chat.ChatCompletionMessageFunctionToolCall.model_validate(
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}})
        for c in calls.values()]
    return tool_calls, reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_and_named_choices_always_give_valid_calls(new_client, stream):
    named = {"type": "function", "function": {"name": "get_time"}}
    jobs = [(choice, seed) for choice in ("required", named) for seed in [None, 0, 1, 2]]

    async def all_jobs():
        async with new_client() as client:
            return await asyncio.gather(*(_create(client, choice, seed, stream) for choice, seed in jobs))

    for (choice, _), result in zip(jobs, asyncio.run(all_jobs())):
        names = {"get_weather", "get_time"} if choice == "required" else {"get_time"}
        if stream:
            tool_calls, reason = _assemble(result)
        else:
            validate(result.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
            tool_calls, reason = result.choices[0].message.tool_calls, result.choices[0].finish_reason
        assert reason == "tool_calls", (choice, tool_calls, result)
        check_calls(tool_calls, names)


def test_parallel_tool_calls_false_gives_one_call(new_client):
    async def one():
        async with new_client() as client:
            return await _create(client, "required", 3, False, parallel_tool_calls=False)

    result = asyncio.run(one())
    assert len(result.choices[0].message.tool_calls) == 1


def test_auto_answers_with_calls_or_content_and_history_is_accepted(new_client, smollm2_tokenizer):
    def history(tool_result: str) -> list[dict]:
        return [*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": tool_result}]

    results = ["18 C and sunny", "18 C and sunny, with a light wind from the north-west and no rain"]

    async def both():
        async with new_client() as client:
            auto = await _create(client, "auto", None, False)
            streamed = await _create(client, "auto", None, True)
            follow_ups = [await client.chat.completions.create(model=MODEL, messages=history(result), tools=TOOLS,
                                                               max_tokens=max_tokens, temperature=0.0)
                          for result, max_tokens in zip(results, (32, 1))]
        return auto, streamed, follow_ups

    auto, streamed, follow_ups = asyncio.run(both())
    validate(auto.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
    message = auto.choices[0].message
    if message.tool_calls:
        assert auto.choices[0].finish_reason == "tool_calls"
        check_calls(message.tool_calls, set(SCHEMAS))
    else:
        assert message.content and "<tool_call>" not in message.content
    tool_calls, _ = _assemble(streamed)
    assert [c.function.name for c in tool_calls] == [c.function.name for c in message.tool_calls or []]
    assert follow_ups[0].choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The tool result reached the prompt: a longer one adds exactly its extra tokens
    # (each result stands between newlines, so its tokens do not merge with the markup's).
    extra = len(smollm2_tokenizer.encode(results[1])) - len(smollm2_tokenizer.encode(results[0]))
    assert extra > 0
    assert follow_ups[1].usage.prompt_tokens - follow_ups[0].usage.prompt_tokens == extra
