"""The README's tracing screenshot: a request's trace in Jaeger's UI, headless Chromium.

    python -m bench.trace_screenshot --ui-assets PATH [--out server/static/tracing.png]

Starts Jaeger v1.75.0 (tests/tools/jaeger) with the jaeger-ui v1.75.0 build
at PATH (`npm ci && npm run build` in jaeger-ui's repository gives
packages/jaeger-ui/build: the Go module carries no UI), and `pagedinfer
serve` (the prepared SmolLM2) exporting to it. A caller of its own
(service `chat-frontend`) opens a span, sends a streamed chat request with
its W3C trace context, and ends; the page shows that trace with the
server's `llm_request` span opened on its attributes. Needs Debian's
chromium and chromedriver (`make browser`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the tests' Jaeger, browser and server helpers

from console_tools import save_screenshot, start_chromium, wait_for  # noqa: E402
from jaeger_tools import start_jaeger  # noqa: E402
from server_fixtures import start_server  # noqa: E402

SERVER_ARGS = ("--max-model-len", "1024", "--num-kv-blocks", "256", "--max-num-seqs", "8")


def call_as_a_client(server, jaeger) -> str:
    """One traced chat request from a caller with its own span; returns the trace id."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.propagate import inject
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind, format_trace_id, use_span

    provider = TracerProvider(resource=Resource({"service.name": "chat-frontend"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=jaeger.otlp_grpc_endpoint)))
    span = provider.get_tracer("chat-frontend").start_span("POST /ask", kind=SpanKind.CLIENT)
    with use_span(span, end_on_exit=True):
        headers = {"X-Request-Id": "ask-0001"}
        inject(headers)
        with server.client() as client:
            with client.stream("POST", "/v1/chat/completions", headers=headers, json={
                "messages": [{"role": "user", "content": "Name three uses of a paged KV cache."}],
                "max_tokens": 48, "stream": True, "stream_options": {"include_usage": True},
            }) as answer:
                for _ in answer.iter_lines():
                    pass
    provider.shutdown()
    return format_trace_id(span.get_span_context().trace_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ui-assets", type=Path, required=True, help="a built jaeger-ui (packages/jaeger-ui/build)")
    parser.add_argument("--out", type=Path, default=REPO / "server" / "static" / "tracing.png")
    args = parser.parse_args()
    jaeger = start_jaeger(ui_assets=args.ui_assets.resolve())
    server = start_server(*SERVER_ARGS, "--otlp-traces-endpoint", jaeger.otlp_grpc_endpoint,
                          env={"OTEL_SERVICE_NAME": "pagedinfer", "OTEL_BSP_SCHEDULE_DELAY": "100"})
    browser = start_chromium()
    try:
        with server.client() as client:  # a first request pays one-off warm-up costs; not this one's trace
            client.post("/v1/completions", json={"prompt": "warm up", "max_tokens": 8})
        trace_id = call_as_a_client(server, jaeger)
        jaeger.trace(trace_id, num_spans=2)
        browser.set_window_size(1440, 1000)
        browser.get(f"{jaeger.query_url}/trace/{trace_id}")
        rows = wait_for(lambda: [r for r in browser.find_elements("css selector", ".span-name")
                                 if "llm_request" in r.text], 30, "the server's span")
        rows[0].click()  # open its attributes
        tags = wait_for(lambda: browser.find_elements("css selector", ".AccordianKeyValues--header"), 10, "tags")
        tags[0].click()
        time.sleep(1)
        print(f"trace {trace_id}")
        save_screenshot(browser, args.out)
    finally:
        browser.quit()
        server.stop()
        jaeger.stop()


if __name__ == "__main__":
    main()
