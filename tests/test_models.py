"""Our Llama-family model code against transformers on the same weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoConfig

from inference import LLM, SamplingParams
from inference.attention import AttentionMetadata
from inference.models import load_model

PROMPTS = [[5, 17, 99, 3, 250, 7], list(range(10, 60)), [300] * 3 + list(range(100, 117))]


def _prefill_logits(model, token_ids: list[int]) -> torch.Tensor:
    """Logits of every position of one prompt, prefilled at once into a fresh
    paged KV cache in the model's dtype and on its device."""
    block_size, n = 16, len(token_ids)
    num_blocks = -(-n // block_size)
    attn = model.layers[0].self_attn
    like = {"dtype": model.embed_tokens.weight.dtype, "device": model.embed_tokens.weight.device}
    for layer in model.layers:
        shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
        layer.self_attn.kv_cache = (torch.zeros(shape, **like), torch.zeros(shape, **like))
    device = like["device"]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        max_query_len=n,
        max_seq_len=n,
    )
    with torch.inference_mode():
        hidden = model(torch.tensor(token_ids, device=device), torch.arange(n, device=device), meta)
        return model.compute_logits(hidden)


def assert_logits_match_transformers(folder, hf_model) -> None:
    ours = load_model(folder, AutoConfig.from_pretrained(folder), torch.float32, "cpu")
    for prompt in PROMPTS:
        with torch.inference_mode():
            expected = hf_model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(_prefill_logits(ours, prompt), expected, atol=1e-4, rtol=0)


def test_logits_match_transformers(tiny_model):
    assert_logits_match_transformers(*tiny_model[1:])


def test_greedy_continuations_match_transformers(tiny_model):
    _, folder, hf_model = tiny_model
    llm = LLM(model=str(folder), dtype="float32", num_kv_blocks=64)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        with torch.inference_mode():
            ref = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                pad_token_id=0,
            )[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == ref


def test_smollm2_greedy_matches_transformers(smollm2_dir, smollm2_tokenizer, hf_smollm2):
    tokenizer = smollm2_tokenizer
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}],
        [{"role": "user", "content": "Write a haiku about the sea."}],
    ]
    prompts = [
        tokenizer.encode("The quick brown fox"),
        tokenizer.encode("def fibonacci(n):\n"),
        tokenizer.encode("Les mathématiques sont"),
        tokenizer.encode("1, 2, 3, 5, 8,"),
        tokenizer.encode("In 1969, the first humans"),
    ] + [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in chats]
    llm = LLM(model=str(smollm2_dir), dtype="float32", kv_cache_memory=256 * 1024**2)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        with torch.inference_mode():
            ref = hf_smollm2.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)
        assert output.outputs[0].token_ids == ref[0, len(prompt):].tolist(), tokenizer.decode(prompt)


# ---- errors name the file or field ------------------------------------------


def _copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def test_unknown_architecture_names_field(tiny_model, tmp_path):
    folder = _copy(tiny_model[1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="architectures"):
        load_model(folder, AutoConfig.from_pretrained(folder), torch.float32, "cpu")


def test_corrupt_safetensors_names_file(tiny_model, tmp_path):
    folder = _copy(tiny_model[1], tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(folder, AutoConfig.from_pretrained(folder), torch.float32, "cpu")


def test_missing_shard_names_file(tiny_model, tmp_path):
    folder = _copy(tiny_model[1], tmp_path)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(folder, AutoConfig.from_pretrained(folder), torch.float32, "cpu")


def test_missing_tensor_names_parameter(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_model[1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.1.mlp.gate_up_proj"):
        load_model(folder, AutoConfig.from_pretrained(folder), torch.float32, "cpu")
