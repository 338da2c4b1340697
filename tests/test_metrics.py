"""GET /metrics of a real server under a known workload.

The counters must match the responses' `usage` exactly and every histogram
must hold exactly one observation per request (per non-first token for the
inter-token latency). `promtool check metrics` must accept the text, and
`--metrics-compat vllm` must add vLLM's names with the same values.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_tools import check_metrics
from server_fixtures import start_server

pytestmark = pytest.mark.slow

MODEL = "metrics-test-model"
SERVER_ARGS = ("--served-model-name", MODEL, "--max-model-len", "256", "--num-kv-blocks", "64",
               "--max-num-seqs", "4")
# Four full 16-token blocks or more (one token a byte on the tiny model's tokenizer),
# so the second request with it hits the prefix cache.
SHARED_PROMPT = ("The quick brown fox jumps over the lazy dog while the cat watches from the warm "
                 "windowsill, and the farmer counts his sheep one by one before the sun goes down "
                 "behind the hills.")
PAIRS = {  # vLLM name -> ours, written out rather than read from server.metrics
    "vllm:num_requests_running": "pagedinfer_num_requests_running",
    "vllm:num_requests_waiting": "pagedinfer_num_requests_waiting",
    "vllm:kv_cache_usage_perc": "pagedinfer_kv_cache_usage_ratio",
    "vllm:prompt_tokens_total": "pagedinfer_prompt_tokens_total",
    "vllm:generation_tokens_total": "pagedinfer_generation_tokens_total",
    "vllm:num_preemptions_total": "pagedinfer_num_preemptions_total",
    "vllm:request_success_total": "pagedinfer_request_success_total",
    "vllm:time_to_first_token_seconds": "pagedinfer_time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds": "pagedinfer_inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds": "pagedinfer_e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds": "pagedinfer_request_queue_time_seconds",
    "vllm:prefix_cache_queries_total": "pagedinfer_prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total": "pagedinfer_prefix_cache_hits_total",
}
HISTOGRAMS = [name for name in PAIRS.values() if name.endswith("_seconds")]


@pytest.fixture(scope="module")
def servers(tiny_llama_chat_dir):
    """(plain server, server with --metrics-compat vllm), started side by side.
    What is counted does not depend on the model: the tiny one starts fastest."""
    args = ("--model", str(tiny_llama_chat_dir), *SERVER_ARGS)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_server, *args), pool.submit(start_server, *args, "--metrics-compat", "vllm")]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        for future in futures:
            future.result()  # re-raise a start-up failure
        yield tuple(started)
    finally:
        for server in started:
            server.stop()


def scrape(server) -> tuple[str, dict[tuple[str, frozenset], float]]:
    """The /metrics text and its samples by (name, labels)."""
    with server.client() as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    return response.text, samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset({"model_name": MODEL, **labels}.items()))]


def _post(client, path: str, body: dict) -> dict:
    response = client.post(path, json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _stream(client, body: dict) -> dict:
    """A streamed completion, folded into {"usage", "finish_reasons"}."""
    usage, reasons = None, []
    body = {"model": MODEL, **body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                usage = chunk.get("usage") or usage
                reasons += [c["finish_reason"] for c in chunk["choices"] if c.get("finish_reason")]
    return {"usage": usage, "choices": [{"finish_reason": r} for r in reasons]}


def run_workload(server) -> list[dict]:
    """Eight requests (nine completions): plain, stop string, streamed, chat, n=2, three at once."""
    with server.client() as client:
        first = _post(client, "/v1/completions", {"prompt": SHARED_PROMPT, "max_tokens": 8,
                                                  "temperature": 0, "ignore_eos": True})
        text = first["choices"][0]["text"]
        # Greedy again, stopping halfway through the first answer: finish_reason "stop".
        stopped = _post(client, "/v1/completions", {"prompt": SHARED_PROMPT, "max_tokens": 16,
                                                    "temperature": 0, "stop": [text[len(text) // 2:]]})
        streamed = _stream(client, {"prompt": "Once upon a time", "max_tokens": 6, "ignore_eos": True})
        chat = _post(client, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 5, "ignore_eos": True})
        two = _post(client, "/v1/completions", {"prompt": "Two roads diverged", "n": 2, "max_tokens": 4,
                                                "temperature": 0.8, "seed": 7, "ignore_eos": True})
        with ThreadPoolExecutor(3) as pool:
            batch = list(pool.map(
                lambda k: _post(client, "/v1/completions", {"prompt": f"Item {k}:", "max_tokens": k,
                                                            "ignore_eos": True}),
                (3, 5, 7),
            ))
    responses = [first, stopped, streamed, chat, two, *batch]
    assert stopped["choices"][0]["finish_reason"] == "stop", stopped
    assert stopped["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert two["usage"]["completion_tokens"] == 8
    return responses


def test_counters_and_histograms_match_the_workload(servers):
    server, _ = servers
    responses = run_workload(server)
    text, samples = scrape(server)

    num_requests = len(responses)
    reasons = [c["finish_reason"] for r in responses for c in r["choices"]]
    prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in responses)
    generated = sum(r["usage"]["completion_tokens"] for r in responses)
    assert (num_requests, len(reasons)) == (8, 9)

    assert value(samples, "pagedinfer_prompt_tokens_total") == prompt_tokens
    assert value(samples, "pagedinfer_generation_tokens_total") == generated
    for reason in ("stop", "length", "abort"):
        assert value(samples, "pagedinfer_request_success_total", finished_reason=reason) == reasons.count(reason)
    expected_counts = {
        "pagedinfer_time_to_first_token_seconds": num_requests,
        "pagedinfer_e2e_request_latency_seconds": num_requests,
        "pagedinfer_request_queue_time_seconds": num_requests,
        # every token but the first of each completion
        "pagedinfer_inter_token_latency_seconds": generated - len(reasons),
    }
    for name, count in expected_counts.items():
        assert value(samples, f"{name}_count") == count, name
        assert value(samples, f"{name}_bucket", le="+Inf") == count, name
        buckets = sorted((float(dict(labels)["le"]), v) for (n, labels), v in samples.items()
                         if n == f"{name}_bucket")
        assert [v for _, v in buckets] == sorted(v for _, v in buckets), f"{name} buckets not cumulative"
        assert value(samples, f"{name}_sum") > 0, name
    ttft_sum = value(samples, "pagedinfer_time_to_first_token_seconds_sum")
    assert value(samples, "pagedinfer_request_queue_time_seconds_sum") < ttft_sum
    assert ttft_sum < value(samples, "pagedinfer_e2e_request_latency_seconds_sum")

    hits = value(samples, "pagedinfer_prefix_cache_hits_total")
    assert 0 < hits <= value(samples, "pagedinfer_prefix_cache_queries_total")
    assert value(samples, "pagedinfer_num_preemptions_total") == 0
    # idle again: nothing running, waiting or holding KV blocks
    for name in ("pagedinfer_num_requests_running", "pagedinfer_num_requests_waiting",
                 "pagedinfer_kv_cache_usage_ratio", "pagedinfer_kv_cache_waste_ratio"):
        assert value(samples, name) == 0, name
    assert value(samples, "pagedinfer_ready") == 1

    assert all(dict(labels).get("model_name") == MODEL for _, labels in samples), "a series lacks model_name"
    assert "vllm:" not in text
    assert check_metrics(text) == []


def test_vllm_compat_names_carry_the_same_values(servers):
    _, compat = servers
    with compat.client() as client:
        for max_tokens in (2, 4):
            _post(client, "/v1/completions", {"prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True})
    text, samples = scrape(compat)

    for vllm_name, ours in PAIRS.items():
        suffixes = ("_bucket", "_count", "_sum") if ours in HISTOGRAMS else ("",)
        for suffix in suffixes:
            theirs = {labels: v for (n, labels), v in samples.items() if n == vllm_name + suffix}
            mine = {labels: v for (n, labels), v in samples.items() if n == ours + suffix}
            assert theirs, f"{vllm_name}{suffix} missing"
            assert theirs == mine, vllm_name + suffix
    assert value(samples, "vllm:generation_tokens_total") == 6
    assert value(samples, "vllm:e2e_request_latency_seconds_count") == 2
    # promtool lints the ':' in vLLM's names and nothing else
    problems = check_metrics(text)
    assert problems and all(p.startswith("vllm:") and "should not contain ':'" in p for p in problems), problems
