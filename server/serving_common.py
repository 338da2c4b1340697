"""What /v1/completions and /v1/chat/completions share: admission, context
length checks, handing prompts to the engine, merging streams, SSE framing,
usage, and cancelling work when the client goes away.

Stream chunks are plain dicts encoded by msgspec, not pydantic models: they
are built once per token on the hot path. They mirror the response models in
server/protocol.py field for field (nullable fields present, omitted ones
absent), and tests/test_server_schema.py holds them to OpenAI's schemas."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec
from fastapi import Request

from inference.async_engine import AsyncLLM
from inference.request_stream import EngineDeadError, RequestFailedError, RequestStream
from inference.outputs import CompletionOutput, RequestOutput
from inference.sampling_params import SamplingParams, StructuredOutputsParams
from server.errors import APIError, bad_request, error_body
from server.protocol import SamplingRequest, Usage
from server.state import ServerState

logger = logging.getLogger(__name__)

T = TypeVar("T")

# ValueErrors from SamplingParams and the engine start with one of these names.
KNOWN_PARAMS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) | {"prompt", "logit_bias"}
SSE_DONE = b"data: [DONE]\n\n"
_json = msgspec.json.Encoder()


class Trace(Protocol):
    """What the serving code tells a request's trace span (server/request_span.py)."""

    def added(self, request_id: str, engine_request_ids: list[str], params: SamplingParams,
              lora: str | None) -> None: ...

    def wrap(self, index: int, stream: RequestStream) -> RequestStream: ...


def admit(state: ServerState, model: str | None) -> AsyncLLM:
    """The engine, if this request may use it now; else the matching error."""
    if state.draining:
        raise APIError(503, "The server is shutting down.", code="server_shutting_down")
    if state.engine is not None and not state.engine.is_alive:
        raise APIError(503, "The engine is not running.", code="engine_dead")
    if not state.ready:
        raise APIError(503, "The model is still loading; retry shortly.", code="model_loading",
                       headers={"Retry-After": "5"})
    check_model(state, model)
    engine = state.engine
    if engine.num_waiting >= state.settings.max_queued_requests:
        raise APIError(429, f"Too many waiting requests (limit {state.settings.max_queued_requests}); retry later.",
                       code="queue_full", headers={"Retry-After": "1"})
    return engine


def check_model(state: ServerState, model: str | None) -> None:
    """404 unless `model` is the served model or one of its LoRA adapters."""
    if model is not None and model != state.settings.served_model_name and lora_name(state.engine, model) is None:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def lora_name(engine: AsyncLLM | None, model: str | None) -> str | None:
    """The LoRA adapter a request's `model` names, or None for the base model."""
    return model if engine is not None and model in engine.lora.adapters else None


def response_model(state: ServerState, model: str | None) -> str:
    """The `model` a response reports: the adapter's name, or the served model's."""
    return lora_name(state.engine, model) or state.settings.served_model_name


def resolve_max_tokens(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, prompt_param: str) -> int:
    """max_tokens, defaulting to the room left; 400 if prompt and output cannot fit."""
    if num_prompt_tokens >= max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens, which leaves no room for output.",
            param=prompt_param, code="context_length_exceeded",
        )
    if max_tokens is None:
        return max_model_len - num_prompt_tokens
    if max_tokens >= 1 and num_prompt_tokens + max_tokens > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens and max_tokens is {max_tokens} ({num_prompt_tokens + max_tokens} in all).",
            param="max_tokens", code="context_length_exceeded",
        )
    return max_tokens  # values < 1 are reported by SamplingParams, naming max_tokens


def build_params(
    state: ServerState,
    request: SamplingRequest,
    *,
    num_prompt_tokens: int,
    max_tokens: int | None,
    prompt_param: str,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    structured_outputs: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """SamplingParams for one prompt; every problem becomes a 400 naming its parameter."""
    resolved = resolve_max_tokens(num_prompt_tokens, max_tokens, state.max_model_len, prompt_param)
    try:
        params = request.sampling_params(resolved, logprobs, prompt_logprobs, structured_outputs)
    except ValueError as exc:
        raise bad_request(exc, KNOWN_PARAMS) from exc
    # The sampler indexes logits with these ids, so they must be in the vocabulary.
    vocab_size = state.vocab_size
    for name, token_ids in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids)):
        if any(token_id >= vocab_size for token_id in token_ids):
            raise APIError(400, f"{name} holds token ids outside [0, {vocab_size})", param=name)
    return params


