"""Random-weight checkpoints of real model shapes, for the GPU benchmark.

`MODELS` are the configs of real models (speed depends on shapes, not on
weight values), `MOE_MODELS` the mixture-of-experts ones (too large to write:
the engine builds their random weights on the device); `CPU_MODELS` are tiny
ones for dry runs and tests.
`write_model` saves a loadable folder: config.json, random safetensors shards
(std 0.02, norms 1, so activations stay finite through every layer) and a
word-level tokenizer whose ids map one to one onto words `t<id>`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 8192}
MODELS = {
    "Qwen3-0.6B": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, rope_scaling={**LLAMA3_ROPE, "factor": 32.0}),
    "Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
}
# Mixture of experts: ~61 GB in bf16, so the benchmark builds its weights on
# the device (write_model(..., weights=False) + load_format="dummy").
MOE_MODELS = {
    "Qwen3-30B-A3B": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
                          tie_word_embeddings=False),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=1024)
CPU_MODELS = {"tiny-qwen3": dict(model_type="qwen3", tie_word_embeddings=True, **TINY),
              "tiny-llama": dict(model_type="llama", tie_word_embeddings=False, **TINY),
              "tiny-qwen3-moe": dict(model_type="qwen3_moe", tie_word_embeddings=False, moe_intermediate_size=32,
                                     num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, **TINY)}
_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def write_model(folder: Path, spec: dict, dtype: torch.dtype, device: str, weights: bool = True) -> dict:
    """config.json, random safetensors shards (unless not `weights`: then the
    engine builds them, load_format="dummy") and a word-level tokenizer;
    returns byte counts."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("model_type"), eos_token_id=0, bos_token_id=None, **spec)
    with torch.device("meta"):  # names and shapes only, no init cost
        shapes = {k: (v.shape, v.dtype) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    config.architectures = [_ARCHITECTURES.get(config.model_type, "LlamaForCausalLM")]
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    GenerationConfig(eos_token_id=0).save_pretrained(folder)
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator(device=device).manual_seed(0)
    shard, shard_bytes, weight_map, total = {}, 0, {}, 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(set(weight_map.values())):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        shard, shard_bytes = {}, 0

    for key, (shape, _) in shapes.items():
        total += shape.numel() * torch.finfo(dtype).bits // 8
        if not weights:
            continue
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=dtype)
        else:  # std 0.02 keeps activations finite through every layer
            tensor = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()
        shard[key] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes > 2 * 1024**3:
            flush()
    if shard:
        flush()
    if weights:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    vocab = {"<eos>": 0, **{f"t{i}": i for i in range(1, config.vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(folder)
    embed = shapes["model.embed_tokens.weight"][0].numel() * torch.finfo(dtype).bits // 8
    kv_heads, layers = config.num_key_value_heads, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "weight_bytes": total,
        # Per decode step every matrix is read once; an untied embedding is only
        # gathered (a few rows), a tied one is read whole as the LM head.
        "weight_bytes_read": total - (0 if config.tie_word_embeddings else embed),
        "kv_bytes_per_token": 2 * layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8,
        "params": sum(s.numel() for s, _ in shapes.values()),
        # all experts' bytes; a decode step reads only the experts its tokens route to
        "expert_bytes": sum(s.numel() for k, (s, _) in shapes.items() if ".experts." in k)
        * torch.finfo(dtype).bits // 8,
        "num_experts": getattr(config, "num_experts", 0) or 0,
        "top_k": getattr(config, "num_experts_per_tok", 0) or 0,
    }


def approx_params(spec: dict) -> float:
    h, layers = spec["hidden_size"], spec["num_hidden_layers"]
    mlp = spec["num_experts"] * spec["moe_intermediate_size"] if "num_experts" in spec else spec["intermediate_size"]
    return layers * (4 * h * h + 3 * h * mlp) + spec["vocab_size"] * h


def active_weight_bytes(model: dict, batch: int) -> float:
    """Weight bytes one decode step of `batch` tokens reads: everything but the
    experts, plus the experts its tokens hit, `E * (1 - (1 - k/E)^batch)` per
    layer on average when routing is uniform (random weights route so)."""
    if not model.get("num_experts"):
        return model["weight_bytes_read"]
    num_experts, top_k = model["num_experts"], model["top_k"]
    hit = num_experts * (1 - (1 - top_k / num_experts) ** batch)
    return model["weight_bytes_read"] - model["expert_bytes"] * (1 - hit / num_experts)
