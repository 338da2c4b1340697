"""Trace spans, checked in a real Jaeger (v1.75.0, built from tests/tools/jaeger).

A tiny-model server exports over OTLP/gRPC to Jaeger; each test sends
requests with a caller's W3C `traceparent` and reads the trace back through
Jaeger's query API: the span is the caller's span's child, its usage equals
the response's, its latencies are consistent. OTLP over HTTP, the OpenMetrics
exemplars and a dead collector are covered by their own servers.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys
import time

import httpx
import pytest

from jaeger_tools import Jaeger, span_tags, start_jaeger
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from server_fixtures import REPO, ServerProcess, free_port, sse_events, start_server

if str(REPO) not in sys.path:  # `bench` is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.slow
SERVICE = "pagedinfer-under-test"
SERVER_ARGS = ("--max-model-len", "1024", "--num-kv-blocks", "256", "--max-num-seqs", "8")
LATENCIES = ("gen_ai.latency.time_in_queue", "gen_ai.latency.time_to_first_token", "gen_ai.latency.e2e",
             "gen_ai.latency.time_in_model_prefill", "gen_ai.latency.time_in_model_decode")


@pytest.fixture(scope="module")
def jaeger():
    jaeger = start_jaeger()  # without Go, go_tool skips (fails on CI)
    yield jaeger
    jaeger.stop()


def _traced_server(model_dir, jaeger_endpoint: str, protocol: str = "grpc", env: dict[str, str] | None = None,
                   args: tuple[str, ...] = SERVER_ARGS) -> ServerProcess:
    return start_server("--model", str(model_dir), *args, "--otlp-traces-endpoint", jaeger_endpoint, env={
        "OTEL_SERVICE_NAME": SERVICE, "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": protocol, "OTEL_BSP_SCHEDULE_DELAY": "100", **(env or {}),
    })


@pytest.fixture(scope="module")
def server(tiny_llama_chat_dir, jaeger: Jaeger):
    server = _traced_server(tiny_llama_chat_dir, jaeger.otlp_grpc_endpoint)
    yield server
    server.stop()


def caller_context() -> tuple[str, str, dict[str, str]]:
    """(trace id, span id, headers) of a caller's span, as its tracer would send them."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, {"traceparent": f"00-{trace_id}-{span_id}-01", "tracestate": "caller=1"}


def request_span(jaeger: Jaeger, trace_id: str, parent_span_id: str) -> dict:
    """The server's span in the caller's trace, checked to be the caller's span's child."""
    trace = jaeger.trace(trace_id)
    [span] = trace["spans"]
    assert span["operationName"] == "llm_request"
    assert span["references"] == [{"refType": "CHILD_OF", "traceID": trace_id, "spanID": parent_span_id}]
    process = trace["processes"][span["processID"]]
    assert process["serviceName"] == SERVICE
    assert {"key": "deployment.environment.name", "type": "string", "value": "test"} in process["tags"]
    return span


