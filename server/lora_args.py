"""The LoRA flags of `pagedinfer generate` and `serve`, named as vLLM's.

`--lora-modules` takes `name=path` or `{"name", "path", "base_model_name"}`
JSON, several at once; a malformed one is an argparse error (exit 2). The
adapters themselves are read by the engine core at start-up, which fails to
start on one it cannot serve.
"""

from __future__ import annotations

import argparse

from inference.lora.config import LoRAConfig, LoRAModule, parse_lora_module


def _lora_module(text: str) -> LoRAModule:
    try:
        return parse_lora_module(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (PEFT folders)")
    parser.add_argument(
        "--lora-modules", nargs="+", type=_lora_module, default=None, metavar="NAME=PATH|JSON",
        help='adapters to load at start: name=path, or {"name": .., "path": .., "base_model_name": ..}',
    )
    parser.add_argument("--max-loras", type=int, default=1, help="distinct adapters one step may hold (device slots)")
    parser.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank served")
    parser.add_argument("--max-cpu-loras", type=int, default=None,
                        help="adapters kept in host memory (default: --max-loras)")


def lora_config_from_args(args: argparse.Namespace) -> LoRAConfig | None:
    """None unless --enable-lora; ValueError for inconsistent numbers or --lora-modules without it."""
    if not args.enable_lora:
        if args.lora_modules:
            raise ValueError("--lora-modules needs --enable-lora")
        return None
    return LoRAConfig.create(args.max_loras, args.max_lora_rank, args.max_cpu_loras, args.lora_modules)
