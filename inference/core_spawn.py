"""Starting the engine core's process, and loading a tokenizer, for the front end.

The core process is spawned as early as possible (a server spawns it before
importing its own stack) and adopted later by an AsyncLLM, which binds the
sockets the core connects to; ZeroMQ retries the core's connects until then.
Tokenizers load on threads while the core loads the model.

Invariants: nothing here imports torch at import time; `load_tokenizer` and
`import_transformers` are safe from any thread.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from inference.core_process import run_engine_core

if TYPE_CHECKING:
    from inference.engine_core import EngineCore


# transformers' lazy module fails ("cannot import name 'AutoTokenizer'") when a
# second thread imports it while the first is still running its __init__: the
# engine's and the server's tokenizers load on two threads at once.
_TRANSFORMERS_IMPORT = threading.Lock()


def import_transformers() -> None:
    """Import what load_tokenizer needs (2 s, torch included), from any thread."""
    with _TRANSFORMERS_IMPORT:
        from transformers import AutoTokenizer  # noqa: F401


def load_tokenizer(folder: str):
    """A model folder's tokenizer, from any thread."""
    import_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


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