def check_span(span: dict, response: dict, *, n: int, max_tokens: int) -> dict:
    """The span's attributes, checked against the response (a stream's last chunk, with usage)."""
    tags = span_tags(span)
    usage = response["usage"]
    assert tags["otel.status_code"] == "OK"
    assert tags["gen_ai.request.id"] == response["id"]
    assert tags["gen_ai.response.model"] == response["model"]
    assert tags["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert tags["gen_ai.usage.completion_tokens"] == usage["completion_tokens"]
    assert tags["pagedinfer.usage.num_cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert tags["gen_ai.request.n"] == n and tags["gen_ai.request.max_tokens"] == max_tokens
    assert tags["gen_ai.request.temperature"] == 0.0 and tags["gen_ai.request.top_p"] == 1.0
    assert all(tags[name] > 0 for name in LATENCIES), {name: tags[name] for name in LATENCIES}
    assert tags["gen_ai.latency.time_in_queue"] <= tags["gen_ai.latency.time_to_first_token"]
    assert tags["gen_ai.latency.time_to_first_token"] <= tags["gen_ai.latency.e2e"]
    inference = tags["gen_ai.latency.time_in_model_inference"]
    assert inference == pytest.approx(tags["gen_ai.latency.time_in_model_prefill"]
                                      + tags["gen_ai.latency.time_in_model_decode"])
    assert inference <= tags["gen_ai.latency.e2e"]
    assert tags["gen_ai.latency.e2e"] <= span["duration"] / 1e6 + 1e-5  # the span also covers tokenizing and replying
    assert tags["pagedinfer.num_preemptions"] == 0
    assert json.loads(tags["gen_ai.response.finish_reasons"]) == ["length"] * n
    return tags


def test_completion_is_a_child_of_the_callers_span(server: ServerProcess, jaeger: Jaeger):
    trace_id, span_id, headers = caller_context()
    prompt = "a prompt that must never reach a span"
    with server.client() as client:
        answer = client.post("/v1/completions", headers={**headers, "X-Request-Id": "req-42"}, json={
            "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    span = request_span(jaeger, trace_id, span_id)
    tags = check_span(span, body, n=1, max_tokens=12)
    assert json.loads(tags["http.request.header.x-request-id"]) == ["req-42"]
    texts = [prompt, body["choices"][0]["text"]]
    assert not any(text in json.dumps(span) for text in texts if text.strip()), "prompt or output text in the span"


def test_streamed_chat(server: ServerProcess, jaeger: Jaeger):
    trace_id, span_id, headers = caller_context()
    with server.client() as client:
        with client.stream("POST", "/v1/chat/completions", headers=headers, json={
            "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 9, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
        }) as answer:
            assert answer.status_code == 200
            events = sse_events(answer.iter_lines())
    check_span(request_span(jaeger, trace_id, span_id), events[-1], n=1, max_tokens=9)


def test_n2_completion(server: ServerProcess, jaeger: Jaeger):
    trace_id, span_id, headers = caller_context()
    with server.client() as client:
        answer = client.post("/v1/completions", headers=headers, json={
            "prompt": "two samples", "max_tokens": 7, "n": 2, "temperature": 0, "ignore_eos": True})
    assert answer.status_code == 200, answer.text
    check_span(request_span(jaeger, trace_id, span_id), answer.json(), n=2, max_tokens=7)


def _find_by_request_id(jaeger: Jaeger, request_id: str) -> dict:
    deadline = time.monotonic() + 20
    while True:
        found = httpx.get(f"{jaeger.query_url}/api/traces", timeout=5, params={
            "service": SERVICE, "tags": json.dumps({"gen_ai.request.id": request_id}), "lookback": "1h"}).json()
        if found["data"]:
            [trace] = found["data"]
            return trace
        assert time.monotonic() < deadline, f"no trace with gen_ai.request.id {request_id}"
        time.sleep(0.2)


def test_garbage_traceparent_starts_a_new_trace(server: ServerProcess, jaeger: Jaeger):
    with server.client() as client:
        answer = client.post("/v1/completions", headers={"traceparent": "00-zz-not-a-trace-01"},
                             json={"prompt": "hi", "max_tokens": 2})
    assert answer.status_code == 200, answer.text
    [span] = _find_by_request_id(jaeger, answer.json()["id"])["spans"]
    assert span["references"] == []  # a root span: the garbage was ignored


def test_error_and_disconnect_mark_the_span(server: ServerProcess, jaeger: Jaeger):
    trace_id, span_id, headers = caller_context()
    with server.client() as client:
        answer = client.post("/v1/completions", headers=headers, json={"prompt": "hi", "max_tokens": 5000})
    assert answer.status_code == 400
    tags = span_tags(request_span(jaeger, trace_id, span_id))
    assert tags["otel.status_code"] == "ERROR"
    assert tags["error.type"] == answer.json()["error"]["type"] == "invalid_request_error"

    trace_id, span_id, headers = caller_context()

    async def leave_early() -> None:
        async with server.async_client() as client:
            async with client.stream("POST", "/v1/completions", headers=headers, json={
                    "prompt": "long", "max_tokens": 1000, "ignore_eos": True, "stream": True}) as answer:
                async for line in answer.aiter_lines():
                    if line.startswith("data: "):
                        break  # the first chunk came: hang up

    asyncio.run(leave_early())
    span = request_span(jaeger, trace_id, span_id)
    tags = span_tags(span)
    assert tags["otel.status_code"] == "ERROR"
    assert "abort" in json.loads(tags["gen_ai.response.finish_reasons"])
    assert [field["value"] for log in span["logs"] for field in log["fields"] if field["key"] == "event"] == ["abort"]


def test_exemplars_name_traces_in_jaeger(server: ServerProcess, jaeger: Jaeger):
    trace_id, _, headers = caller_context()
    with server.client() as client:
        assert client.post("/v1/completions", headers=headers,
                           json={"prompt": "exemplar", "max_tokens": 4, "ignore_eos": True}).status_code == 200
        plain = client.get("/metrics").text
        openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert "trace_id" not in plain  # Prometheus' text format has no exemplars
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    exemplars: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(openmetrics.text):
        for sample in family.samples:
            if sample.exemplar is not None:
                exemplars.setdefault(family.name, set()).add(sample.exemplar.labels["trace_id"])
    for name in ("pagedinfer_time_to_first_token_seconds", "pagedinfer_inter_token_latency_seconds",
                 "pagedinfer_e2e_request_latency_seconds"):
        assert trace_id in exemplars.get(name, set()), f"{name}: {exemplars.get(name)}"
        for exemplar_trace_id in exemplars[name]:
            jaeger.trace(exemplar_trace_id)  # every exemplar leads to a trace Jaeger holds


def test_otlp_over_http_and_the_sampler_variables(tiny_llama_chat_dir, jaeger: Jaeger):
    """OTLP/HTTP, with a sampler that follows the caller and samples nothing else."""
    # No path in the URL: the server exports to the collector's /v1/traces.
    server = _traced_server(tiny_llama_chat_dir, jaeger.otlp_http_endpoint, protocol="http/protobuf", env={
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"})
    try:
        trace_id, span_id, headers = caller_context()
        body = {"prompt": "over http", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        with server.client() as client:
            unsampled = client.post("/v1/completions", json=body)
            answer = client.post("/v1/completions", headers=headers, json=body)
            openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text"}).text
        assert unsampled.status_code == 200 and answer.status_code == 200, answer.text
        check_span(request_span(jaeger, trace_id, span_id), answer.json(), n=1, max_tokens=3)
        # Exported in order: once the sampled span is in, the unsampled one would be too.
        found = httpx.get(f"{jaeger.query_url}/api/traces", timeout=5, params={
            "service": SERVICE, "tags": json.dumps({"gen_ai.request.id": unsampled.json()["id"]})}).json()
        assert found["data"] == []
        exemplar_trace_ids = set(re.findall(r'trace_id="([0-9a-f]{32})"', openmetrics))
        assert exemplar_trace_ids == {trace_id}  # none names the unsampled request's trace
    finally:
        server.stop()


def test_preemptions_reach_the_span(tiny_llama_chat_dir, jaeger: Jaeger):
    """Four requests of 8 blocks each in a 20-block cache: the scheduler must preempt."""
    server = _traced_server(tiny_llama_chat_dir, jaeger.otlp_grpc_endpoint,
                            args=("--max-model-len", "256", "--num-kv-blocks", "20", "--max-num-seqs", "4"))
    try:
        callers = [caller_context() for _ in range(4)]

        async def send_all() -> list[httpx.Response]:
            async with server.async_client() as client:
                return await asyncio.gather(*(client.post("/v1/completions", headers=headers, json={
                    "prompt": [7 + i] * 16, "max_tokens": 112, "ignore_eos": True}) for i, (_, _, headers) in
                    enumerate(callers)))

        answers = asyncio.run(send_all())
        assert [a.status_code for a in answers] == [200] * 4
        num_preemptions = server.metrics()["pagedinfer_num_preemptions_total"]
        assert num_preemptions > 0
        spans = [request_span(jaeger, trace_id, span_id) for trace_id, span_id, _ in callers]
        assert sum(span_tags(span)["pagedinfer.num_preemptions"] for span in spans) == num_preemptions
    finally:
        server.stop()


def test_a_lora_request_names_its_adapter(tiny_llama_chat_dir, jaeger: Jaeger, tmp_path):
    """Through the server: a request to an adapter's `model` gets a span naming the adapter (as its
    response does); the base model's span has no adapter."""
    from lora_fixtures import build_adapter

    adapter = build_adapter(tiny_llama_chat_dir, tmp_path / "sql", 4, ["q_proj", "v_proj"])
    server = _traced_server(tiny_llama_chat_dir, jaeger.otlp_grpc_endpoint,
                            args=(*SERVER_ARGS, "--enable-lora", "--lora-modules", f"sql={adapter}"))
    try:
        for model in ("sql", None):
            trace_id, span_id, headers = caller_context()
            body = {"prompt": "hello", "max_tokens": 4, "temperature": 0, **({"model": model} if model else {})}
            with server.client() as client:
                response = client.post("/v1/completions", headers=headers, json=body).json()
            tags = span_tags(request_span(jaeger, trace_id, span_id))
            assert tags["gen_ai.response.model"] == response["model"] == (model or response["model"])
            assert tags.get("pagedinfer.lora.name") == model
    finally:
        server.stop()


def test_a_dead_collector_costs_requests_nothing(tiny_llama_chat_dir):
    """Tracing turned on by the standard variable alone, to a collector that is not there."""
    dead = f"http://127.0.0.1:{free_port()}"
    server = start_server("--model", str(tiny_llama_chat_dir), *SERVER_ARGS, env={
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": dead, "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        "OTEL_BSP_SCHEDULE_DELAY": "100"})
    try:
        async def send_all() -> list[int]:
            limit = asyncio.Semaphore(16)
            async with server.async_client() as client:
                async def one(i: int) -> int:
                    async with limit:
                        answer = await client.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 2})
                        return answer.status_code
                return await asyncio.gather(*(one(i) for i in range(200)))

        started = time.monotonic()
        assert asyncio.run(send_all()) == [200] * 200
        assert time.monotonic() - started < 60
        deadline = time.monotonic() + 30
        while server.metrics().get("pagedinfer_trace_spans_dropped_total", 0) == 0:
            assert time.monotonic() < deadline, "no dropped span counted"
            time.sleep(0.5)
        lines = server.log_tail(10**6).splitlines()
        warnings = [line for line in lines if "opentelemetry" in line or "trace collector" in line]
        assert len(warnings) == 1 and "did not take" in warnings[0], warnings
    finally:
        server.stop()


def test_the_benchmark_traces_every_request(tmp_path):
    """bench/tracing.py end to end on a tiny run: its own Jaeger holds a trace per traced request."""
    from bench import tracing

    out = tmp_path / "tracing.json"
    assert tracing.main(["--repeats", "2", "--num-prompts", "4", "--input-len", "16", "--output-len", "4",
                         "--concurrency", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["traces_in_jaeger"] == 2 * (4 + 1)  # the warm-up request of each level too
    assert report["spans_dropped"] == 0
    for run in report["runs"]:
        assert run["failed"] == 0 and run["output_throughput"] > 0 and run["cpu_s_per_token"] > 0
