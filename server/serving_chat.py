"""POST /v1/chat/completions: messages through the model's chat template.

With tools, the reply goes through server/chat_tools.py: a `ToolReply` per
choice turns the text into content and `tool_calls`, whole or as stream
deltas."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import Request
from starlette.responses import Response, StreamingResponse

from inference.request_stream import RequestStream
from inference.outputs import PositionLogprobs
from inference.sampling_params import SamplingParams
from server.chat_replies import ToolReply
from server.chat_tools import conversation, template_supports_tools
from server.errors import APIError
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from server.protocol_structured import NamedToolChoice, ToolDefinition
from server.serving_common import (
    Trace,
    StreamTracker,
    add_requests,
    admit,
    build_params,
    collect_final,
    finish_reason,
    merge_streams,
    response_model,
    sse,
    stop_reason,
    until_disconnected,
)
from server.state import ServerState
from server.structured import effective_tool_choice, structured_outputs
from server.tool_parsers import parser_for_template

logger = logging.getLogger(__name__)


def chat_prompt(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool,
                tools: list[ToolDefinition] | None = None) -> tuple[str, list[int]]:
    """The chat-templated prompt and its token ids; runs on the tokenizer thread."""
    native = template_supports_tools(tokenizer.chat_template)
    kwargs = {"tools": [t.model_dump(exclude_none=True) for t in tools]} if native and tools else {}
    try:
        text = tokenizer.apply_chat_template(conversation(messages, tools, native), tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as exc:
        raise APIError(400, f"The chat template rejected the messages: {exc}", param="messages") from exc
    # The template already wrote any special tokens the model expects.
    return text, tokenizer.encode(text, add_special_tokens=False)


def _logprobs(token_ids: list[int], positions: list[PositionLogprobs], num_top: int) -> ChoiceLogprobs:
    content = []
    for token_id, position in zip(token_ids, positions):
        chosen = position[token_id]
        top = sorted((lp for lp in position.values() if lp.rank <= num_top), key=lambda lp: lp.rank)
        content.append(TokenLogprob(
            token=chosen.decoded_token,
            logprob=chosen.logprob,
            bytes=list(chosen.decoded_token.encode()),
            top_logprobs=[TopLogprob(token=lp.decoded_token, logprob=lp.logprob, bytes=list(lp.decoded_token.encode()))
                          for lp in top],
        ))
    return ChoiceLogprobs(content=content)


@dataclass(slots=True)
class ChatPrompt:
    """What the engine runs for a chat request: the templated prompt and its parameters."""

    text: str
    token_ids: list[int]
    params: SamplingParams
    tool_choice: str | NamedToolChoice
    tools: list[ToolDefinition] | None  # None when the model is not told of them


async def prepare_chat(state: ServerState, request: ChatCompletionRequest) -> ChatPrompt:
    """Validate the request and render its prompt; every problem is a 400 naming its parameter."""
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    tool_choice = effective_tool_choice(request)
    tools = request.tools if tool_choice != "none" else None  # "none": the model is not told of them
    structured = await structured_outputs(state, request)
    text, token_ids = await state.run_tokenizer(chat_prompt, state.tokenizer, request.messages,
                                                request.add_generation_prompt, tools)
    params = build_params(
        state, request, num_prompt_tokens=len(token_ids), prompt_param="messages",
        max_tokens=request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None, structured_outputs=structured,
    )
    return ChatPrompt(text, token_ids, params, tool_choice, tools)


async def create_chat_completion(state: ServerState, request: ChatCompletionRequest, raw_request: Request,
                                 trace: Trace | None = None) -> Response:
    arrival_time = time.monotonic()
    engine = admit(state, request.model)
    prompt = await prepare_chat(state, request)
    if state.settings.log_prompts:
        logger.info("chat messages: %r", [m.text() for m in request.messages])
    num_top = request.top_logprobs or 0
    parser = parser_for_template(state.tokenizer.chat_template)
    tools, tool_choice = prompt.tools, prompt.tool_choice

    def new_reply() -> ToolReply | None:
        return ToolReply(tool_choice, parser) if tools else None

    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    streams = await add_requests(engine, request_id, [(prompt.token_ids, prompt.params)], request, arrival_time, trace)
    created = int(time.time())
    model = response_model(state, request.model)
    if request.stream:
        return StreamingResponse(sse(_stream(request, streams, request_id, created, model, new_reply)),
                                 media_type="text/event-stream")

    [final] = await until_disconnected(raw_request, collect_final(streams))
    choices = []
    for sample in final.outputs:
        reason = finish_reason(sample)
        reply = new_reply()
        message = AssistantMessage(content=sample.text)
        if reply is not None:
            content, calls, reason = reply.whole(sample.text, reason)
            message = AssistantMessage(content=content, tool_calls=calls or None)
        choices.append(ChatChoice(
            index=sample.index,
            message=message,
            logprobs=_logprobs(sample.token_ids, sample.logprobs or [], num_top) if request.logprobs else None,
            finish_reason=reason,
            **stop_reason(sample),
        ))
    response = ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                      usage=Usage.of([final]))
    return Response(response.model_dump_json(), media_type="application/json")


async def _stream(request: ChatCompletionRequest, streams: list[RequestStream], request_id: str, created: int,
                  model: str, new_reply: Callable[[], ToolReply | None]) -> AsyncIterator[dict[str, Any]]:
    """ChatCompletionChunks as plain dicts (see serving_common)."""
    head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}

    def choice(index: int, delta: dict[str, Any], logprobs: ChoiceLogprobs | None = None,
               reason: str | None = None, extra: dict[str, str] | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs and logprobs.model_dump(),
                                     "finish_reason": reason, **(extra or {})}]}

    # As OpenAI does, each choice opens with the role and empty content.
    for index in range(request.n):
        yield choice(index, {"role": "assistant", "content": ""})
    tracker = StreamTracker(request.n)
    num_top = request.top_logprobs or 0
    replies = [new_reply() for _ in range(request.n)]
    async for _, output in merge_streams(streams):
        for delta in tracker.deltas(0, output):
            logprobs = None
            if request.logprobs:
                start = delta.first_new_token
                logprobs = _logprobs(delta.sample.token_ids[start:], (delta.sample.logprobs or [])[start:], num_top)
            reply = replies[delta.index]
            message, reason = {"content": delta.text}, delta.finish_reason
            if reply is not None:
                message, reason = reply.delta(delta.sample.text, delta.text, reason)
            yield choice(delta.index, message, logprobs, reason, stop_reason(delta.sample))
    if request.include_usage:
        yield {**head, "choices": [], "usage": tracker.usage().model_dump()}
