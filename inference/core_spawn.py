"""Starting the engine core's process, and loading a tokenizer, for the front end.

The core process is spawned as early as possible (a server spawns it before
importing its own stack) and adopted later by an AsyncLLM, which binds the
sockets the core connects to; ZeroMQ retries the core's connects until then.
Tokenizers load on threads while the core loads the model.

Invariants: nothing here imports torch at import time; `load_tokenizer` and
`tokenizer_class` are safe from any thread.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

from inference.core_process import run_engine_core

if TYPE_CHECKING:
    from inference.engine_core import EngineCore


# transformers' lazy module fails ("cannot import name 'AutoTokenizer'") when a
# second thread imports it while the first is still running its __init__: the
# engine's and the server's tokenizers load on two threads at once.
_TRANSFORMERS_IMPORT = threading.Lock()

# Model types for which AutoTokenizer, on a folder whose tokenizer_config.json
# names "TokenizersBackend" (what transformers 5 saves for a fast tokenizer),
# builds exactly that class. AutoTokenizer first loads the model's config to
# decide, which imports torch and torch.distributed (3-4 s of a CPU start-up);
# the class alone imports neither. tests/test_tokenizer_loading.py checks each
# type against AutoTokenizer. Others (qwen2's hub class is overridden, for
# one) go through AutoTokenizer.
_BACKEND_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen3", "qwen3_moe"})


def _names_tokenizers_backend(folder: str) -> bool:
    path = Path(folder)
    try:
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return False  # AutoTokenizer then says what is wrong
    return (tokenizer_config.get("tokenizer_class") == "TokenizersBackend" and "auto_map" not in tokenizer_config
            and model_type in _BACKEND_MODEL_TYPES and (path / "tokenizer.json").is_file())


def tokenizer_class(folder: str) -> type:
    """The class that loads `folder`'s tokenizer, imported from any thread:
    the tokenizer's own class where AutoTokenizer would build it anyway (0.7 s,
    no torch), else AutoTokenizer (2-3 s, torch included)."""
    with _TRANSFORMERS_IMPORT:
        if _names_tokenizers_backend(folder):
            from transformers import TokenizersBackend

            return TokenizersBackend
        from transformers import AutoTokenizer

        return AutoTokenizer


def load_tokenizer(folder: str):
    """A model folder's tokenizer, as AutoTokenizer gives it, from any thread."""
    return tokenizer_class(folder).from_pretrained(folder)


@dataclass(slots=True)
class SpawnedCore:
    process: BaseProcess
    socket_dir: str  # holds the two ipc sockets; removed at shutdown
    input_address: str
    output_address: str


def spawn_core(core_factory: Callable[[], EngineCore]) -> SpawnedCore:
    """Start the engine-core process now, for an AsyncLLM to adopt later.

    The core connects to sockets that AsyncLLM binds when it is built
    (ZeroMQ retries a connect until its endpoint exists), so a server can
    start the core before its own imports, and the two import in parallel.
    """
    socket_dir = tempfile.mkdtemp(prefix="pagedinfer-core-")
    input_address, output_address = f"ipc://{socket_dir}/input", f"ipc://{socket_dir}/output"
    # spawn, not fork: the parent may hold threads and a CUDA context.
    process = multiprocessing.get_context("spawn").Process(
        target=run_engine_core, args=(core_factory, input_address, output_address, os.getpid(), time.time()),
        name="engine-core", daemon=True,
    )
    process.start()
    return SpawnedCore(process, socket_dir, input_address, output_address)
