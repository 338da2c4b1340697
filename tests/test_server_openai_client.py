"""The official `openai` client against a real server, and parity with the
offline `LLM.generate` on the same engine."""

from __future__ import annotations

import openai
import pytest
from server_fixtures import API_KEY, shared_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def client():
    server = shared_server()
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def llm():
    from inference import LLM

    return LLM(model=None, dtype="float32", max_model_len=256, num_kv_blocks=64)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_greedy_completions_match_offline_generate(client, llm):
    from inference import SamplingParams

    expected = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    for prompt, offline in zip(PROMPTS, expected):
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert response.choices[0].text == offline.outputs[0].text
        assert response.usage.prompt_tokens == len(offline.prompt_token_ids)
        assert response.usage.completion_tokens == len(offline.outputs[0].token_ids)


def test_greedy_chat_matches_offline_generate(client, llm):
    from inference import SamplingParams

    prompt_ids = llm.tokenizer.encode(
        llm.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    [offline] = llm.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == offline.outputs[0].text
    assert response.usage.prompt_tokens == len(prompt_ids)


def test_prompt_list_and_token_ids(client, llm):
    token_ids = llm.tokenizer.encode(PROMPTS[0])
    by_text = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=[token_ids], max_tokens=6, temperature=0)
    assert [c.index for c in by_text.choices] == [0, 1]
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_streaming_completion_with_usage(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0)
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_chat_with_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_streaming_chat_without_usage(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks)


def test_n2_completion_and_chat(client):
    completion = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, n=2, seed=7,
                                           extra_body={"ignore_eos": True})
    assert sorted(c.index for c in completion.choices) == [0, 1]
    assert completion.usage.completion_tokens == 16
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, n=2, seed=7)
    assert sorted(c.index for c in chat.choices) == [0, 1]
    streamed = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, n=2, stream=True))
    finished = [c.choices[0].index for c in streamed if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_seed_makes_sampling_repeatable(client):
    def sample():
        return client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=1.0, seed=1234)

    assert sample().choices[0].text == sample().choices[0].text


def test_completion_logprobs(client):
    response = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2,
                                         extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert "".join(logprobs.tokens) == response.choices[0].text
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert chosen <= 0 and 2 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(chosen, abs=1e-4)  # greedy: the chosen token is the best


def test_chat_logprobs(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert "".join(t.token for t in content) == response.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token
        assert bytes(token.bytes).decode() == token.token


def test_stop_string(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0)
    text = whole.choices[0].text
    stop = text.strip()[:3]
    stopped = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text
    assert text.startswith(stopped.choices[0].text)


def test_errors_raise_typed_exceptions(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")
    bad_key = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
