"""Qwen3-MoE and Mixtral against transformers on the same tiny random weights.

The CPU path runs `kernels.fused_moe`'s torch reference, transformers' own
expert loop, so float32 logits and greedy continuations must match it,
alone, in mixed batches under chunked prefill, and through preemption.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from test_engine import hf_greedy
from test_models import assert_logits_match_transformers
from transformers import AutoConfig

from inference import LLM, SamplingParams
from inference.models import load_model
from inference.models.moe import SparseMoeBlock

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def test_layers_follow_the_families_sparse_layout(tiny_moe_model):
    model_type, folder, hf_model = tiny_moe_model
    ours = load_model(folder, AutoConfig.from_pretrained(folder), torch.float32, "cpu")
    expected = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf_model.model.layers]
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.layers] == expected
    if model_type == "qwen3_moe":
        assert expected == [True, False, True]  # mlp_only_layers=[1]


def test_logits_match_transformers(tiny_moe_model):
    assert_logits_match_transformers(*tiny_moe_model[1:])


def test_mixed_batch_with_chunked_prefill_matches_transformers(tiny_moe_model):
    _, folder, hf = tiny_moe_model
    llm = LLM(model=str(folder), dtype="float32", num_kv_blocks=1024, max_num_batched_tokens=64)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (5 + (i * 395) // 23,), generator=gen).tolist() for i in range(24)]
    together = llm.generate(prompts, GREEDY, use_tqdm=False)
    for i in range(0, 24, 6):
        expected = hf_greedy(hf, prompts[i], 16)
        [alone] = llm.generate([prompts[i]], GREEDY, use_tqdm=False)
        assert alone.outputs[0].token_ids == expected, f"prompt {i} alone"
        assert together[i].outputs[0].token_ids == expected, f"prompt {i} in the batch"
    stats = llm.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    expert_bytes = sum(p.numel() * 4 for n, p in llm.engine.core.runner.model.named_parameters() if ".experts." in n)
    assert stats.weight_bytes > expert_bytes > 0


def test_preemption_under_a_small_pool_loses_nothing(tiny_moe_model):
    _, folder, hf = tiny_moe_model
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (20 + 3 * i,), generator=gen).tolist() for i in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tight = LLM(model=str(folder), dtype="float32", num_kv_blocks=12, block_size=16)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    stats = tight.stats()
    assert stats.num_preemptions > 0
    assert stats.num_free_blocks == stats.num_total_blocks == 12
    for i in (0, 5, 11):
        assert outputs[i].outputs[0].token_ids == hf_greedy(hf, prompts[i], 24), f"prompt {i}"


# ---- checkpoint layouts -----------------------------------------------------


def _rewrite(folder, tmp_path, edit) -> object:
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    tensors = edit(load_file(dst / "model.safetensors"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_stacked_expert_checkpoint_loads_the_same(tiny_moe_model, tmp_path):
    """transformers' in-memory names (`experts.gate_up_proj` `[E, 2I, H]`) load as they are."""
    _, folder, hf_model = tiny_moe_model
    stacked = {k: v.clone() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in stacked)
    dst = _rewrite(folder, tmp_path, lambda _: stacked)
    per_expert = load_model(folder, AutoConfig.from_pretrained(folder), torch.float32, "cpu")
    ours = load_model(dst, AutoConfig.from_pretrained(dst), torch.float32, "cpu")
    for (name, a), (_, b) in zip(per_expert.named_parameters(), ours.named_parameters()):
        assert torch.equal(a, b), name


def test_missing_expert_names_the_parameter(tiny_moe_model, tmp_path):
    model_type, folder, _ = tiny_moe_model
    missing = {"qwen3_moe": "model.layers.2.mlp.experts.5.up_proj.weight",
               "mixtral": "model.layers.1.block_sparse_moe.experts.3.w3.weight"}[model_type]
    dst = _rewrite(folder, tmp_path, lambda t: {k: v for k, v in t.items() if k != missing})
    with pytest.raises(ValueError, match=r"layers\.\d\.mlp\.experts\.gate_up_proj"):
        load_model(dst, AutoConfig.from_pretrained(dst), torch.float32, "cpu")


def test_expert_past_num_experts_is_rejected(tiny_moe_model, tmp_path):
    model_type, folder, _ = tiny_moe_model
    prefix = {"qwen3_moe": "model.layers.0.mlp.experts", "mixtral": "model.layers.0.block_sparse_moe.experts"}[model_type]
    proj = {"qwen3_moe": "down_proj", "mixtral": "w2"}[model_type]

    def add_expert(tensors):
        tensors[f"{prefix}.99.{proj}.weight"] = tensors[f"{prefix}.0.{proj}.weight"].clone()
        return tensors

    dst = _rewrite(folder, tmp_path, add_expert)
    with pytest.raises(ValueError, match="experts.99"):
        load_model(dst, AutoConfig.from_pretrained(dst), torch.float32, "cpu")


def test_dummy_weights_need_no_weight_files(tiny_moe_model, tmp_path):
    """`load_format="dummy"` (the GPU benchmark's path for shapes too large to write) reads config.json only."""
    _, folder, _ = tiny_moe_model
    dst = tmp_path / "no-weights"
    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    llm = LLM(model=str(dst), dtype="float32", num_kv_blocks=16, load_format="dummy")
    [out] = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4
    norms = [p for n, p in llm.engine.runner.model.named_parameters() if n.endswith("norm.weight")]
    assert all(torch.equal(p, torch.ones_like(p)) for p in norms)
    with pytest.raises(ValueError, match="load_format"):
        LLM(model=str(dst), load_format="gguf")
