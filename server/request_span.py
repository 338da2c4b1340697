"""The trace span of one completion request, with vLLM's attribute names.

`RequestTracer` (server/tracing.py) opens it when the request arrives; the
serving code tells it the request's id and parameters when it hands the
prompts to the engine (`added`), and its streams pass every output through
it (`wrap`). It ends once: when the whole response is built, when the last
stream chunk is sent, when the request fails (status error, `error.type`
the OpenAI error type), or when the client goes away (status error and an
`abort` event). Its attributes hold counts, parameters and latencies only,
never prompt or output text.

Latencies come from the engine's own timestamps (one monotonic clock for
both processes): queue time, time to first token and end to end from the
request's arrival, and the core's forward-pass seconds while prefilling and
decoding (the largest over the request's prompts). Usage is computed as
the response's `usage` is, so the two are equal.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Span, Status, StatusCode, format_trace_id

from inference.outputs import RequestOutput
from inference.request_stream import EngineDeadError, RequestFailedError, RequestStream
from inference.sampling_params import SamplingParams
from server.errors import error_type
from server.protocol import Usage

CLIENT_CLOSED = 499  # the status the server gives a request whose client went away


@dataclass(slots=True)
class RequestSpan:
    span: Span
    model_name: str
    trace_ids: dict[str, str]  # engine request id -> trace id, shared with the metrics' exemplars
    request_id: str | None = None
    params: SamplingParams | None = None
    lora: str | None = None  # the LoRA adapter the request asked for by its `model`
    engine_request_ids: list[str] = field(default_factory=list)
    latest: dict[int, RequestOutput] = field(default_factory=dict)  # by prompt index
    failure: str | None = None  # why the engine failed the request
    ended: bool = False

    def added(self, request_id: str, engine_request_ids: list[str], params: SamplingParams,
              lora: str | None) -> None:
        """The request's prompts went to the engine under these ids (with adapter `lora`)."""
        self.request_id = request_id
        self.params = params
        self.lora = lora
        context = self.span.get_span_context()
        if not context.trace_flags.sampled:
            return  # never exported: an exemplar naming its trace would lead nowhere
        self.engine_request_ids = engine_request_ids
        trace_id = format_trace_id(context.trace_id)
        for engine_request_id in engine_request_ids:
            self.trace_ids[engine_request_id] = trace_id

    def wrap(self, index: int, stream: RequestStream) -> TracedStream:
        return TracedStream(stream, self, index)

    def fail(self, status_code: int, message: str) -> None:
        if status_code == CLIENT_CLOSED:
            self.abort()
            return
        self.span.set_attribute("error.type", error_type(status_code))
        self.span.set_attribute("http.response.status_code", status_code)
        self._end(Status(StatusCode.ERROR, message))

    def abort(self) -> None:
        """The client went away before the response was complete."""
        self.span.add_event("abort", {"reason": "client disconnected"})
        self._end(Status(StatusCode.ERROR, "client disconnected"))

    def end(self) -> None:
        """The response was sent whole; a stream may still have carried an engine failure."""
        if self.failure is not None:
            self.span.set_attribute("error.type", error_type(500))
            self._end(Status(StatusCode.ERROR, self.failure))
        else:
            self._end(Status(StatusCode.OK))

    async def until_streamed(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The response's chunks; ends the span after the last or on a disconnect."""
        try:
            async for chunk in chunks:
                yield chunk
        except BaseException:  # the client went away: cancelled, or closed at a yield
            self.abort()
            raise
        self.end()

    def _end(self, status: Status) -> None:
        if self.ended:
            return
        self.ended = True
        for engine_request_id in self.engine_request_ids:
            self.trace_ids.pop(engine_request_id, None)
        self.span.set_attributes(self._attributes())
        self.span.set_status(status)
        self.span.end()

    def _attributes(self) -> dict[str, Any]:
        # The response's `model`: the adapter's name for a LoRA request, as the response says.
        attributes: dict[str, Any] = {"gen_ai.response.model": self.lora or self.model_name}
        if self.lora is not None:
            attributes["pagedinfer.lora.name"] = self.lora
        if self.request_id is not None:
            attributes["gen_ai.request.id"] = self.request_id
        params = self.params
        if params is not None:
            attributes.update({
                "gen_ai.request.temperature": params.temperature,
                "gen_ai.request.top_p": params.top_p,
                "gen_ai.request.n": params.n,
            })
            if params.max_tokens is not None:
                attributes["gen_ai.request.max_tokens"] = params.max_tokens
        outputs = [self.latest[i] for i in sorted(self.latest)]
        if not outputs:
            return attributes
        counts = Usage.of(outputs)
        attributes.update({
            "gen_ai.usage.prompt_tokens": counts.prompt_tokens,
            "gen_ai.usage.completion_tokens": counts.completion_tokens,
            "pagedinfer.usage.num_cached_tokens": counts.prompt_tokens_details.cached_tokens,
            "gen_ai.response.finish_reasons": [c.finish_reason or "abort" for o in outputs for c in o.outputs],
        })
        times = [o.metrics for o in outputs if o.metrics is not None]
        if not times:
            return attributes
        arrival = min(t.arrival_time for t in times)
        scheduled = [t.first_scheduled_time for t in times if t.first_scheduled_time is not None]
        first_tokens = [t.first_token_time for t in times if t.first_token_time is not None]
        now = time.monotonic()  # the end of a request cut short
        attributes["gen_ai.latency.e2e"] = max(t.finished_time or now for t in times) - arrival
        if scheduled:
            attributes["gen_ai.latency.time_in_queue"] = min(scheduled) - arrival
        if first_tokens:
            attributes["gen_ai.latency.time_to_first_token"] = min(first_tokens) - arrival
        prefill = max(t.prefill_time for t in times)
        decode = max(t.decode_time for t in times)
        attributes.update({
            "gen_ai.latency.time_in_model_prefill": prefill,
            "gen_ai.latency.time_in_model_decode": decode,
            "gen_ai.latency.time_in_model_inference": prefill + decode,
            "pagedinfer.num_preemptions": max(t.num_preemptions for t in times),
        })
        return attributes


class TracedStream:
    """A RequestStream whose outputs the span sees on their way to the caller."""

    __slots__ = ("stream", "span", "index")

    def __init__(self, stream: RequestStream, span: RequestSpan, index: int) -> None:
        self.stream = stream
        self.span = span
        self.index = index

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            async for output in self.stream:
                self.span.latest[self.index] = output
                yield output
        except (RequestFailedError, EngineDeadError) as exc:
            self.span.failure = f"Generation failed: {exc}"
            raise

    def abort(self) -> None:
        self.stream.abort()
