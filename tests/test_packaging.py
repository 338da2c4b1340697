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


def test_an_installed_hf_kernels_is_shadowed_for_the_gpu_check(tmp_path):
    """Where Hugging Face's kernels distribution is installed (transformers >= 5.25 requires it),
    transformers takes this project's `kernels/` for it; bench/gpu_wheels.py's shadow dist-info in the
    layout's site folder makes transformers' own check say it is absent."""
    import os
    from pathlib import Path

    from transformers.utils.import_utils import KERNELS_MIN_VERSION

    image = tmp_path / "image"  # the GPU image's site-packages, as far as `kernels` goes: a version it takes
    info = image / f"kernels-{KERNELS_MIN_VERSION}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {KERNELS_MIN_VERSION}\n")
    site = tmp_path / "site"
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(image), str(repo)]))

    def available() -> str:
        code = "from transformers.utils import is_kernels_available\nprint(is_kernels_available())"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                              cwd=repo).stdout.strip()

    assert available() == "True", "the installed distribution passes transformers' check"
    subprocess.run([sys.executable, "-m", "bench.gpu_wheels", "--shadow-hub-kernels", str(site)], check=True, env=env,
                   cwd=repo, capture_output=True)
    assert available() == "False"


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
