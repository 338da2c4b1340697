"""A tiny Qwen3-MoE model served over HTTP, driven by the official `openai`
client: completions, chat and streaming match the offline engine."""

from __future__ import annotations

import openai
import pytest
from conftest import build_tiny_model
from server_fixtures import start_server

pytestmark = pytest.mark.slow

# The tiny byte-level tokenizer has no chat template; a plain one is enough to route chat through it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MESSAGES = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("served") / "tiny-qwen3-moe"
    build_tiny_model("qwen3_moe", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def client(moe_folder):
    server = start_server("--model", str(moe_folder), "--max-model-len", "256", "--num-kv-blocks", "64")
    yield openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    server.stop()


@pytest.fixture(scope="module")
def llm(moe_folder):
    from inference import LLM

    return LLM(model=str(moe_folder), dtype="float32", max_model_len=256, num_kv_blocks=64)


def test_models_lists_the_moe_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-qwen3-moe"]


def test_completions_match_offline_generate(client, llm):
    from inference import SamplingParams

    prompts = ["The capital of France is", "Once upon a time"]
    expected = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, offline in zip(prompts, expected):
        response = client.completions.create(model="tiny-qwen3-moe", prompt=prompt, max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert response.choices[0].text == offline.outputs[0].text
        assert response.usage.completion_tokens == 12


def test_chat_and_streaming_match_offline_generate(client, llm):
    from inference import SamplingParams

    prompt_ids = llm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
    [offline] = llm.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                             use_tqdm=False)
    kwargs = dict(model="tiny-qwen3-moe", messages=MESSAGES, max_tokens=10, temperature=0,
                  extra_body={"ignore_eos": True})
    response = client.chat.completions.create(**kwargs)
    assert response.choices[0].message.content == offline.outputs[0].text
    assert response.usage.prompt_tokens == len(prompt_ids)
    stream = client.chat.completions.create(stream=True, **kwargs)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == offline.outputs[0].text
