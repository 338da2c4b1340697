"""HTTP routes: thin wrappers that parse, call the serving code and answer."""

from __future__ import annotations

import importlib.metadata

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from server.errors import APIError, error_response
from server.metrics import render
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server.protocol_render import RenderedRequest
from server.serving_chat import chat_prompt, create_chat_completion
from server.serving_common import check_model
from server.serving_completions import create_completion
from server.serving_render import render_chat_completion, render_completion
from server.state import ServerState

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _loaded_state(request: Request, model: str | None) -> ServerState:
    """For routes that need the tokenizer (and so the loaded model)."""
    state = _state(request)
    if state.tokenizer is None:
        raise APIError(503, "The model is still loading; retry shortly.", code="model_loading",
                       headers={"Retry-After": "5"})
    check_model(state, model)
    return state


@router.get("/health", summary="Liveness: 200 while the engine loop runs")
async def health(request: Request) -> Response:
    engine = _state(request).engine
    if engine is None or not engine.is_alive:
        return error_response(503, "The engine loop is not running.", code="engine_dead")
    return Response(status_code=200)


@router.get("/ready", summary="Readiness: 200 once the model is loaded, 503 while loading or draining")
async def ready(request: Request) -> Response:
    state = _state(request)
    if state.draining:
        return error_response(503, "The server is shutting down.", code="server_shutting_down")
    if not state.ready:
        return error_response(503, "The model is still loading.", code="model_loading")
    return JSONResponse({"status": "ready"})


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": importlib.metadata.version("pagedinfer")}


@router.get("/metrics", summary="Prometheus metrics; OpenMetrics with trace exemplars when asked for and tracing is on")
async def metrics(request: Request) -> Response:
    openmetrics = (_state(request).tracer is not None
                   and "application/openmetrics-text" in request.headers.get("accept", ""))
    body, content_type = render(request.app.state.metrics_registry, openmetrics)
    return Response(body, media_type=content_type)


@router.post("/reset_prefix_cache", summary="Forget every cached prefix (as vLLM's); KV-event subscribers hear AllBlocksCleared")
async def reset_prefix_cache(request: Request) -> Response:
    engine = _state(request).engine
    if engine is None or not engine.is_ready:
        return error_response(503, "The model is still loading.", code="model_loading")
    engine.reset_prefix_cache()
    return Response(status_code=200)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    state = _state(request)
    name = state.settings.served_model_name
    config = state.engine.config if state.engine is not None else None  # None until loaded
    card = ModelCard(id=name, created=state.started, root=config.model if config else name,
                     max_model_len=config.max_model_len if config else None)
    adapters = state.engine.lora.adapters.values() if state.engine is not None else ()
    loras = [ModelCard(id=a.name, created=state.started, root=a.path, parent=a.parent or name) for a in adapters]
    return ModelList(data=[card, *loras])


@router.post("/v1/completions", response_model=CompletionResponse,
             summary="Text completion; with stream=true, server-sent events of the same shape")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    if state.tracer is None:
        return await create_completion(state, body, request)
    return await state.tracer.serve(request, lambda span: create_completion(state, body, request, span))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             summary="Chat completion; with stream=true, server-sent chat.completion.chunk events")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    if state.tracer is None:
        return await create_chat_completion(state, body, request)
    return await state.tracer.serve(request, lambda span: create_chat_completion(state, body, request, span))


@router.post("/v1/completions/render", response_model=list[RenderedRequest],
             summary="The token ids each prompt would run with, as vLLM renders them; nothing is generated")
async def completions_render(body: CompletionRequest, request: Request) -> Response:
    rendered = await render_completion(_loaded_state(request, body.model), body)
    return JSONResponse([r.model_dump(mode="json") for r in rendered])


@router.post("/v1/chat/completions/render", response_model=RenderedRequest,
             summary="The chat-templated prompt and its token ids, as vLLM renders them; nothing is generated")
async def chat_completions_render(body: ChatCompletionRequest, request: Request) -> Response:
    rendered = await render_chat_completion(_loaded_state(request, body.model), body)
    return Response(rendered.model_dump_json(), media_type="application/json")


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = _loaded_state(request, body.model)
    tokenizer = state.tokenizer
    if body.messages is not None:
        _, tokens = await state.run_tokenizer(chat_prompt, tokenizer, body.messages, body.add_generation_prompt)
    else:
        tokens = await state.run_tokenizer(tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = _loaded_state(request, body.model)
    vocab_size = state.vocab_size
    if any(not 0 <= token_id < vocab_size for token_id in body.tokens):
        raise APIError(400, f"tokens must be token ids in [0, {vocab_size})", param="tokens")
    return DetokenizeResponse(prompt=await state.run_tokenizer(state.tokenizer.decode, body.tokens))