async def add_requests(
    engine: AsyncLLM,
    request_id: str,
    prompts: list[tuple[list[int], SamplingParams]],
    request: SamplingRequest,
    arrival_time: float,
    trace: Trace | None = None,
) -> list[RequestStream]:
    """Hand every prompt to the engine; all or none are added. With a
    trace, the streams pass their outputs through its span."""
    engine_request_ids = [f"{request_id}-{index}" for index in range(len(prompts))]
    lora = lora_name(engine, request.model)
    if trace is not None:  # before the adds: the first step's metrics look for the trace id
        trace.added(request_id, engine_request_ids, prompts[0][1], lora)
    streams: list[RequestStream] = []
    try:
        for engine_request_id, (token_ids, params) in zip(engine_request_ids, prompts):
            stream = await engine.add_request(
                engine_request_id, token_ids, params,
                priority=request.priority, arrival_time=arrival_time, cache_salt=request.cache_salt,
                lora_name=lora,
            )
            streams.append(stream if trace is None else trace.wrap(len(streams), stream))
    except BaseException as exc:
        for stream in streams:
            stream.abort()
        if isinstance(exc, ValueError):
            raise bad_request(exc, KNOWN_PARAMS) from exc
        if isinstance(exc, EngineDeadError):
            raise APIError(503, "The engine is not running.", code="engine_dead") from exc
        raise
    return streams


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from all streams as they come; aborts all on exit."""
    if len(streams) == 1:  # the common case, without a task and a queue hop per token
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            streams[0].abort()
        return
    merged: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                merged.put_nowait((index, output))
            merged.put_nowait((index, None))
        except Exception as exc:
            merged.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        num_open = len(streams)
        while num_open:
            index, item = await merged.get()
            if item is None:
                num_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


async def collect_final(streams: list[RequestStream]) -> list[RequestOutput]:
    """The finished output of every stream, in prompt order."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    try:
        async for index, output in merge_streams(streams):
            finals[index] = output
    except (RequestFailedError, EngineDeadError) as exc:
        raise APIError(500, f"Generation failed: {exc}", code="engine_error") from exc
    return [output for output in finals if output is not None]


def finish_reason(output: CompletionOutput) -> str | None:
    """OpenAI's finish reason; an engine-side abort is reported as an error,
    a grammar no token could continue as "stop" (see `stop_reason`)."""
    if output.finish_reason == "abort":
        raise RequestFailedError("the request was aborted by the server")
    return "stop" if output.finish_reason == "grammar" else output.finish_reason


def stop_reason(output: CompletionOutput) -> dict[str, str]:
    """vLLM's `stop_reason` field, sent only to say the grammar ended the output."""
    return {"stop_reason": "grammar"} if output.finish_reason == "grammar" else {}


@dataclass(slots=True)
class SampleDelta:
    index: int  # choice index: prompt index * n + sample index
    sample: CompletionOutput
    text: str  # text added since the last delta of this choice
    first_new_token: int  # where this delta's tokens start in sample.token_ids
    is_first: bool
    finish_reason: str | None


class StreamTracker:
    """Turns the engine's cumulative outputs into per-choice deltas; each
    choice reports its finish reason exactly once. A step that added tokens
    gives a delta even when they add no text yet (a special token skipped, a
    UTF-8 character still incomplete, a possible stop string held back), so
    clients see every token arrive, as vLLM streams them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.finals: dict[int, RequestOutput] = {}
        self._num_chars: dict[int, int] = {}
        self._num_tokens: dict[int, int] = {}
        self._finished: set[int] = set()

    def deltas(self, prompt_index: int, output: RequestOutput) -> list[SampleDelta]:
        if output.finished:
            self.finals[prompt_index] = output
        deltas = []
        for sample in output.outputs:
            index = prompt_index * self.n + sample.index
            if index in self._finished:
                continue
            num_chars = self._num_chars.get(index, 0)
            num_tokens = self._num_tokens.get(index, 0)
            reason = finish_reason(sample)
            text = sample.text[num_chars:]
            has_news = bool(text) or len(sample.token_ids) > num_tokens
            if not has_news and reason is None:
                continue
            deltas.append(SampleDelta(index, sample, text, num_tokens, index not in self._num_tokens, reason))
            self._num_chars[index] = len(sample.text)
            self._num_tokens[index] = len(sample.token_ids)
            if reason is not None:
                self._finished.add(index)
        return deltas

    def usage(self) -> Usage:
        return Usage.of([self.finals[i] for i in sorted(self.finals)])


async def sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Server-sent events; a failure mid-stream becomes an error event."""
    try:
        async for chunk in chunks:
            yield b"data: " + _json.encode(chunk) + b"\n\n"
    except (RequestFailedError, EngineDeadError) as exc:
        yield f"data: {json.dumps(error_body(500, f'Generation failed: {exc}', code='engine_error'))}\n\n".encode()
    yield SSE_DONE


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (and so aborting its engine requests) if the
    client disconnects first. Streaming responses get this from Starlette."""

    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait([work_task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
    if work_task.cancelled():
        logger.info("client disconnected; request cancelled")
        raise APIError(499, "Client closed the request.")
    return work_task.result()
