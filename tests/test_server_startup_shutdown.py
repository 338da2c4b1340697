"""`pagedinfer serve` from outside, at the edges of its life, on the tiny Llama.

While the model loads, /ready and requests answer 503. `--kv-cache-memory`
sizes the KV pool. Prompts reach the log only with `--log-prompts`. On
SIGTERM, work that outlasts `--shutdown-timeout` is aborted (each stream ends
with an error event, none is cut off) and the exit is still 0; a second
SIGTERM ends the drain at once, the same way. A model that cannot load makes
`serve` exit 1 with a line that says why. The start-up's phases are logged
in one line and exported, and the front end never imports torch.

A private server and the shared tiny one (tests/test_server_sampling_fields.py
uses it too), one request running at a time so that queued work outlasts a
drain; the test that signals a server runs last of those that use it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_fixtures import (
    launch_server, shared_server, spawned_children, sse_events, tiny_server_args, wait_gone, wait_ready,
)
from test_engine import float32_block_bytes

from server.api_server import CLOSE_TIMEOUT_S

pytestmark = pytest.mark.slow

C = "/v1/completions"
ABORTED = "Generation failed: the server shut down before the request finished"
# Streams of these run one after the other, for about a second each: more than a drain of DRAIN_S.
LONG = {"prompt": "Once", "max_tokens": 1000, "ignore_eos": True, "stream": True}
NUM_STREAMS = 4
DRAIN_S = 0.5
KV_BLOCKS = 100


@pytest.fixture(scope="module")
def loading(tiny_llama_chat_dir):
    """A server with --log-prompts and a short drain, and its replies to
    completions sent while /ready answered 503."""
    # KV_BLOCKS blocks, the scratch block, and half a block that makes no block.
    per_block = float32_block_bytes(tiny_llama_chat_dir)
    budget = (KV_BLOCKS + 1) * per_block + per_block // 2
    server = launch_server("--model", str(tiny_llama_chat_dir), "--max-model-len", "1024", "--max-num-seqs", "1",
                           "--log-prompts", "--shutdown-timeout", str(DRAIN_S), "--kv-cache-memory", str(budget))
    seen: list[httpx.Response] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.process.poll() is None:
            try:
                if httpx.get(f"{server.base_url}/ready", timeout=2).status_code != 503:
                    break
                reply = httpx.post(f"{server.base_url}{C}", json={"prompt": "Hi"}, timeout=2)
                # Kept if still loading after it: loading -> ready happens once.
                if httpx.get(f"{server.base_url}/ready", timeout=2).status_code == 503:
                    seen.append(reply)
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.2)
        wait_ready(server)
        yield server, seen
    finally:
        server.stop()


@pytest.fixture(scope="module")
def quiet(tiny_llama_chat_dir):
    """The shared tiny server: no --log-prompts, a 60 s drain."""
    return shared_server(*tiny_server_args(tiny_llama_chat_dir))


def test_ready_and_requests_answer_503_while_the_model_loads(loading):
    _, seen = loading
    # The app listens before the engine core has even imported torch.
    assert seen, "never reached the server before it was ready"
    for reply in seen:
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "model_loading", reply.text
        assert reply.headers["Retry-After"] == "5"


def test_kv_cache_memory_sizes_the_pool(loading):
    server, _ = loading
    assert server.metrics()["pagedinfer_kv_cache_total_blocks"] == KV_BLOCKS


def test_startup_phases_are_logged_and_exported(loading):
    server, _ = loading
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    phases = {}
    for line in text.splitlines():
        if line.startswith("pagedinfer_startup_seconds{"):
            phases[line.split('phase="')[1].split('"')[0]] = float(line.split()[-1])
    for phase in ("frontend_imports", "core_spawn_imports", "config", "tokenizer", "cpu_kernels", "weights",
                  "kv_cache", "warmup", "frontend_tokenizer", "total"):
        assert phases.get(phase, -1) >= 0, (phase, phases)
    # Sequential on the core's side, so their sum fits in the whole; the
    # interpreter and torch dominate, and they take real time.
    core = ("core_spawn_imports", "config", "tokenizer", "cpu_kernels", "weights", "kv_cache", "warmup")
    assert phases["core_spawn_imports"] > 0.2 and sum(phases[p] for p in core) < phases["total"]
    # The engine config's share counts too: its first AutoConfig imports the model's config class.
    assert phases["config"] > 0.05
    # serve's engine threads are measured by default, and the pick is logged with its timings.
    assert phases.get("cpu_threads", -1) >= 0, phases
    assert "engine threads: " in server.log_tail(100_000)
    line = next(line for line in server.log_tail(100_000).splitlines() if " start-up " in line)
    assert f"start-up {phases['total']:.2f} s: frontend_imports" in line and "GB/s" in line, line


def test_the_front_end_imports_no_torch():
    """The HTTP process never holds a tensor, and start-up should not pay for torch twice."""
    code = ("import sys, server.api_server, server.cli; "
            "print(sorted(m for m in ('torch', 'xgrammar', 'numpy') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]", found


def chat_and_complete(server, marker: str) -> None:
    """A chat, a completion and a refused completion, each carrying `marker`."""
    with server.client() as client:
        chat = client.post("/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": f"chat {marker}"}], "max_tokens": 2})
        completion = client.post(C, json={"prompt": f"completion {marker}", "max_tokens": 2})
        too_long = client.post(C, json={"prompt": f"refused {marker} " + "x" * 2000})
    assert (chat.status_code, completion.status_code, too_long.status_code) == (200, 200, 400)


def test_log_prompts_logs_them(loading):
    server, _ = loading
    chat_and_complete(server, "walrus-7")
    log = server.log_tail(100_000)
    assert "chat walrus-7" in log and "completion walrus-7" in log


def test_prompts_stay_out_of_the_log(quiet):
    chat_and_complete(quiet, "narwhal-9")
    assert "narwhal-9" not in quiet.log_tail(1_000_000)


class Streams:
    """LONG streams on threads, all admitted (one running, the others queued)
    when the constructor returns; `events[i]` holds stream i's events once it ended."""

    def __init__(self, server, count: int) -> None:
        self.events: dict[int, list[dict]] = {}
        self.admitted = threading.Semaphore(0)
        self.streaming = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(server, i)) for i in range(count)]
        for thread in self.threads:
            thread.start()
        for _ in self.threads:
            assert self.admitted.acquire(timeout=60), "a stream was not admitted"
        assert self.streaming.wait(60), "no stream started"

    def _run(self, server, index: int) -> None:
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            with client.stream("POST", C, json=LONG) as response:
                if response.status_code == 200:
                    self.admitted.release()
                lines = []
                for line in response.iter_lines():
                    lines.append(line)
                    self.streaming.set()
                self.events[index] = sse_events(lines)  # asserts the stream ended with [DONE]

    def join(self) -> list[list[dict]]:
        for thread in self.threads:
            thread.join(timeout=60)
        assert len(self.events) == len(self.threads), "a stream was cut off"
        return list(self.events.values())


