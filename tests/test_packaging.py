"""Packaging checks that need no model."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_our_kernels_package_is_not_taken_for_hf_kernels():
    # transformers switches to hub kernels when it finds a package named
    # `kernels`; ours must not pass for it. Run in a fresh interpreter so
    # no cached check from another test leaks in.
    code = (
        "import kernels, transformers\n"
        "from transformers.utils import is_kernels_available\n"
        "assert kernels.__file__ is not None\n"
        "print(is_kernels_available())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_console_script_parses():
    from server.cli import build_parser

    args = build_parser().parse_args(["generate", "hi", "--max-tokens", "3"])
    assert args.max_tokens == 3 and args.prompt == "hi"


# Two ranks: the command must also exit once its rank process is done.
@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_generate_command_runs_the_engine(tiny_llama_dir, tensor_parallel_size):
    from inference import LLM, SamplingParams

    prompt = "hello"
    [expected] = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=32).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False
    )
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", prompt, "--max-tokens", "5",
         "--model", str(tiny_llama_dir), "--num-kv-blocks", "32", "--tensor-parallel-size", str(tensor_parallel_size)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert result.stdout.rstrip("\n") == expected.outputs[0].text


def test_wheel_ships_the_cpu_kernel_sources(tmp_path):
    # They are compiled where they run, so an installed (non-editable) copy,
    # such as the container's, needs the sources.
    import shutil
    import zipfile
    from pathlib import Path

    root, src = Path(__file__).resolve().parents[1], tmp_path / "src"
    src.mkdir()  # a copy: the build writes build/ and egg-info next to its sources
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for package in ("inference", "kernels", "server"):
        shutil.copytree(root / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("pagedinfer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"kernels/cpu/{p.name}" for p in (root / "kernels" / "cpu").iterdir()}
    assert expected and expected <= names, sorted(expected - names)
