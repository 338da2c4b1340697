"""Model registry: Hugging Face `architectures` name -> our implementation."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from inference.models.llama import LlamaForCausalLM
from inference.models.loader import load_weights
from inference.models.moe import MoeForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": MoeForCausalLM,
    "MixtralForCausalLM": MoeForCausalLM,
}


def model_class(hf_config) -> type[nn.Module]:
    names = getattr(hf_config, "architectures", None) or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ValueError(
        f"config.json field 'architectures' is {names!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
    )


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights in place, on the model's device: std 0.02, norms 1 (activations stay finite through
    every layer), as bench/gpu_models.py writes them to disk."""
    gen = None
    with torch.no_grad():
        for name, param in model.named_parameters():
            if gen is None:
                gen = torch.Generator(device=param.device).manual_seed(seed)
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)


def load_model(
    folder: str | Path, hf_config, dtype: torch.dtype, device: str, dummy_weights: bool = False
) -> nn.Module:
    """The model of `hf_config` with the folder's weights, or random ones with `dummy_weights`."""
    cls = model_class(hf_config)
    # Build on the meta device and materialize once in the target dtype: random
    # init of a multi-GB model would cost more than loading it, and converting
    # materialized (uninitialized) float32 tensors to bfloat16 took 1 s of a
    # 135M model's start-up on the CPU. On meta, the dtype change is free.
    with torch.device("meta"):
        model = cls(hf_config)
    model = model.to(dtype).to_empty(device=device)
    model.rotary = type(model.rotary)(hf_config, model.head_dim).to(device)  # buffers, not weights
    if dummy_weights:
        init_dummy_weights(model)
    else:
        load_weights(model, Path(folder))
    return model.eval()
