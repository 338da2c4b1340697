"""Which grammar a request asks for, checked before it reaches the engine.

A request names at most one of: `structured_outputs`, a `guided_*` field,
`response_format` (json_object or json_schema) and, in chat, a `tool_choice`
of `required` or a named function. The spec is compiled without a tokenizer
on the tokenizer thread, so a bad schema or regex is a 400 naming its field
and never reaches the engine core, and a large one never blocks the event
loop.
"""

from __future__ import annotations

from collections.abc import Callable

from inference.sampling_params import StructuredOutputsParams
from server.chat_tools import tool_choice_spec
from server.errors import APIError
from server.protocol import ChatCompletionRequest, SamplingRequest
from server.protocol_structured import NamedToolChoice
from server.state import ServerState


def _candidates(request: SamplingRequest) -> list[tuple[str, Callable[[], StructuredOutputsParams]]]:
    """(field, how to build its spec) for every constraining field given."""
    found: list[tuple[str, Callable[[], StructuredOutputsParams]]] = []
    so = request.structured_outputs
    if so is not None:
        found.append(("structured_outputs", lambda: StructuredOutputsParams(
            json=so.json_spec, regex=so.regex, choice=so.choice, grammar=so.grammar,
            json_object=bool(so.json_object))))
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        value = getattr(request, name)
        if value is not None:
            found.append((name, lambda kind=kind, value=value: StructuredOutputsParams(**{kind: value})))
    if isinstance(request, ChatCompletionRequest):
        found += _chat_candidates(request)
    return found


def _chat_candidates(request: ChatCompletionRequest) -> list[tuple[str, Callable[[], StructuredOutputsParams]]]:
    found: list[tuple[str, Callable[[], StructuredOutputsParams]]] = []
    response_format = request.response_format
    if response_format is not None and response_format.type == "json_object":
        found.append(("response_format", lambda: StructuredOutputsParams(json_object=True)))
    elif response_format is not None and response_format.type == "json_schema":
        schema = response_format.json_schema.json_schema
        found.append(("response_format", lambda: StructuredOutputsParams(json=schema)))
    choice = request.tool_choice
    if choice not in (None, "none", "auto"):
        if not request.tools:
            raise APIError(400, "tool_choice needs tools to choose from", param="tool_choice")
        try:
            spec = tool_choice_spec(request.tools, choice, request.parallel_tool_calls)
        except ValueError as exc:
            raise APIError(400, str(exc), param="tool_choice") from exc
        found.append(("tool_choice", lambda: spec))
    return found


def effective_tool_choice(request: ChatCompletionRequest) -> str | NamedToolChoice:
    """OpenAI's default: `auto` when tools are given, else `none`."""
    if request.tool_choice is not None:
        return request.tool_choice
    return "auto" if request.tools else "none"


def _check_structured_outputs(params: StructuredOutputsParams) -> None:
    # Imported on the first structured request, on the tokenizer thread:
    # xgrammar brings torch, which the front end otherwise never loads, and
    # start-up (the autoscaler's reaction time) should not pay for it.
    from inference.structured_output import check_structured_outputs

    check_structured_outputs(params)


async def structured_outputs(state: ServerState, request: SamplingRequest) -> StructuredOutputsParams | None:
    """The request's spec, compiled once without a tokenizer to check it; 400 naming the field if bad."""
    found = _candidates(request)
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError(400, f"{found[1][0]}: give only one way to constrain the output (got {names})",
                       param=found[1][0])
    name, build = found[0]
    try:
        params = build()
        await state.run_tokenizer(_check_structured_outputs, params)
    except ValueError as exc:
        raise APIError(400, f"{name}: {exc}", param=name) from exc
    return params
