"""The engine end to end on the CPU, in float32, against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inference import LLM, SamplingParams

PASSAGE = (
    "The history of computing is longer than the history of computing hardware and modern computing "
    "technology and includes the history of methods intended for pen and paper or for chalk and slate, "
    "with or without the aid of tables. Digital computing is intimately tied to the representation of "
    "numbers. But long before abstractions like the number arose, there were mathematical concepts to "
    "serve the purposes of civilization. These concepts are implicit in concrete practices such as "
    "one-to-one correspondence, the basis of counting, comparison to a standard, used for measurement, "
    "and the 3-4-5 right triangle, a device for assuring a right angle. "
)


def mixed_prompts(tokenizer, count: int = 32) -> list[list[int]]:
    ids = tokenizer.encode(PASSAGE * 6, add_special_tokens=False)
    lengths = [5 + (i * 395) // (count - 1) for i in range(count)]  # 5 .. 400 tokens
    return [ids[(7 * i) % 50 : (7 * i) % 50 + n] for i, n in enumerate(lengths)]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def smollm2(smollm2_dir, hf_smollm2):
    llm = LLM(model=str(smollm2_dir), dtype="float32", kv_cache_memory=512 * 1024**2, max_num_batched_tokens=64)
    return llm, hf_smollm2


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_smollm2_mixed_batch_with_chunked_prefill_matches_transformers(smollm2):
    llm, hf = smollm2
    prompts = mixed_prompts(llm.tokenizer)
    together = llm.generate(prompts, GREEDY, use_tqdm=False)
    for i in range(0, 32, 4):  # 8 prompts against transformers, alone and batched
        expected = hf_greedy(hf, prompts[i], 12)
        [alone] = llm.generate([prompts[i]], GREEDY, use_tqdm=False)
        assert alone.outputs[0].token_ids == expected, f"prompt {i} alone"
        assert together[i].outputs[0].token_ids == expected, f"prompt {i} in the batch"
    stats = llm.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_tiny_models_mixed_batch_matches_transformers(tiny_model):
    _, folder, hf = tiny_model
    llm = LLM(model=str(folder), dtype="float32", num_kv_blocks=1024, max_num_batched_tokens=64)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (5 + (i * 395) // 31,), generator=gen).tolist() for i in range(32)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for i in range(0, 32, 4):
        assert outputs[i].outputs[0].token_ids == hf_greedy(hf, prompts[i], 16)


def float32_block_bytes(folder, block_size: int = 16) -> int:
    """One KV block's bytes, from config.json: K and V of every layer, float32."""
    config = json.loads((Path(folder) / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * block_size * config["num_key_value_heads"] * head_dim * 4


def test_kv_cache_memory_sizes_the_pool(tiny_llama_dir):
    per_block = float32_block_bytes(tiny_llama_dir)
    # 40 blocks and the scratch block that padding rows write to, and not quite one more.
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", kv_cache_memory=42 * per_block - 1)
    stats = llm.stats()
    assert stats.num_total_blocks == 40 and stats.kv_cache_bytes == 41 * per_block
    with pytest.raises(ValueError, match=f"budget {per_block} bytes holds no {per_block}-byte block besides"):
        LLM(model=str(tiny_llama_dir), dtype="float32", kv_cache_memory=per_block)


def test_preemption_under_a_small_pool_loses_nothing(tiny_llama_dir):
    folder = tiny_llama_dir
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (20 + 3 * i,), generator=gen).tolist() for i in range(16)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = LLM(model=str(folder), dtype="float32", num_kv_blocks=512, block_size=16)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    # The batch needs ~16 * 4 blocks at its peak; give it a quarter of that.
    tight = LLM(model=str(folder), dtype="float32", num_kv_blocks=16, block_size=16)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    stats = tight.stats()
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    assert stats.num_preemptions > 0
    assert stats.num_free_blocks == stats.num_total_blocks == 16


def test_kv_waste_is_at_most_the_last_block(tiny_llama_dir):
    folder = tiny_llama_dir
    llm = LLM(model=str(folder), dtype="float32", num_kv_blocks=512, block_size=16)
    engine = llm.engine
    gen = torch.Generator().manual_seed(4)
    for i in range(8):
        prompt = torch.randint(0, 256, (7 + 13 * i,), generator=gen).tolist()
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        running = engine.scheduler.running
        # Each request holds the blocks its cached tokens need and no more: only its last block has empty slots.
        for request in running:
            assert len(request.block_table) == -(-request.num_computed_tokens // 16), request.request_id
        allocated = sum(len(r.block_table) * 16 for r in running)
        filled = sum(r.num_computed_tokens for r in running)
        assert engine.stats().kv_waste_ratio == ((allocated - filled) / allocated if allocated else 0.0)
        checked += len(running)
    assert checked == 8 * 39  # each request after each step but its last (its prompt, then 39 decodes)


def test_logprobs_match_transformers(smollm2):
    llm, hf = smollm2
    prompt = llm.tokenizer.encode("The capital of France is")
    [out] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, logprobs=5), use_tqdm=False)
    tokens = out.outputs[0].token_ids
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + tokens])).logits[0].float()
    ref = logits.log_softmax(-1)[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    for pos, (token, entry) in enumerate(zip(tokens, out.outputs[0].logprobs)):
        assert abs(entry[token].logprob - ref[pos, token].item()) < 1e-4
        assert entry[token].rank == 1
        top = ref[pos].topk(5)
        for t, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(entry[t].logprob - lp) < 1e-4


def test_n_samples_and_seeds(smollm2):
    llm, _ = smollm2
    params = SamplingParams(temperature=1.0, n=3, max_tokens=8, seed=123, ignore_eos=True)
    [a] = llm.generate(["Tell me a story"], params, use_tqdm=False)
    [b] = llm.generate(["Tell me a story", "Another prompt to share the batch"], params, use_tqdm=False)[:1]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    assert llm.stats().num_free_blocks == llm.stats().num_total_blocks


def test_finish_reasons_and_stop_strings(smollm2):
    llm, _ = smollm2
    chat = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], add_generation_prompt=True, tokenize=True, return_dict=False)
    [eos] = llm.generate([chat], SamplingParams(temperature=0.0, max_tokens=200), use_tqdm=False)
    assert eos.outputs[0].finish_reason == "stop" and eos.outputs[0].stop_reason is None
    [length] = llm.generate(["Count: 1, 2, 3,"], SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)
    assert length.outputs[0].finish_reason == "length" and len(length.outputs[0].token_ids) == 5
    [free] = llm.generate(["Count: 1, 2, 3,"], SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    text = free.outputs[0].text
    stop = text[6:9]
    [stopped] = llm.generate(["Count: 1, 2, 3,"], SamplingParams(temperature=0.0, max_tokens=20, stop=[stop]),
                             use_tqdm=False)
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == stop
    assert stopped.outputs[0].text == text[: text.index(stop)]


def test_abort_frees_blocks(smollm2):
    llm, _ = smollm2
    engine = llm.engine
    engine.add_request("x", "Write a long essay", SamplingParams(max_tokens=100))
    engine.step()
    engine.abort_request("x")
    [out] = engine.step()
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


@pytest.mark.parametrize(
    "kwargs, field",
    [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"max_tokens": -1}, "max_tokens"),
     ({"temperature": -1.0}, "temperature"), ({"n": 0}, "n"), ({"logprobs": 21}, "logprobs")],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_leave_nothing_behind(smollm2):
    llm, _ = smollm2
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    too_long = [1] * (llm.engine.config.max_model_len + 1)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["fine", too_long], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.stats().num_free_blocks == llm.stats().num_total_blocks


