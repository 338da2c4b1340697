"""`pagedinfer serve --speculative-config`: greedy completions as the offline
engine without speculation gives them, the spec_decode counters on /metrics
(ours, and vLLM's names with --metrics-compat vllm) equal to the engine's
own totals, and structured output refused with a 400 in OpenAI's format; a
draft model served the same way."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import start_server

from bench.draft_models import write_draft_model
from inference import LLM, SamplingParams

pytestmark = pytest.mark.slow

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
PROMPTS = ["abcdefg abcdefg abcdefg abc", "the cat sat on the mat, the cat sat on the", "xyz"]


@pytest.fixture(scope="module")
def server(tiny_llama_chat_dir):
    server = start_server("--model", str(tiny_llama_chat_dir), "--max-model-len", "256", "--num-kv-blocks", "64",
                          "--speculative-config", json.dumps(NGRAM), "--metrics-compat", "vllm")
    yield server
    server.stop()


def spec_samples(base_url: str) -> dict[tuple[str, str | None], float]:
    """(sample name, position label) -> value, for the spec_decode series."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return {(s.name, s.labels.get("position")): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if "spec_decode" in s.name}


def test_greedy_completions_counters_and_structured_refusal(server, tiny_llama_chat_dir):
    with server.client() as client:
        texts = []
        for prompt in PROMPTS:
            reply = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0,
                                                         "logprobs": 2})
            assert reply.status_code == 200, reply.text
            choice = reply.json()["choices"][0]
            assert len(choice["logprobs"]["tokens"]) == reply.json()["usage"]["completion_tokens"]
            texts.append(choice["text"])
        refused = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 4, "guided_regex": "a+"})
        snapshot = client.get("/debug/kv").json()
    offline = LLM(model=str(tiny_llama_chat_dir), dtype="float32", max_model_len=256, num_kv_blocks=64)
    expected = offline.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    assert texts == [o.outputs[0].text for o in expected]

    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "structured_outputs"
    assert "speculative decoding" in error["message"]

    engine = snapshot["stats"]["spec_decode"]
    assert engine["num_accepted_tokens"] > 0
    samples = spec_samples(server.base_url)
    for prefix in ("pagedinfer_spec_decode", "vllm:spec_decode"):
        for field in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            assert samples[(f"{prefix}_{field}_total", None)] == engine[field], (prefix, field)
        per_pos = engine["num_accepted_tokens_per_pos"]
        name = f"{prefix}_num_accepted_tokens_per_pos_total"
        assert [samples[(name, str(p))] for p in range(len(per_pos))] == per_pos, prefix


def test_a_draft_model_serves_the_targets_greedy_text(tiny_llama_chat_dir, tmp_path):
    """`--speculative-config` with a draft model (the target's first layer): the completions are the
    target's own, and the draft did draft."""
    draft = write_draft_model(tiny_llama_chat_dir, tmp_path / "draft", layers=[0])
    config = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3}
    server = start_server("--model", str(tiny_llama_chat_dir), "--max-model-len", "256", "--num-kv-blocks", "64",
                          "--speculative-config", json.dumps(config))
    try:
        with server.client() as client:
            replies = [client.post("/v1/completions", json={"prompt": p, "max_tokens": 24, "temperature": 0})
                       for p in PROMPTS]
            engine = client.get("/debug/kv").json()["stats"]["spec_decode"]
    finally:
        server.stop()
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    offline = LLM(model=str(tiny_llama_chat_dir), dtype="float32", max_model_len=256, num_kv_blocks=64)
    expected = offline.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    assert [r.json()["choices"][0]["text"] for r in replies] == [o.outputs[0].text for o in expected]
    assert engine["num_accepted_tokens"] > 0
