"""POST /v1/chat/completions: messages through the model's chat template."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jinja2
from fastapi import Request
from starlette.responses import Response, StreamingResponse

from inference.request_stream import RequestStream
from inference.outputs import PositionLogprobs
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
)
from server.serving_common import (
    StreamTracker,
    add_requests,
    admit,
    build_params,
    collect_final,
    finish_reason,
    merge_streams,
    sse,
    until_disconnected,
    usage,
)
from server.state import ServerState

logger = logging.getLogger(__name__)


def render_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
    """Prompt token ids from the tokenizer's chat template; runs on the tokenizer thread."""
    # Templates know system/user/assistant; OpenAI's "developer" is the new name for system.
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as exc:
        raise APIError(400, f"The chat template rejected the messages: {exc}", param="messages") from exc
    # The template already wrote any special tokens the model expects.
    return tokenizer.encode(text, add_special_tokens=False)


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


async def create_chat_completion(state: ServerState, request: ChatCompletionRequest, raw_request: Request) -> Response:
    arrival_time = time.monotonic()
    engine = admit(state, request.model)
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    token_ids = await state.run_tokenizer(render_chat, state.tokenizer, request.messages, request.add_generation_prompt)
    if state.settings.log_prompts:
        logger.info("chat messages: %r", [m.text() for m in request.messages])
    num_top = request.top_logprobs or 0
    params = build_params(
        state, request, num_prompt_tokens=len(token_ids), prompt_param="messages",
        max_tokens=request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens,
        logprobs=num_top if request.logprobs else None,
    )
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    streams = await add_requests(engine, request_id, [(token_ids, params)], request, arrival_time)
    created = int(time.time())
    model = state.settings.served_model_name
    if request.stream:
        return StreamingResponse(sse(_stream(request, streams, request_id, created, model)),
                                 media_type="text/event-stream")

    [final] = await until_disconnected(raw_request, collect_final(streams))
    choices = [
        ChatChoice(
            index=sample.index,
            message=AssistantMessage(content=sample.text),
            logprobs=_logprobs(sample.token_ids, sample.logprobs or [], num_top) if request.logprobs else None,
            finish_reason=finish_reason(sample),
        )
        for sample in final.outputs
    ]
    response = ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                      usage=usage([final]))
    return Response(response.model_dump_json(), media_type="application/json")


async def _stream(request: ChatCompletionRequest, streams: list[RequestStream], request_id: str, created: int,
                  model: str) -> AsyncIterator[dict[str, Any]]:
    """ChatCompletionChunks as plain dicts (see serving_common)."""
    head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}

    def choice(index: int, delta: dict[str, str], logprobs: ChoiceLogprobs | None = None,
               reason: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs and logprobs.model_dump(),
                                     "finish_reason": reason}]}

    # As OpenAI does, each choice opens with the role and empty content.
    for index in range(request.n):
        yield choice(index, {"role": "assistant", "content": ""})
    tracker = StreamTracker(request.n)
    num_top = request.top_logprobs or 0
    async for _, output in merge_streams(streams):
        for delta in tracker.deltas(0, output):
            logprobs = None
            if request.logprobs:
                start = delta.first_new_token
                logprobs = _logprobs(delta.sample.token_ids[start:], (delta.sample.logprobs or [])[start:], num_top)
            yield choice(delta.index, {"content": delta.text}, logprobs, delta.finish_reason)
    if request.include_usage:
        yield {**head, "choices": [], "usage": tracker.usage().model_dump()}
