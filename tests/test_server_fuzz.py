"""Schemathesis fuzzes the generation endpoints from the app's own OpenAPI
document: whatever it sends, the server must not answer 5xx."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from server_fixtures import shared_server

pytestmark = pytest.mark.slow

FUZZED_PATHS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
# Generated output is what costs CPU time; valid requests get at most this many tokens.
MAX_TOKENS = 3
MAX_N = 2
MAX_EXAMPLES = 30  # per endpoint and mode (valid / invalid data)


@pytest.fixture(scope="module")
def api_schema():
    document = httpx.get(f"{shared_server().base_url}/openapi.json", timeout=30).json()
    return schemathesis.openapi.from_dict(document)


def _bound_cost(body: object) -> None:
    """Cap output length and n where the fuzzer chose large valid values or
    left them out (chat then defaults to the whole context); invalid values
    (negative, wrong type) go through untouched."""
    if not isinstance(body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None or (isinstance(value, int) and value > MAX_TOKENS):
            body[name] = MAX_TOKENS
    if isinstance(body.get("n"), int) and body["n"] > MAX_N:
        body["n"] = MAX_N
    if isinstance(body.get("min_tokens"), int) and body["min_tokens"] > MAX_TOKENS:
        body["min_tokens"] = MAX_TOKENS


# Hypothesis is driven directly: schemathesis' pytest plugin
# (`from_fixture`) does not run under pytest 9.
@pytest.mark.parametrize("mode", list(GenerationMode))
@pytest.mark.parametrize("path", FUZZED_PATHS)
def test_no_server_errors(api_schema, path, mode):
    server = shared_server()

    @given(case=api_schema[path]["POST"].as_strategy(mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    def check(case):
        _bound_cost(case.body)
        case.call_and_validate(base_url=server.base_url, headers=server.headers, checks=[not_a_server_error],
                               timeout=60)

    check()


def test_server_healthy_after_fuzzing():
    with shared_server().client() as client:
        assert client.get("/health").status_code == 200
        assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200
