"""POST /v1/completions: prompts in, text out, whole or streamed."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.responses import Response, StreamingResponse

from inference.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from inference.sampling_params import SamplingParams
from server.errors import APIError
from server.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
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
from server.structured import structured_outputs

logger = logging.getLogger(__name__)

@dataclass(slots=True)
class Prompt:
    token_ids: list[int]
    text: str  # as given, or decoded from token ids; needed for echo
    token_strs: list[str]  # each prompt token decoded; filled only for echo with logprobs


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    return list(prompt)


def _tokenize(tokenizer, vocab_size: int, prompts: list[str | list[int]], echo: bool,
              want_token_strs: bool) -> list[Prompt]:
    """Runs on the tokenizer thread."""
    result = []
    for prompt in prompts:
        if isinstance(prompt, str):
            token_ids, text = tokenizer.encode(prompt), prompt
        else:
            token_ids, text = list(prompt), ""
            if echo and all(0 <= t < vocab_size for t in token_ids):
                text = tokenizer.decode(token_ids)
        token_strs = tokenizer.batch_decode([[t] for t in token_ids]) if want_token_strs else []
        result.append(Prompt(token_ids, text, token_strs))
    return result


def _add_logprobs(into: CompletionLogprobs, token_ids: list[int], positions: list[PositionLogprobs | None],
                  token_strs: list[str] | None, text_offset: int) -> int:
    """Append OpenAI's legacy logprobs; a position without logprobs (the first
    echoed prompt token) gets nulls. Returns the text offset after the tokens."""
    for i, (token_id, position) in enumerate(zip(token_ids, positions)):
        chosen = position.get(token_id) if position else None
        token = token_strs[i] if token_strs else (chosen.decoded_token if chosen else "")
        into.tokens.append(token)
        into.token_logprobs.append(chosen.logprob if chosen else None)
        into.top_logprobs.append({lp.decoded_token: lp.logprob for lp in position.values()} if position else None)
        into.text_offset.append(text_offset)
        text_offset += len(token)
    return text_offset


def _choice_logprobs(request: CompletionRequest, prompt: Prompt, output: RequestOutput, sample: CompletionOutput,
                     first_new_token: int, include_prompt: bool, text_offset: int) -> CompletionLogprobs | None:
    """Logprobs of sample.token_ids[first_new_token:], after the prompt's if
    include_prompt; text_offset is where this piece starts in the choice's text."""
    if request.logprobs is None:
        return None
    result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    if include_prompt:
        positions = output.prompt_logprobs or [None] * len(prompt.token_ids)
        _add_logprobs(result, prompt.token_ids, positions, prompt.token_strs, text_offset)
        text_offset += len(prompt.text)
    new_positions = (sample.logprobs or [])[first_new_token:]
    _add_logprobs(result, sample.token_ids[first_new_token:], new_positions, None, text_offset)
    return result


async def prepare_completion(
    state: ServerState, request: CompletionRequest,
) -> tuple[list[Prompt], list[tuple[list[int], SamplingParams]]]:
    """Tokenize every prompt and build its parameters; every problem is a 400 naming its parameter."""
    prompt_inputs = _prompt_list(request.prompt)
    structured = await structured_outputs(state, request)
    echo_logprobs = request.echo and request.logprobs is not None
    prompts = await state.run_tokenizer(
        _tokenize, state.tokenizer, state.vocab_size, prompt_inputs, request.echo, echo_logprobs
    )
    max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if request.max_tokens is None else request.max_tokens
    engine_inputs = [
        (p.token_ids, build_params(
            state, request, num_prompt_tokens=len(p.token_ids), max_tokens=max_tokens, prompt_param="prompt",
            logprobs=request.logprobs, prompt_logprobs=request.logprobs if echo_logprobs else None,
            structured_outputs=structured,
        ))
        for p in prompts
    ]
    return prompts, engine_inputs


async def create_completion(state: ServerState, request: CompletionRequest, raw_request: Request,
                            trace: Trace | None = None) -> Response:
    arrival_time = time.monotonic()
    engine = admit(state, request.model)
    prompts, engine_inputs = await prepare_completion(state, request)
    if state.settings.log_prompts:
        logger.info("completion prompts: %r", [p.text for p in prompts])
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams = await add_requests(engine, request_id, engine_inputs, request, arrival_time, trace)
    created = int(time.time())
    model = response_model(state, request.model)
    if request.stream:
        chunks = _stream(request, prompts, streams, request_id, created, model)
        return StreamingResponse(sse(chunks), media_type="text/event-stream")

    finals = await until_disconnected(raw_request, collect_final(streams))
    choices = []
    for prompt_index, (prompt, output) in enumerate(zip(prompts, finals)):
        for sample in output.outputs:
            choices.append(CompletionChoice(
                index=prompt_index * request.n + sample.index,
                text=prompt.text + sample.text if request.echo else sample.text,
                logprobs=_choice_logprobs(request, prompt, output, sample, 0, request.echo, 0),
                finish_reason=finish_reason(sample),
                **stop_reason(sample),
            ))
    response = CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=Usage.of(finals))
    return Response(response.model_dump_json(), media_type="application/json")


async def _stream(request: CompletionRequest, prompts: list[Prompt], streams, request_id: str, created: int,
                  model: str) -> AsyncIterator[dict[str, Any]]:
    """CompletionResponse chunks as plain dicts (see serving_common)."""
    head = {"id": request_id, "object": "text_completion", "created": created, "model": model}
    tracker = StreamTracker(request.n)
    text_offsets: dict[int, int] = {}
    async for prompt_index, output in merge_streams(streams):
        prompt = prompts[prompt_index]
        for delta in tracker.deltas(prompt_index, output):
            echo = request.echo and delta.is_first
            offset = text_offsets.get(delta.index, 0)
            text = prompt.text + delta.text if echo else delta.text
            logprobs = _choice_logprobs(request, prompt, output, delta.sample, delta.first_new_token, echo, offset)
            text_offsets[delta.index] = offset + len(text)
            choice = {"index": delta.index, "text": text, "logprobs": logprobs and logprobs.model_dump(),
                      "finish_reason": delta.finish_reason, **stop_reason(delta.sample)}
            yield {**head, "choices": [choice]}
    if request.include_usage:
        yield {**head, "choices": [], "usage": tracker.usage().model_dump()}
