"""Tracing's start-up checks, and its absence when off; no model is loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server_fixtures import REPO


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run([sys.executable, "-m", "server.cli", "serve", "--port", "1", *args], cwd=REPO,
                          env={**clean, **(env or {})}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("url", ["not a url", "ftp://collector:4317", "http://:4317", "http://collector:99999",
                                 "http://collector"])
def test_a_bad_endpoint_stops_serve(url: str):
    done = serve("--otlp-traces-endpoint", url)
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("pagedinfer serve: error: argument --otlp-traces-endpoint: "), line
    assert repr(url) in line


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"])
def test_an_unknown_protocol_stops_serve(variable: str):
    done = serve("--otlp-traces-endpoint", "http://collector:4317", env={variable: "carrier-pigeon"})
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert "'carrier-pigeon'" in line and "grpc, http/protobuf" in line, line


def test_the_variable_alone_is_checked_too():
    done = serve(env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "collector:4317"})
    assert done.returncode == 2
    assert "argument --otlp-traces-endpoint: the OTLP traces endpoint 'collector:4317'" in done.stderr


def test_tracing_off_imports_no_opentelemetry_sdk():
    """The whole app, with its routes and metrics, built without tracing:
    neither the SDK nor an exporter (with grpcio) is loaded. (FastAPI itself
    imports the `opentelemetry` API package, whose default does nothing.)"""
    code = (
        "import sys\n"
        "from server.api_server import server_settings\n"
        "from server.app import create_app\n"
        "from server.cli import build_parser, check_args\n"
        "args = build_parser().parse_args(['serve', '--served-model-name', 'm'])\n"
        "assert check_args(args) is None\n"
        "app = create_app(server_settings(args), lambda: None)\n"
        "assert app.state.server.tracer is None\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter', 'grpc'))"
        " or m in ('server.tracing', 'server.request_span')))\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("lora", [None, "sql-adapter"])
def test_a_lora_request_names_its_adapter_in_the_span(lora):
    """The span's response model is what the response says: the adapter's name for a LoRA request."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from inference.sampling_params import SamplingParams
    from server.request_span import RequestSpan

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = RequestSpan(provider.get_tracer("test").start_span("llm_request"), "base-model", {})
    span.added("cmpl-1", ["cmpl-1-0"], SamplingParams(max_tokens=4), lora)
    span.end()
    [finished] = exporter.get_finished_spans()
    assert finished.attributes["gen_ai.response.model"] == (lora or "base-model")
    assert finished.attributes.get("pagedinfer.lora.name") == lora
    assert finished.attributes["gen_ai.request.max_tokens"] == 4
