"""Whether a draft model could draft for a target: checked at start-up, so a
bad `{"method": "draft_model", "model": ...}` stops the start with one line.

A draft's token ids must mean what the target's mean (the same vocabulary
size and the same tokenizer vocabulary), and it must be smaller than the
target, or guessing costs more than it saves. Sizes are the weights as the
engine would build them (inference/memory_plan.py), so nothing is loaded but
config.json and the tokenizers.
"""

from __future__ import annotations

from pathlib import Path


def check_draft_model(draft: str, target: str) -> None:
    """ValueError naming the first reason `draft` cannot draft for `target` (both model folders)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from inference.memory_plan import weight_bytes

    if not (Path(draft) / "config.json").is_file():
        raise ValueError(f"draft model folder {draft} has no config.json")
    draft_config, target_config = AutoConfig.from_pretrained(draft), AutoConfig.from_pretrained(target)
    if draft_config.vocab_size != target_config.vocab_size:
        raise ValueError(f"draft model vocab_size {draft_config.vocab_size} differs from the target's "
                         f"{target_config.vocab_size}")
    if AutoTokenizer.from_pretrained(draft).get_vocab() != AutoTokenizer.from_pretrained(target).get_vocab():
        raise ValueError("draft model's tokenizer differs from the target's")
    # Any device but "cpu": the weights alone, without the CPU linear kernel's packed copies.
    draft_bytes, target_bytes = (weight_bytes(c, torch.float32, "meta") for c in (draft_config, target_config))
    if draft_bytes >= target_bytes:
        raise ValueError(f"draft model is not smaller than the target ({draft_bytes} bytes of float32 weights "
                         f"against {target_bytes})")
