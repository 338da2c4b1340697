"""vLLM's LoRA flags: parsed into the engine config, and bad ones stop
`serve` before anything loads (exit code 2, one line saying what is wrong)."""

from __future__ import annotations

import pytest

from inference.lora.config import LoRAModule
from server.cli import build_parser, main
from server.lora_args import lora_config_from_args


def parse(*args: str):
    return build_parser().parse_args(["serve", *args])


def test_both_module_forms_and_the_limits():
    args = parse("--enable-lora", "--lora-modules", "sql=/a/sql",
                 '{"name": "chat", "path": "/a/chat", "base_model_name": "base"}',
                 "--max-loras", "2", "--max-lora-rank", "64", "--max-cpu-loras", "5")
    config = lora_config_from_args(args)
    assert config.modules == [LoRAModule("sql", "/a/sql"), LoRAModule("chat", "/a/chat", "base")]
    assert (config.max_loras, config.max_lora_rank, config.max_cpu_loras) == (2, 64, 5)
    assert lora_config_from_args(parse("--enable-lora")).max_cpu_loras == 1  # defaults to max_loras
    assert lora_config_from_args(parse()) is None


@pytest.mark.parametrize("args, words", [
    (("--enable-lora", "--lora-modules", "nopath"), "neither name=path nor a JSON object"),
    (("--enable-lora", "--lora-modules", '{"name": "x"}'), "needs string fields 'name' and 'path'"),
    (("--enable-lora", "--lora-modules", '{"name": "x", "path": "y", "rank": 4}'), "unknown fields ['rank']"),
    (("--lora-modules", "a=/b"), "--lora-modules needs --enable-lora"),
    (("--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"), "max_cpu_loras (2) must be >= max_loras (4)"),
    (("--enable-lora", "--lora-modules", "a=/x", "a=/y"), "names must be unique"),
])
def test_bad_flags_exit_2(args, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *args])
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err
