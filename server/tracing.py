"""OpenTelemetry tracing: one span per completion request, exported over OTLP.

Tracing is on when `serve --otlp-traces-endpoint URL` is given or the
standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT
variable is set (see server/tracing_config.py, which also holds the
start-up checks that stop `serve` with exit code 2); otherwise this module
is never imported and neither the OpenTelemetry SDK nor an exporter is loaded.
A flag URL without a path gets the collector's `/v1/traces` under
http/protobuf, as the SDK does for OTEL_EXPORTER_OTLP_ENDPOINT.

The SDK does the rest as it does for any program: OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES make the resource, OTEL_TRACES_SAMPLER(_ARG) the
sampler, OTEL_BSP_* the batch processor, OTEL_EXPORTER_OTLP_TRACES_* the
exporter. OTEL_EXPORTER_OTLP_TRACES_PROTOCOL picks `grpc` (the default, as
vLLM's) or `http/protobuf`.

Spans end on the event loop and go to a BatchSpanProcessor, whose own
thread exports them: a collector that is down or slow costs a request
nothing. Spans that cannot be delivered (the exporter gave up on their
batch) are dropped and counted in `pagedinfer_trace_spans_dropped_total`,
with one warning per outage.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from urllib.parse import urlsplit

from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.errors import APIError
from server.request_span import RequestSpan
from server.tracing_config import otlp_protocol

logger = logging.getLogger(__name__)

SPAN_NAME = "llm_request"  # vLLM's name for its per-request span
_PROPAGATOR = TraceContextTextMapPropagator()
_HEADERS = DefaultGetter()


def _exporter(endpoint: str | None) -> SpanExporter:
    """The protocol's OTLP exporter; without `endpoint` the SDK reads the OTEL_* variables."""
    # Imported by protocol: each brings its own transport (grpcio, requests).
    if otlp_protocol() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if endpoint is not None and urlsplit(endpoint).path in ("", "/"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint)


class CountingExporter(SpanExporter):
    """Counts the spans of the batches the wrapped exporter failed to deliver."""

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter
        self.num_dropped = 0  # written by the processor's thread only
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.exporter.export(spans)
        if result is SpanExportResult.SUCCESS:
            self._failing = False
        else:
            self.num_dropped += len(spans)
            if not self._failing:
                logger.warning("the trace collector did not take %d span(s); spans are dropped (and counted in "
                               "pagedinfer_trace_spans_dropped_total) until it does", len(spans))
            self._failing = True
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class RequestTracer(Collector):
    """The server's tracer; also a Prometheus collector of its dropped spans.
    `endpoint` is the flag's URL, None to let the SDK read the variables.

    `trace_ids` maps engine request ids to the hex trace id of their span
    while they run; the metrics read it to put exemplars on histograms."""

    def __init__(self, endpoint: str | None, model_name: str, trace_ids: dict[str, str]) -> None:
        self.model_name = model_name
        self.trace_ids = trace_ids
        self.exporter = CountingExporter(_exporter(endpoint))
        # The OTLP exporters log every failed batch (and every retry): with the
        # collector down that floods the log. CountingExporter says it once.
        logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)
        # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES;
        # without them the service is called "pagedinfer".
        resource = Resource({"service.name": "pagedinfer"}).merge(Resource.create())
        self.provider = TracerProvider(resource=resource)  # its sampler comes from OTEL_TRACES_SAMPLER
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("pagedinfer")

    def start(self, request: Request) -> RequestSpan:
        """A span for this HTTP request, a child of the caller's W3C trace
        context when its headers carry a valid one (else a new trace)."""
        context = _PROPAGATOR.extract(request.headers, getter=_HEADERS)
        span = self.tracer.start_span(SPAN_NAME, context=context, kind=SpanKind.SERVER)
        request_id = request.headers.get("x-request-id")
        if request_id is not None:
            span.set_attribute("http.request.header.x-request-id", [request_id])
        return RequestSpan(span, self.model_name, self.trace_ids)

    async def serve(self, request: Request, handler: Callable[[RequestSpan], Awaitable[Response]]) -> Response:
        """`handler`'s response to `request`, inside the request's span."""
        span = self.start(request)
        try:
            response = await handler(span)
        except APIError as exc:
            span.fail(exc.status_code, exc.message)
            raise
        except BaseException as exc:  # a bug's 500, or the server cancelling the request
            span.fail(500, repr(exc))
            raise
        if isinstance(response, StreamingResponse):
            response.body_iterator = span.until_streamed(response.body_iterator)
        else:
            span.end()
        return response

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout), then stop."""
        self.provider.shutdown()

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("pagedinfer_trace_spans_dropped",
                                     "Trace spans dropped because the collector did not take them",
                                     labels=["model_name"])
        family.add_metric([self.model_name], float(self.exporter.num_dropped))
        yield family

