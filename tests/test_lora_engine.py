"""Multi-LoRA in the offline engine, float32 on the CPU, against transformers + peft."""

from __future__ import annotations

import pytest
import torch

from inference import LLM, SamplingParams
from inference.lora.config import LoRARequest
from conftest import build_tiny_model
from lora_fixtures import build_adapters, peft_greedy

MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def base_and_adapters(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    build_tiny_model(request.param, root / "base")
    return root / "base", build_adapters(root / "base", root)


def test_mixed_batch_matches_peft(base_and_adapters):
    """Base + three adapters (ranks 4, 8, 16) in one batch with two device
    slots, so adapters swap in and out; chunked prefill and preemption on."""
    base, adapters = base_and_adapters
    gen = torch.Generator().manual_seed(5)
    names = [None, "sql", "chat", "code"] * 3
    prompts = [torch.randint(0, 256, (12 + 5 * i,), generator=gen).tolist() for i in range(len(names))]
    want: list[list[int]] = [[] for _ in names]
    for name in dict.fromkeys(names):
        indices = [i for i, n in enumerate(names) if n == name]
        for i, tokens in zip(indices, peft_greedy(base, adapters.get(name), [prompts[i] for i in indices], MAX_TOKENS)):
            want[i] = tokens
    # Each adapter changes the output of the first prompt, so the comparison can fail.
    first = prompts[0]
    assert len({tuple(peft_greedy(base, adapters.get(n), [first], MAX_TOKENS)[0]) for n in names[:4]}) == 4
    llm = LLM(model=str(base), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16,
              num_kv_blocks=14, block_size=8, max_num_batched_tokens=32)
    requests = [None if n is None else LoRARequest(n, i + 1, str(adapters[n])) for i, n in enumerate(names)]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=requests)
    assert [o.outputs[0].token_ids for o in outputs] == want
    residency = llm.engine.runner.lora
    assert residency.num_swaps_in > 3  # three adapters through two slots
    assert residency.num_loads_from_disk > 0  # and through two places in host memory (max_cpu_loras)
    assert llm.stats().num_preemptions > 0


def test_adapter_outputs_differ_from_base_and_from_each_other_only_by_adapter(base_and_adapters):
    """The same prompt under each adapter, each alone, equals its batched result."""
    base, adapters = base_and_adapters
    llm = LLM(model=str(base), dtype="float32", enable_lora=True, max_loras=4, num_kv_blocks=64)
    prompt = list(range(40, 60))
    batched = llm.generate([prompt] * 4, GREEDY, use_tqdm=False,
                           lora_request=[None] + [LoRARequest(n, i, str(p)) for i, (n, p) in enumerate(adapters.items())])
    for name, output in zip([None, *adapters], batched):
        lora = None if name is None else LoRARequest(name, 0, str(adapters[name]))
        [alone] = llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=lora)
        assert alone.outputs[0].token_ids == output.outputs[0].token_ids
    assert len({tuple(o.outputs[0].token_ids) for o in batched}) == 4


def test_prefix_cache_is_per_adapter(base_and_adapters):
    """Blocks are keyed by the adapter as vLLM keys them: the same adapter
    reuses a prompt's blocks, another adapter or the base model never does."""
    from inference.block_hashing import sha256_cbor

    base, adapters = base_and_adapters
    llm = LLM(model=str(base), dtype="float32", enable_lora=True, max_loras=2, num_kv_blocks=64, block_size=16)
    sql, chat = (LoRARequest(n, 0, str(adapters[n])) for n in ("sql", "chat"))
    prompt = list(range(100, 150))  # three full blocks
    params = SamplingParams(temperature=0.0, max_tokens=1)

    def cached(lora) -> int:
        [out] = llm.generate([prompt], params, use_tqdm=False, lora_request=lora)
        return out.num_cached_tokens

    assert cached(sql) == 0
    assert cached(sql) == 48
    assert cached(chat) == 0
    assert cached(None) == 0
    assert cached(chat) == 48
    core = llm.engine.core
    first = sha256_cbor((core.scheduler.blocks.hasher.none_hash, tuple(prompt[:16]), ("sql",)))
    second = sha256_cbor((first, tuple(prompt[16:32]), ("sql",)))
    assert first in core.block_manager.cached and second in core.block_manager.cached


def test_qwen2_mixed_batch_matches_peft(tmp_path):
    """Qwen2 (q/k/v biases, one KV head, tied embeddings): base and three adapters in one batch through two
    slots. Its tiny model's tied, 20x embeddings make the input token dominate the logits, so a default
    peft adapter moves nothing; lora_B x20 moves every prompt's output (checked), so parity can fail."""
    build_tiny_model("qwen2", tmp_path / "base")
    adapters = build_adapters(tmp_path / "base", tmp_path, b_scale=20.0)
    gen = torch.Generator().manual_seed(5)
    names = [None, "sql", "chat", "code"] * 2
    prompts = [torch.randint(0, 256, (10 + 4 * i,), generator=gen).tolist() for i in range(len(names))]
    want = [peft_greedy(tmp_path / "base", adapters.get(n), [p], MAX_TOKENS)[0] for n, p in zip(names, prompts)]
    plain = peft_greedy(tmp_path / "base", None, prompts, MAX_TOKENS)
    assert all((want[i] != plain[i]) == (n is not None) for i, n in enumerate(names))
    llm = LLM(model=str(tmp_path / "base"), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16,
              num_kv_blocks=32, block_size=8)
    requests = [None if n is None else LoRARequest(n, i + 1, str(adapters[n])) for i, n in enumerate(names)]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=requests)
    assert [o.outputs[0].token_ids for o in outputs] == want


def test_kv_events_name_the_adapter():
    from inference.kv_cache_events import BlocksStored
    from inference.kv_events_wire import to_wire

    event = to_wire(BlocksStored([b"\1" * 32, b"\2" * 32], None, list(range(32)), 0, "salt", "sql", 3), 16)
    assert (event.lora_name, event.lora_id) == ("sql", 3)
    assert event.extra_keys == [("sql", "salt"), ("sql",)]
    base = to_wire(BlocksStored([b"\1" * 32], None, list(range(16)), 0, None), 16)
    # No extra keys: the event goes out without the field (7 after the tag), as llm-d's decoders count them.
    assert (base.lora_name, base.lora_id) == (None, None) and not hasattr(base, "extra_keys")


def test_default_model_with_an_adapter_matches_peft(smollm2_dir, smollm2_tokenizer, tmp_path):
    """SmolLM2 (the default model, 30 layers) with a rank-8 adapter on every projection, beside the base model."""
    from lora_fixtures import build_adapter

    adapter = build_adapter(smollm2_dir, tmp_path / "smol", 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"], seed=3)
    prompt = smollm2_tokenizer.encode("The capital of France is")
    want = peft_greedy(smollm2_dir, adapter, [prompt], MAX_TOKENS)[0]
    llm = LLM(model=str(smollm2_dir), dtype="float32", enable_lora=True, max_lora_rank=8, num_kv_blocks=32)
    base, tuned = llm.generate([prompt, prompt], GREEDY, use_tqdm=False,
                               lora_request=[None, LoRARequest("smol", 1, str(adapter))])
    assert tuned.outputs[0].token_ids == want
    assert base.outputs[0].token_ids != want
