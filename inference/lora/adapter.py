"""A PEFT LoRA adapter folder, read and checked against the base model.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (keys
`base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`).
What is served: plain LoRA on any of q/k/v/o/gate/up/down of the Llama family
(Llama, Mistral, Qwen2, Qwen3), rank up to `max_lora_rank`, scaling
`lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`.

Everything else is refused with a `LoRAError` that names the reason: DoRA,
trained biases, `modules_to_save`, per-module rank or alpha patterns,
embedding or LM-head targets, a rank over the limit, and any tensor whose
shape does not fit the base model (an adapter trained for another model).

Invariants: `weights[(layer, module)]` is `(A [r, in], B [out, r])` in
float32 on the host, with the scaling already folded into B, full
(unsharded) checkpoint shapes; every adapter has at least one module.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class LoRAError(ValueError):
    """The adapter cannot be served; the message says why."""


@dataclass(slots=True)
class LoRAAdapter:
    name: str
    path: str
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def module_shapes(hf_config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target module, unsharded."""
    hidden = hf_config.hidden_size
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // num_heads
    kv = (getattr(hf_config, "num_key_value_heads", None) or num_heads) * head_dim
    inter = hf_config.intermediate_size
    return {
        "q_proj": (hidden, num_heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
        "o_proj": (num_heads * head_dim, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }


def _read_config(folder: Path) -> dict:
    config_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise LoRAError(f"LoRA adapter path {str(folder)!r} is not a folder")
    if not config_path.is_file():
        raise LoRAError(f"LoRA adapter folder {str(folder)!r} has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoRAError(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{CONFIG_FILE} must be a JSON object")
    return config


def _check_config(config: dict, max_lora_rank: int) -> tuple[int, float]:
    """The config's (r, scaling), or LoRAError for what is not served."""
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"only LoRA adapters are served, not peft_type {config['peft_type']!r}")
    if config.get("use_dora"):
        raise LoRAError("DoRA adapters (use_dora) are not supported")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"adapters with trained biases (bias={config['bias']!r}) are not supported")
    if config.get("modules_to_save"):
        raise LoRAError(f"modules_to_save {config['modules_to_save']} is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise LoRAError(f"per-module {key} is not supported")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    for unsupported in ("embed_tokens", "lm_head"):
        if unsupported in targets:
            raise LoRAError(f"target module {unsupported!r} is not supported (only q/k/v/o/gate/up/down_proj)")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"r must be a positive integer, got {rank!r}")
    if rank > max_lora_rank:
        raise LoRAError(f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}")
    alpha = config.get("lora_alpha", 8)
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, scaling


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise LoRAError(f"LoRA adapter folder {str(folder)!r} has no {WEIGHTS_FILE}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoRAError(f"{WEIGHTS_FILE} cannot be read: {exc}") from None


def load_adapter(name: str, path: str, hf_config, max_lora_rank: int) -> LoRAAdapter:
    """Read and check the PEFT folder at `path`; raise LoRAError if it cannot be served."""
    folder = Path(path)
    rank, scaling = _check_config(_read_config(folder), max_lora_rank)
    shapes = module_shapes(hf_config)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in _read_tensors(folder).items():
        match = _KEY.match(key)
        if match is None:
            raise LoRAError(f"unsupported tensor {key!r}: only lora_A/lora_B of q/k/v/o/gate/up/down_proj are served")
        layer, block, module, half = int(match[1]), match[2], match[3], match[4]
        if module not in (ATTENTION_MODULES if block == "self_attn" else MLP_MODULES):
            raise LoRAError(f"unsupported target module {block}.{module} in {key!r}")
        if layer >= hf_config.num_hidden_layers:
            raise LoRAError(f"{key!r}: the base model has {hf_config.num_hidden_layers} layers")
        halves.setdefault((layer, module), {})[half] = tensor
    if not halves:
        raise LoRAError(f"{WEIGHTS_FILE} holds no LoRA weights")
    weights = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise LoRAError(f"layer {layer} {module} has lora_{'A' if 'A' not in pair else 'B'} missing")
        in_features, out_features = shapes[module]
        a, b = pair["A"], pair["B"]
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise LoRAError(
                f"layer {layer} {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the base "
                f"model ({in_features} in, {out_features} out) at rank {rank}: the adapter is for another model"
            )
        weights[(layer, module)] = (a.float().contiguous(), (b.float() * scaling).contiguous())
    return LoRAAdapter(name, str(folder), rank, weights)