def test_prompt_logprobs_match_transformers_across_chunks(smollm2):
    llm, hf = smollm2
    prompt = llm.tokenizer.encode(PASSAGE)[:150]  # three 64-token chunks
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2)
    [out] = llm.generate([prompt], params, use_tqdm=False)
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
        assert len(entry) <= 3


def test_a_failed_forward_aborts_only_that_step(tiny_llama_dir):
    from inference.engine import StepError

    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64)
    engine = llm.engine
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4))
    real_execute = engine.runner.execute
    engine.runner.execute = lambda output: (_ for _ in ()).throw(RuntimeError("device lost"))
    with pytest.raises(StepError) as info:
        engine.step()
    assert info.value.request_ids == ["a"]
    engine.runner.execute = real_execute
    [out] = engine.step()
    assert out.outputs[0].finish_reason == "abort" and not engine.has_unfinished_requests()
    assert engine.stats().num_free_blocks == 64
    [ok] = llm.generate([[4, 5]], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(ok.outputs[0].token_ids) == 2


def test_out_of_vocab_ids_in_params_are_rejected(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=16)
    for params in (SamplingParams(logit_bias={10**6: 1.0}), SamplingParams(stop_token_ids=[10**6])):
        with pytest.raises(ValueError, match="below"):
            llm.generate([[1, 2]], params, use_tqdm=False)


def test_profiling_forward_runs_the_largest_step(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=8, max_num_batched_tokens=100)
    model = llm.engine.runner.model
    # The scratch caches the profile binds, as they stand when its forward returns.
    scratch = []
    hook = model.register_forward_hook(lambda *_: scratch.extend(layer.self_attn.kv_cache for layer in model.layers))
    logits = llm.engine.runner.profile_forward()
    hook.remove()
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = hf(torch.zeros(1, 100, dtype=torch.long), use_cache=True)
    torch.testing.assert_close(logits, expected.logits[:, -1], atol=1e-4, rtol=1e-4)
    # The profile is a prompt of 100 tokens of id 0 in one request, so slot p
    # holds position p: every layer wrote K/V for all 100 (rotary makes each
    # position's key differ; the scratch caches start uninitialised).
    for (key_cache, value_cache), hf_layer in zip(scratch, expected.past_key_values.layers, strict=True):
        for ours, theirs in ((key_cache, hf_layer.keys), (value_cache, hf_layer.values)):
            rows = ours.flatten(0, 1)[:100]  # [100, kv_heads, head_dim]
            torch.testing.assert_close(rows, theirs[0].transpose(0, 1), atol=1e-4, rtol=1e-4)
    # The engine's own caches are bound again afterwards.
    [out] = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    assert out.outputs[0].token_ids == hf_greedy(hf, [1, 2, 3], GREEDY.max_tokens)
