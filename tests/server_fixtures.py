"""Real `pagedinfer serve` processes for the server tests.

A server with the default SmolLM2 takes seconds to load, so processes are
shared: `shared_server(...)` starts one per distinct argument list for the
whole test session (test modules wrap it in a module fixture) and stops it at
exit. `start_server` gives a private process for tests that end it.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
API_KEY = "sk-test-key"
# Small enough for CPU runs; 512 blocks of 16 tokens hold 64 requests of 128 tokens.
MAIN_SERVER_ARGS = (
    "--max-model-len", "256", "--num-kv-blocks", "512", "--max-num-seqs", "64",
    "--api-key", API_KEY, "--max-request-bytes", str(1024 * 1024),
)
# Structured-output and tool tests: room for a tools system prompt and 64 concurrent replies.
STRUCTURED_SERVER_ARGS = (
    "--max-model-len", "1024", "--num-kv-blocks", "1024", "--max-num-seqs", "64", "--api-key", API_KEY,
)
READY_TIMEOUT_S = 240


def tiny_server_args(model_dir) -> tuple[str, ...]:
    """The shared tiny-model server's: one request at a time, so that queued
    requests show the scheduler's order and outlast a drain."""
    return ("--model", str(model_dir), "--max-model-len", "1024", "--num-kv-blocks", "128", "--max-num-seqs", "1",
            "--shutdown-timeout", "60")


@dataclass
class ServerProcess:
    process: subprocess.Popen
    base_url: str
    log_path: Path
    api_key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=120, **kwargs)

    def async_client(self, **kwargs) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=120, **kwargs)

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def metrics(self) -> dict[str, float]:
        """Samples of GET /metrics with no label but model_name, by name."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if set(sample.labels) <= {"model_name"}
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def terminate(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM a peer process (Prometheus, Jaeger), SIGKILL if it lingers past `timeout` s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Start `pagedinfer serve` on a free port and wait for /ready; `env`
    adds to this process's environment.

    float32 unless the args say otherwise: tests compare the server's greedy
    tokens with offline runs and transformers, which a bfloat16 default (on a
    CPU with native bf16) would make batch-dependent."""
    server = launch_server(*args, env=env)
    wait_ready(server)
    return server


def launch_server(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """`start_server` without the wait: for tests of what it answers while loading."""
    if "--dtype" not in args:
        args = ("--dtype", "float32", *args)
    port = free_port()
    api_key = args[args.index("--api-key") + 1] if "--api-key" in args else None
    log = tempfile.NamedTemporaryFile(prefix="pagedinfer-serve-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})})
    return ServerProcess(process, f"http://127.0.0.1:{port}", Path(log.name), api_key)


def wait_ready(server: ServerProcess) -> None:
    """Wait until /ready answers 200; stop the server and raise if it exits or takes too long."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S} s:\n{server.log_tail()}")


_shared: dict[tuple[str, ...], ServerProcess] = {}


def shared_server(*args: str) -> ServerProcess:
    """One server per argument list for the session; the default is the main
    server (with an API key) that most tests use."""
    args = args or MAIN_SERVER_ARGS
    server = _shared.get(args)
    if server is None or server.process.poll() is not None:
        server = start_server(*args)
        _shared[args] = server
        atexit.register(server.stop)
    return server


def sse_events(lines) -> list[dict]:
    """JSON payloads of a server-sent event stream; asserts it ends with [DONE]."""
    events, done = [], False
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected line {line!r}"
            continue
        assert not done, "data after [DONE]"
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    assert done, "stream did not end with data: [DONE]"
    return events


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def spawned_children(pid: int) -> list[int]:
    """The multiprocessing-spawned children (not multiprocessing's resource tracker)."""
    return [c for c in children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0) until its parent reaps it.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")


def wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"left behind: {[p for p in pids if not gone(p)]}"
        time.sleep(0.05)


async def kill_mid_stream(server: ServerProcess, pid: int, max_wait_s: float) -> tuple[list[dict], float]:
    """SIGKILL `pid` once a long completion stream has started; return that
    stream's events and how long /health took to answer 503 (asserted under
    `max_wait_s`)."""
    async with server.async_client() as client:
        assert (await client.get("/health")).status_code == 200
        body = {"prompt": "Write a long story:", "max_tokens": 200, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = []
            async for line in response.aiter_lines():
                lines.append(line)
                if len(lines) == 1:
                    os.kill(pid, signal.SIGKILL)
                    killed = time.monotonic()
        health = await client.get("/health")
        while health.status_code != 503:
            assert time.monotonic() - killed < max_wait_s, f"/health still 200 {max_wait_s} s after the kill"
            await asyncio.sleep(0.05)
            health = await client.get("/health")
        return sse_events(lines), time.monotonic() - killed
