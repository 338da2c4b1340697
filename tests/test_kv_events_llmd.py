"""llm-d's own KV-cache indexer, fed by two running servers, names the server that holds a prefix.

The consumer is tests/tools/kvindexer: a small Go program around llm-d's
event pool and block index (github.com/llm-d/llm-d-kv-cache-manager v0.5.0,
pinned in its go.mod, with libzmq from Debian), built once and cached by
go_tools. It subscribes to both servers' PUB sockets on the topics
kv@replica-a@tiny and kv@replica-b@tiny, decodes the batches with llm-d's
msgpack structs, indexes the blocks by the token ids they carry, and scores
a request with llm-d's longest-prefix rule: one point per leading block a
server holds. Sending a prefix to one server must make that server, and only
it, score every full block of the prefix, as llm-d's router would pick it.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from ci_tools import missing
from go_tools import go_tool
from server_fixtures import ServerProcess, free_port, start_server

BLOCK_SIZE = 16
MODEL = "tiny"
REPLICAS = ("replica-a", "replica-b")
INDEX_TIMEOUT_S = 20


def _require_libzmq() -> None:
    if shutil.which("pkg-config") is None or subprocess.run(["pkg-config", "--exists", "libzmq"]).returncode:
        missing("libzmq's development files are missing (apt-get install libzmq3-dev pkg-config; `make test` does)")


@pytest.fixture(scope="module")
def fleet(tiny_llama_dir) -> Iterator[tuple[dict[str, ServerProcess], str]]:
    """({replica name: server}, the indexer's base URL)."""
    _require_libzmq()
    binary = go_tool("kvindexer")
    servers: dict[str, ServerProcess] = {}
    pub_ports = {name: free_port() for name in REPLICAS}
    indexer = None
    try:
        for name in REPLICAS:
            config = ('{"enable_kv_cache_events": true, "publisher": "zmq", '
                      f'"endpoint": "tcp://*:{pub_ports[name]}", "topic": "kv@{name}@{MODEL}"}}')
            servers[name] = start_server(
                "--model", str(tiny_llama_dir), "--served-model-name", MODEL, "--block-size", str(BLOCK_SIZE),
                "--max-model-len", "256", "--max-num-seqs", "8", "--kv-events-config", config,
                env={"PYTHONHASHSEED": "4242"},
            )
        port = free_port()
        indexer = subprocess.Popen(
            [str(binary), "-listen", f"127.0.0.1:{port}", "-block-size", str(BLOCK_SIZE),
             *(arg for name in REPLICAS for arg in ("-pod", f"{name}=tcp://127.0.0.1:{pub_ports[name]}"))],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert indexer.poll() is None, f"kvindexer exited: {indexer.stderr.read()[-4000:]}"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "kvindexer never answered /healthz"
            time.sleep(0.1)
        for name in REPLICAS:
            _wait_until_subscribed(servers[name], name, url)
        yield servers, url
    finally:
        if indexer is not None:
            indexer.terminate()
            indexer.wait(timeout=10)
        for server in servers.values():
            server.stop()


def complete(server: ServerProcess, prompt: list[int]) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    with server.client() as client:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text


def scores(url: str, token_ids: list[int]) -> dict[str, float]:
    response = httpx.post(f"{url}/score", json={"model": MODEL, "token_ids": token_ids}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["scores"]


def _wait_until_subscribed(server: ServerProcess, name: str, url: str) -> None:
    """A SUB socket hears nothing sent before it connected: send fresh prefixes
    until one reaches the index."""
    rng = random.Random(f"probe-{name}")
    deadline = time.monotonic() + INDEX_TIMEOUT_S
    while time.monotonic() < deadline:
        probe = [rng.randrange(256) for _ in range(2 * BLOCK_SIZE)]
        complete(server, probe)
        for _ in range(10):
            if scores(url, probe).get(name):
                return
            time.sleep(0.1)
    pytest.fail(f"llm-d's indexer never indexed a block of {name}:\n{server.log_tail()}")


def wait_for_scores(url: str, token_ids: list[int], expected: dict[str, float]) -> None:
    deadline = time.monotonic() + INDEX_TIMEOUT_S
    while (found := scores(url, token_ids)) != expected:
        assert time.monotonic() < deadline, f"llm-d's indexer scored {found}, expected {expected}"
        time.sleep(0.1)


def test_the_indexer_names_the_server_that_holds_a_prefix(fleet):
    servers, url = fleet
    rng = random.Random(7)
    prefixes = {name: [rng.randrange(256) for _ in range(4 * BLOCK_SIZE + 5)] for name in REPLICAS}
    for name, prefix in prefixes.items():
        complete(servers[name], prefix)
    for name, prefix in prefixes.items():
        # A new request sharing the prefix: its first four blocks are held by
        # the server that ran the prefix, and by no other.
        request = prefix[: 4 * BLOCK_SIZE] + [rng.randrange(256) for _ in range(40)]
        wait_for_scores(url, request, {name: 4})
    unseen = [rng.randrange(256) for _ in range(3 * BLOCK_SIZE)]
    assert scores(url, unseen) == {}


def test_a_longer_shared_prefix_scores_higher_on_its_server(fleet):
    servers, url = fleet
    rng = random.Random(8)
    base = [rng.randrange(256) for _ in range(2 * BLOCK_SIZE)]
    longer = base + [rng.randrange(256) for _ in range(3 * BLOCK_SIZE)]
    complete(servers["replica-a"], base)
    complete(servers["replica-b"], longer)
    # Both hold the two blocks of `base`; only replica-b holds the next three.
    wait_for_scores(url, longer + [1, 2, 3], {"replica-a": 2, "replica-b": 5})
