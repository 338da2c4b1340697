"""Load a Hugging Face folder's safetensors into our fused model.

Checkpoint names map onto ours by stripping the `model.` prefix; q/k/v and
gate/up are concatenated along the output dim, in that order, as the fused
projections expect. Per-expert MoE tensors (Qwen3-MoE
`mlp.experts.N.gate_proj`, Mixtral `block_sparse_moe.experts.N.w1`) are
stacked into our `[num_experts, ...]` expert parameters; a checkpoint that
already stores them stacked (transformers' own names) loads as is. Every
parameter must be written exactly once, so a missing tensor or shard is an
error naming it, never silent random weights.

A tensor-parallel layer (`inference.parallel.layers`) names the slice of the
checkpoint tensor it holds; only that slice is read (`safe_open(...).get_slice`),
so a rank never reads the whole checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

# checkpoint suffix -> (our parameter suffix, index of the part in the fused tensor)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_EXPERT = re.compile(r"(?P<layer>.+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight")
# per-expert projection -> (our stacked parameter, part index in it or None)
_EXPERT_PARTS = {
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None),
    "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None),  # Mixtral's names
}


def list_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, checking a sharded index is complete."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: missing shard(s) listed in {index.name}: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weight files")
    return files


def _target(name: str) -> tuple[str, int | None, int | None]:
    """(our parameter, expert index or None, fused part index or None) of a checkpoint tensor."""
    name = name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")
    expert = _EXPERT.fullmatch(name)
    if expert and expert["proj"] in _EXPERT_PARTS:
        stacked, part = _EXPERT_PARTS[expert["proj"]]
        return f"{expert['layer']}.mlp.experts.{stacked}", int(expert["expert"]), part
    for suffix, (fused, part) in _FUSED.items():
        for kind in (".weight", ".bias"):
            if name.endswith(suffix + kind):
                return name[: -len(suffix + kind)] + fused + kind, None, part
    return name, None, None


def _fused_parts(model: nn.Module, name: str) -> list[int]:
    """Output sizes of the parts of a parameter; one part if it is not fused."""
    module_name, kind, leaf = name.rsplit(".", 2) if name.count(".") >= 2 else ("", "", "")
    if kind == "experts" and leaf == "gate_up_proj":
        experts = model.get_submodule(f"{module_name}.experts")
        return [experts.intermediate_size, experts.intermediate_size]
    if kind == "qkv_proj":
        attn = model.get_submodule(module_name)
        return [attn.q_size, attn.kv_size, attn.kv_size]
    if kind == "gate_up_proj":
        mlp = model.get_submodule(module_name)
        return [mlp.intermediate_size, mlp.intermediate_size]
    return [0]


def _num_writes(model: nn.Module, name: str) -> int:
    """Writes that fill a parameter: one per fused part, and per expert for stacked expert weights."""
    num_parts = len(_fused_parts(model, name))
    if ".experts." in name:
        return num_parts * model.get_submodule(name.rsplit(".", 1)[0]).num_experts
    return num_parts


def _read(
    f, ckpt_name: str, owner: nn.Module, part: int | None, dest: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the checkpoint tensor, where it goes); for a parallel layer only its
    slice, into the part of `dest` it fills (a vocab shard may be short)."""
    if not hasattr(owner, "checkpoint_slice"):
        return f.get_tensor(ckpt_name), dest
    dim, start, length = owner.checkpoint_slice(part or 0)
    index = (slice(None),) * dim + (slice(start, start + length),)
    return f.get_slice(ckpt_name)[index], dest.narrow(dim, 0, length)


def load_weights(model: nn.Module, folder: Path) -> None:
    params = dict(model.named_parameters())
    written: dict[str, int] = {}  # our name -> number of parts written
    files = list_weight_files(folder)
    for path in tqdm(files, desc="Loading weights", unit="file", disable=len(files) < 2):
        try:
            handle = safe_open(path, framework="pt")
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: corrupt or unreadable safetensors file ({exc})") from exc
        with handle as f:
            for ckpt_name in f.keys():
                if ckpt_name.endswith("rotary_emb.inv_freq"):
                    continue
                if ckpt_name == "lm_head.weight" and "lm_head.weight" not in params:
                    continue  # tied embeddings: some checkpoints still store the copy
                name, expert, part = _target(ckpt_name)
                if name not in params or (expert is not None and expert >= params[name].shape[0]):
                    raise ValueError(f"{path.name}: unexpected tensor {ckpt_name!r}")
                param = params[name]
                with torch.no_grad():
                    dest = param if expert is None else param[expert]
                    if part is not None:
                        sizes = _fused_parts(model, name)
                        offset = sum(sizes[:part])
                        dest = dest.narrow(0, offset, sizes[part])
                    owner = model.get_submodule(name.rsplit(".", 1)[0])
                    try:
                        tensor, dest = _read(f, ckpt_name, owner, part, dest)
                    except (SafetensorError, OSError, RuntimeError) as exc:
                        raise ValueError(f"{path}: cannot read tensor {ckpt_name!r} ({exc})") from exc
                    if dest.shape != tensor.shape:
                        raise ValueError(
                            f"{path.name}: {ckpt_name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
                        )
                    dest.copy_(tensor)
                whole = expert is None and part is None
                written[name] = written.get(name, 0) + (_num_writes(model, name) if whole else 1)
    for name in params:
        if written.get(name, 0) != _num_writes(model, name):
            raise ValueError(f"{folder}: weights for {name!r} are missing from the checkpoint")
