"""POST /v1/completions/render and /v1/chat/completions/render: the token ids
(and the chat-templated prompt) the engine would run for a request, with no
generation, in vLLM's response shape (server/protocol_render.py).

The request goes through the same preparation as the generating endpoints
and the same admission check as the engine core (`check_request`), so a
prompt renders exactly when it would run, and a bad one gets the same 400.
Rendering needs the tokenizer only: no engine work, no queue slot."""

from __future__ import annotations

import dataclasses
import uuid

from inference.core_protocol import check_request
from inference.sampling_params import SamplingParams
from server.errors import bad_request
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from server.protocol_render import RenderedRequest
from server.serving_chat import prepare_chat
from server.serving_common import KNOWN_PARAMS
from server.serving_completions import prepare_completion
from server.state import ServerState


def _rendered(state: ServerState, request: SamplingRequest, id_prefix: str, token_ids: list[int],
              params: SamplingParams, prompt: str | None = None) -> RenderedRequest:
    engine = state.engine
    try:
        check_request(token_ids, params, engine.config, engine.vocab_size)
    except ValueError as exc:
        raise bad_request(exc, KNOWN_PARAMS) from exc
    return RenderedRequest(
        request_id=f"{id_prefix}-{uuid.uuid4().hex}",
        token_ids=token_ids,
        sampling_params=dataclasses.asdict(params),
        model=request.model,
        stream=request.stream,
        stream_options=request.stream_options if request.stream else None,
        cache_salt=request.cache_salt,
        priority=request.priority,
        prompt=prompt,
    )


async def render_completion(state: ServerState, request: CompletionRequest) -> list[RenderedRequest]:
    """One rendered request per prompt, as vLLM answers."""
    _, engine_inputs = await prepare_completion(state, request)
    return [_rendered(state, request, "cmpl", token_ids, params) for token_ids, params in engine_inputs]


async def render_chat_completion(state: ServerState, request: ChatCompletionRequest) -> RenderedRequest:
    prompt = await prepare_chat(state, request)
    return _rendered(state, request, "chatcmpl", prompt.token_ids, prompt.params, prompt.text)
