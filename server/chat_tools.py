"""Tools in a chat: how they reach the prompt, how `tool_choice` is enforced,
and how the reply becomes `tool_calls`.

- Templates that know tools get them through
  `apply_chat_template(tools=...)`. For the others (SmolLM2's among them) a
  system message in the Hermes format lists them, as Qwen2.5's template
  does, assistant calls are written back as `<tool_call>` blocks and tool
  results as `<tool_response>` blocks in a user turn.
- `tool_choice="required"` constrains the reply to a JSON array of
  `{"name", "parameters"}` calls, and a named function to that function's
  arguments (vLLM's grammars): the arguments always match the schema.
- `auto` leaves the reply free; the template's parser (server/tool_parsers.py)
  finds the calls, and whatever is not a call stays content.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from inference.sampling_params import StructuredOutputsParams
from server.protocol_structured import FunctionDefinition, NamedToolChoice, ToolCall, ToolDefinition
from server.tool_parsers import ParsedCall

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about "
    "what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags as follows:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Calls one `required` reply may hold: bounded, so a model that repeats a
# call still closes the array before max_tokens.
MAX_PARALLEL_CALLS = 4


def template_supports_tools(chat_template: str | None) -> bool:
    return "tools" in (chat_template or "")


def _arguments(call: ToolCall) -> Any:
    """Templates expect the arguments as a mapping; keep text that is not JSON."""
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


def _hermes_call(call: ToolCall) -> str:
    body = json.dumps({"name": call.function.name, "arguments": _arguments(call)}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def conversation(messages: list, tools: list[ToolDefinition] | None, native: bool) -> list[dict[str, Any]]:
    """Messages as the chat template takes them. `native`: the template
    renders tools, tool calls and tool results itself."""
    result: list[dict[str, Any]] = []
    for m in messages:
        # Templates know system/user/assistant; OpenAI's "developer" is the new name for system.
        role = "system" if m.role == "developer" else m.role
        entry: dict[str, Any] = {"role": role, "content": m.text()}
        if native:
            if m.tool_calls:
                entry["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c)}} for c in m.tool_calls]
            if m.tool_call_id:
                entry["tool_call_id"] = m.tool_call_id
        elif m.tool_calls:
            entry["content"] = "\n".join([entry["content"]] * bool(entry["content"])
                                         + [_hermes_call(c) for c in m.tool_calls])
        elif role == "tool":
            entry = {"role": "user", "content": f"<tool_response>\n{entry['content']}\n</tool_response>"}
        result.append(entry)
    if tools and not native:
        listing = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
        system = HERMES_SYSTEM.format(tools=listing)
        if result and result[0]["role"] == "system":
            result[0] = {"role": "system", "content": f"{result[0]['content']}\n\n{system}"}
        else:
            result.insert(0, {"role": "system", "content": system})
    return result


def _parameters(function: FunctionDefinition) -> dict[str, Any]:
    return function.parameters or ANY_OBJECT


def forced_function(tools: list[ToolDefinition], choice: NamedToolChoice) -> FunctionDefinition:
    """The named function; ValueError if no tool has that name."""
    for tool in tools:
        if tool.function.name == choice.function.name:
            return tool.function
    raise ValueError(f"tool_choice names function {choice.function.name!r}, which is not in tools")


def tool_choice_spec(tools: list[ToolDefinition], choice: object, parallel: bool) -> StructuredOutputsParams | None:
    """The grammar that enforces `required` or a named function; None for `auto` and `none`."""
    if isinstance(choice, NamedToolChoice):
        return StructuredOutputsParams(json=_parameters(forced_function(tools, choice)))
    if choice != "required":
        return None
    calls = [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": _parameters(t.function)},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for t in tools]
    schema = {"type": "array", "minItems": 1, "maxItems": MAX_PARALLEL_CALLS if parallel else 1,
              "items": {"anyOf": calls}}
    return StructuredOutputsParams(json=schema)


def parse_required(text: str) -> list[ParsedCall] | None:
    """Calls of a `required` reply (a JSON array); None if it is cut short."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [ParsedCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False)) for item in items]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls(calls: list[ParsedCall]) -> list[ToolCall]:
    return [ToolCall.model_validate({"id": new_call_id(), "function": {"name": c.name, "arguments": c.arguments}})
            for c in calls]


def call_deltas(first_index: int, calls: list[ParsedCall]) -> list[dict[str, Any]]:
    """Stream deltas announcing whole calls, numbered from `first_index`."""
    return [{"index": first_index + i, "id": new_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(calls)]