def aborted(events: list[dict]) -> bool:
    return "error" in events[-1] and events[-1]["error"]["message"] == ABORTED


def check_clean_exit(server, core_pid: int, within_s: float, signalled: float) -> None:
    assert server.process.wait(timeout=60) == 0, server.log_tail()
    assert time.monotonic() - signalled < within_s
    wait_gone([core_pid], timeout=5)
    assert "Traceback" not in server.log_tail(1_000_000)


def test_work_past_the_drain_deadline_is_aborted_and_the_exit_is_clean(loading):
    server, _ = loading
    [core_pid] = spawned_children(server.process.pid)
    streams = Streams(server, NUM_STREAMS)
    server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    results = streams.join()
    # Aborted at the deadline, not when uvicorn gives up on the open
    # connections CLOSE_TIMEOUT_S later.
    check_clean_exit(server, core_pid, DRAIN_S + CLOSE_TIMEOUT_S, signalled)
    assert any(aborted(events) for events in results)
    assert "drain done (0 requests" not in server.log_tail(100_000)


def test_a_second_sigterm_ends_the_drain_at_once(quiet):
    [core_pid] = spawned_children(quiet.process.pid)
    streams = Streams(quiet, NUM_STREAMS)
    quiet.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert httpx.get(f"{quiet.base_url}/ready", timeout=5).status_code == 503  # draining, 60 s to go
    quiet.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    results = streams.join()
    check_clean_exit(quiet, core_pid, CLOSE_TIMEOUT_S, signalled)
    assert sum(aborted(events) for events in results) >= NUM_STREAMS - 1  # one may have finished in the 0.5 s


def test_serve_exits_1_saying_why_when_the_model_cannot_load(tiny_llama_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    server = launch_server("--model", str(folder), "--num-kv-blocks", "16")
    try:
        assert server.process.wait(timeout=120) == 1
        log = server.log_tail(100_000)
        assert "the engine failed to start: ValueError(" in log and "model.safetensors: corrupt" in log, log
    finally:
        server.stop()
