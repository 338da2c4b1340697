"""PEFT adapters for the tiny models, and transformers + peft as the reference.

Adapters are built by peft itself with `init_lora_weights=False`, so lora_B
is random and non-zero and every adapter changes the model's output."""

from __future__ import annotations

from pathlib import Path

import torch

# (rank, target modules, use_rslora): different ranks on different target sets.
ADAPTER_SPECS = {
    "sql": (4, ["q_proj", "v_proj"], False),
    "chat": (8, ["k_proj", "o_proj", "gate_proj", "down_proj"], True),
    "code": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
}


def build_adapter(base_folder: Path, out_folder: Path, rank: int, targets: list[str], use_rslora: bool = False,
                  seed: int = 0, b_scale: float = 1.0, **extra) -> Path:
    """A peft adapter; `b_scale` multiplies its saved lora_B (a stronger delta, for a base model
    whose outputs a default one does not move)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, use_rslora=use_rslora,
                        init_lora_weights=False, **extra)
    get_peft_model(base, config).save_pretrained(out_folder)
    if b_scale != 1.0:
        path = out_folder / "adapter_model.safetensors"
        tensors = load_file(path)
        save_file({k: v * b_scale if ".lora_B." in k else v for k, v in tensors.items()}, path)
    return out_folder


def build_adapters(base_folder: Path, root: Path, b_scale: float = 1.0) -> dict[str, Path]:
    return {
        name: build_adapter(base_folder, root / name, rank, targets, rslora, seed=i + 1, b_scale=b_scale)
        for i, (name, (rank, targets, rslora)) in enumerate(ADAPTER_SPECS.items())
    }


def peft_greedy(base_folder: Path, adapter_folder: Path | None, prompts: list[list[int]],
                max_new_tokens: int) -> list[list[int]]:
    """transformers (+ peft when an adapter is given) greedy continuations, float32.

    Each token is the argmax of a full forward over the sequence so far: peft's
    `generate` with a KV cache was seen to move the logits of a k_proj adapter
    by ~0.03 from that forward's, which would decide near ties differently."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    if adapter_folder is not None:
        model = PeftModel.from_pretrained(model, adapter_folder)
    model.eval()
    continuations = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(max_new_tokens):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            continuations.append(ids[len(prompt):])
    return continuations
