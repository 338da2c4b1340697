"""LoRA serving settings, as vLLM's flags name them.

    --enable-lora
    --lora-modules name=path ... | '{"name": .., "path": .., "base_model_name": ..}'
    --max-loras N        adapters one step may hold on the device (default 1)
    --max-lora-rank R    the largest rank served (default 16)
    --max-cpu-loras N    adapters kept in host memory (default: max_loras)

Plain data (no torch), sent to the front end with the rest of the engine
config. Invariant after `create`: 1 <= max_loras <= max_cpu_loras, every
module name is unique.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(slots=True)
class LoRAModule:
    name: str
    path: str
    base_model_name: str | None = None  # the model id /v1/models names as its parent


@dataclass(slots=True)
class LoRARequest:
    """The offline API's adapter for a request (vLLM's `LoRARequest`); registered on first use."""

    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass(slots=True)
class LoRAConfig:
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    modules: list[LoRAModule] = field(default_factory=list)

    @classmethod
    def create(cls, max_loras: int = 1, max_lora_rank: int = 16, max_cpu_loras: int | None = None,
               modules: list[LoRAModule] | None = None) -> LoRAConfig:
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        if max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {max_lora_rank}")
        max_cpu_loras = max_loras if max_cpu_loras is None else max_cpu_loras
        if max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({max_loras})")
        modules = list(modules or [])
        names = [m.name for m in modules]
        if len(set(names)) != len(names):
            raise ValueError(f"LoRA module names must be unique, got {names}")
        return cls(max_loras, max_lora_rank, max_cpu_loras, modules)


def parse_lora_module(text: str) -> LoRAModule:
    """One `--lora-modules` value: `name=path` or a JSON object with name, path
    and optionally base_model_name. ValueError says what is wrong."""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON {text!r}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("path"), str):
            raise ValueError(f"{text!r} needs string fields 'name' and 'path'")
        unknown = set(data) - {"name", "path", "base_model_name"}
        if unknown:
            raise ValueError(f"{text!r} has unknown fields {sorted(unknown)}")
        return LoRAModule(data["name"], data["path"], data.get("base_model_name"))
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"{text!r} is neither name=path nor a JSON object")
    return LoRAModule(name, path)
