"""Multi-LoRA through the server and the official `openai` client: adapters
by `model`, /v1/models parents, runtime load and unload, and the errors."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer
from conftest import build_tiny_model
from lora_fixtures import build_adapter, build_adapters, peft_greedy
from server_fixtures import API_KEY, start_server

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-server")
    base = root / "base"
    build_tiny_model("llama", base)
    adapters = build_adapters(base, root)
    chat = json.dumps({"name": "chat", "path": str(adapters["chat"]), "base_model_name": "tiny-base"})
    server = start_server(
        "--model", str(base), "--served-model-name", "tiny", "--api-key", API_KEY,
        "--enable-lora", "--lora-modules", f"sql={adapters['sql']}", chat,
        "--max-loras", "2", "--max-cpu-loras", "2", "--max-lora-rank", "16",
        "--num-kv-blocks", "14", "--block-size", "8", "--max-num-batched-tokens", "32",
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
    )
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)
    yield root, base, adapters, server, client
    server.stop()


def _post(server, path: str, body: dict) -> httpx.Response:
    with server.client() as http:
        return http.post(path, json=body)


def test_models_list_adapters_under_their_parent(setup):
    _, _, adapters, _, client = setup
    cards = {m.id: m for m in client.models.list().data}
    assert {"tiny", "sql", "chat"} <= set(cards)
    assert cards["sql"].parent == "tiny" and cards["sql"].root == str(adapters["sql"])
    assert cards["chat"].parent == "tiny-base"
    assert getattr(cards["tiny"], "parent", None) is None


def test_mixed_adapters_in_one_batch_match_peft(setup):
    """Base, two start-up adapters and one loaded at runtime, concurrently,
    through two device slots; each continuation equals transformers + peft."""
    _, base, adapters, server, client = setup
    if "code" not in {m.id for m in client.models.list().data}:
        response = _post(server, "/v1/load_lora_adapter", {"lora_name": "code", "lora_path": str(adapters["code"])})
        assert response.status_code == 200, response.text
    gen = torch.Generator().manual_seed(11)
    models = ["tiny", "sql", "chat", "code"] * 2
    prompts = [torch.randint(0, 256, (10 + 4 * i,), generator=gen).tolist() for i in range(len(models))]

    def complete(i: int):
        return client.completions.create(model=models[i], prompt=prompts[i], max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(len(models)) as pool:
        responses = list(pool.map(complete, range(len(models))))
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = set()
    for model, prompt, response in zip(models, prompts, responses):
        [want] = peft_greedy(base, adapters.get(model), [prompt], MAX_TOKENS)
        assert response.model == model
        assert response.usage.completion_tokens == MAX_TOKENS
        # The streaming detokenizer holds back a trailing incomplete UTF-8 sequence.
        assert response.choices[0].text == tokenizer.decode(want).rstrip("\ufffd"), model
        texts.add(response.choices[0].text)
    assert len(texts) == len(models)


def test_unknown_adapter_is_404(setup):
    client = setup[4]
    with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)


@pytest.mark.parametrize("problem", ["missing", "corrupt", "rank", "dora", "duplicate"])
def test_bad_adapters_are_400_and_the_server_goes_on(setup, problem):
    root, base, adapters, server, client = setup
    path = root / f"bad-{problem}"
    if problem == "corrupt":
        build_adapter(base, path, 4, ["q_proj"])
        (path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    elif problem == "rank":
        build_adapter(base, path, 32, ["q_proj"])
    elif problem == "dora":
        build_adapter(base, path, 4, ["q_proj"], use_dora=True)
    name = "sql" if problem == "duplicate" else f"bad-{problem}"
    response = _post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert {"missing": "is not a folder", "corrupt": "cannot be read", "rank": "greater than max_lora_rank 16",
            "dora": "DoRA", "duplicate": "already been loaded"}[problem] in message
    assert name == "sql" or name not in {m.id for m in client.models.list().data}
    assert client.completions.create(model="sql", prompt="hi", max_tokens=2).choices[0].text is not None


def test_unload_waits_for_its_requests(setup):
    """409 while a request still runs on the adapter; unloaded after, then 404."""
    _, _, adapters, server, client = setup
    response = _post(server, "/v1/load_lora_adapter", {"lora_name": "temp", "lora_path": str(adapters["sql"])})
    assert response.status_code == 200, response.text
    stream = client.completions.create(model="temp", prompt="a long one", max_tokens=95, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # it runs
    busy = _post(server, "/v1/unload_lora_adapter", {"lora_name": "temp"})
    assert busy.status_code == 409, busy.text
    assert "still used" in busy.json()["error"]["message"]
    for _ in stream:
        pass
    done = _post(server, "/v1/unload_lora_adapter", {"lora_name": "temp"})
    assert done.status_code == 200, done.text
    assert "temp" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="temp", prompt="hi", max_tokens=2)
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "temp"}).status_code == 404


def test_runtime_updates_need_the_key(setup):
    server = setup[3]
    response = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
    assert response.status_code == 401


def test_lora_requests_info_metric(setup):
    """vLLM's gauge: a label set naming the running adapter with max_lora 2 (the
    front end records a step's stats before its tokens reach the client), and
    once the request is done, the newest label set names no adapter."""
    from prometheus_client.parser import text_string_to_metric_families

    server, client = setup[3], setup[4]

    def scrape() -> dict:
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        return {f.name: f for f in text_string_to_metric_families(text)}

    stream = client.completions.create(model="sql", prompt="a long one", max_tokens=40, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    during = scrape()
    for _ in stream:
        pass
    samples = during["vllm:lora_requests_info"].samples
    assert {tuple(sorted(s.labels)) for s in samples} == {("max_lora", "running_lora_adapters", "waiting_lora_adapters")}
    running = [s for s in samples if "sql" in s.labels["running_lora_adapters"].split(",")]
    assert running and all(s.labels["max_lora"] == "2" for s in running)
    assert all(abs(s.value - time.time()) < 120 for s in running)
    assert "pagedinfer_lora_num_requests_running" in during
    after = scrape()
    newest = max(after["vllm:lora_requests_info"].samples, key=lambda s: s.value)
    assert (newest.labels["running_lora_adapters"], newest.labels["waiting_lora_adapters"]) == ("", "")
    assert not [s for s in after["pagedinfer_lora_num_requests_running"].samples if s.value]
