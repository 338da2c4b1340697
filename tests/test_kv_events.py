"""KV-cache events in vLLM's wire format, read by a subscriber that knows only that format.

One server on the tiny model with a small pool (24 blocks of 16 tokens) and
events on. The subscriber decodes with msgspec structs written here from
vLLM's kv_events.py (not imported from pagedinfer), rebuilds the set of
cached block hashes from the events alone, and after each phase (prefix
hits, eviction, preemption, a reset) that set must equal the engine's own,
read from /debug/kv (whose short hashes are the low 32 bits of the events'
64-bit ones). The hashes are recomputed here by an independent sha256_cbor
chain, salted and not. Replay must return the batches a subscriber missed,
and garbage sent to the replay socket gets no answer and hurts nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cbor2
import httpx
import msgspec
import pytest
import zmq
from server_fixtures import API_KEY, ServerProcess, free_port, start_server

SEED = "4242"  # the server's PYTHONHASHSEED
BLOCK_SIZE = 16
NUM_BLOCKS = 24
TOPIC = "kv@pod-0@tiny"
CONSISTENT_TIMEOUT_S = 15


# ---- vLLM's format, written from vllm/distributed/kv_events.py -------------------

class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


DECODER = msgspec.msgpack.Decoder(KVEventBatch)


# ---- vLLM's hashing, written from vllm/v1/core/kv_cache_utils.py -----------------

def sha256_cbor(value: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


def expected_hashes(token_ids: list[int], cache_salt: str | None = None) -> list[int]:
    """The event hashes of a prompt's full blocks: NONE_HASH = sha256_cbor(seed)
    as first parent, the salt in block 0's extra keys, then int & (2**64 - 1)."""
    parent, hashes = sha256_cbor(SEED), []
    for start in range(0, len(token_ids) - BLOCK_SIZE + 1, BLOCK_SIZE):
        extra_keys = (cache_salt,) if start == 0 and cache_salt else None
        parent = sha256_cbor((parent, tuple(token_ids[start : start + BLOCK_SIZE]), extra_keys))
        hashes.append(int.from_bytes(parent, "big") & (2**64 - 1))
    return hashes


# ---- a subscriber --------------------------------------------------------------

class Subscriber:
    """Collects every batch on a thread of its own: seq -> (raw payload, batch)."""

    def __init__(self, endpoint: str) -> None:
        self.batches: dict[int, tuple[bytes, KVEventBatch]] = {}
        self.topics: set[bytes] = set()
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
        self._socket.connect(endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.5)  # a SUB socket hears nothing published before its subscription arrives

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._socket.poll(50):
                topic, seq, payload = self._socket.recv_multipart()
                self.topics.add(topic)
                self.batches[int.from_bytes(seq, "big")] = (payload, DECODER.decode(payload))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close(linger=0)
        self._context.term()

    def events(self) -> list[Any]:
        seqs = sorted(self.batches)
        assert seqs == list(range(len(seqs))), f"sequence numbers not 0, 1, 2, ...: {seqs[:20]}"
        return [event for seq in seqs for event in self.batches[seq][1].events]

    def cached_hashes(self) -> set[int]:
        cached: set[int] = set()
        for event in self.events():
            if isinstance(event, BlockStored):
                assert not cached & set(event.block_hashes), "a hash stored twice without a removal"
                cached.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                assert set(event.block_hashes) <= cached, "removal of a hash never stored"
                cached.difference_update(event.block_hashes)
            else:
                cached.clear()
        return cached


def replay(endpoint: str, start_seq: int) -> list[tuple[int, bytes]]:
    """Ask the replay socket as vLLM's subscribers do: [b"", start] from a DEALER."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart([b"", start_seq.to_bytes(8, "big")])
        replies = []
        while True:
            assert dealer.poll(10_000), "replay never sent its end marker"
            empty, seq, payload = dealer.recv_multipart()
            seq_value = int.from_bytes(seq, "big", signed=True)
            if seq_value == -1:
                assert empty == b"" and payload == b""
                return replies
            replies.append((seq_value, payload))
    finally:
        dealer.close(linger=0)
        context.term()


# ---- the server ----------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tiny_llama_dir):
    """(server, live subscriber, PUB endpoint, replay endpoint)."""
    pub_port, replay_port = free_port(), free_port()
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{pub_port}",
              "replay_endpoint": f"tcp://*:{replay_port}", "topic": TOPIC}
    server = start_server(
        "--model", str(tiny_llama_dir), "--num-kv-blocks", str(NUM_BLOCKS), "--block-size", str(BLOCK_SIZE),
        "--max-model-len", "256", "--max-num-seqs", "8", "--api-key", API_KEY, "--metrics-compat", "vllm",
        "--kv-events-config", json.dumps(config), env={"PYTHONHASHSEED": SEED},
    )
    endpoint, replay_endpoint = f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{replay_port}"
    subscriber = Subscriber(endpoint)
    try:
        yield server, subscriber, endpoint, replay_endpoint
    finally:
        subscriber.close()
        server.stop()


def complete(server: ServerProcess, prompt: list[int], max_tokens: int = 1, **extra: Any) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0, **extra}
    with server.client() as client:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def engine_hashes(server: ServerProcess) -> list[str]:
    """The engine's cached blocks, as /debug/kv shows them (8 hex digits each)."""
    with server.client() as client:
        snapshot = client.get("/debug/kv").json()
    return [h for h in snapshot["hashes"] if h is not None]


def assert_events_reproduce_cache(server: ServerProcess, subscriber: Subscriber) -> set[int]:
    """Publishing runs behind the step, so wait for the two to agree."""
    deadline = time.monotonic() + CONSISTENT_TIMEOUT_S
    while True:
        engine = engine_hashes(server)
        from_events = subscriber.cached_hashes()
        if sorted(engine) == sorted(f"{h & 0xFFFFFFFF:08x}" for h in from_events):
            return from_events
        assert time.monotonic() < deadline, (
            f"events say {len(from_events)} cached blocks, the engine {len(engine)}:\n{server.log_tail()}"
        )
        time.sleep(0.2)


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(256) for _ in range(n)]


def stored_events(subscriber: Subscriber) -> dict[int, tuple[BlockStored, int]]:
    """Every stored hash -> (its latest BlockStored event, its index in that event)."""
    found = {}
    for event in subscriber.events():
        if isinstance(event, BlockStored):
            for i, block_hash in enumerate(event.block_hashes):
                found[block_hash] = (event, i)
    return found


# ---- the phases, in order ---------------------------------------------------------

def test_prefix_hits(stack):
    server, subscriber, _, _ = stack
    rng = random.Random(0)
    prefix = tokens(rng, 64)
    complete(server, prefix)
    again = complete(server, prefix + tokens(rng, 20))
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 64
    cached = assert_events_reproduce_cache(server, subscriber)
    assert set(expected_hashes(prefix)) <= cached
    assert subscriber.topics == {TOPIC.encode()}


@pytest.mark.parametrize("cache_salt", [None, "tenant-a"])
def test_event_hashes_match_an_independent_sha256_cbor_chain(stack, cache_salt):
    server, subscriber, _, _ = stack
    prompt = tokens(random.Random(f"hash-{cache_salt}"), 50)
    complete(server, prompt, **({"cache_salt": cache_salt} if cache_salt else {}))
    assert_events_reproduce_cache(server, subscriber)
    expected = expected_hashes(prompt, cache_salt)
    assert len(expected) == 3
    stored = stored_events(subscriber)
    for index, block_hash in enumerate(expected):
        event, i = stored[block_hash]
        assert event.block_size == BLOCK_SIZE and event.medium == "GPU" and event.lora_id is None
        assert event.token_ids[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] == prompt[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]
        parent = expected[index - 1] if index else None
        assert (event.block_hashes[i - 1] if i else event.parent_block_hash) == parent
        extra_keys = event.extra_keys[i] if event.extra_keys is not None else None
        assert extra_keys == ((cache_salt,) if index == 0 and cache_salt else None)
    if cache_salt:
        assert not set(expected) & set(expected_hashes(prompt)), "the salt must change every block's hash"


def test_eviction_under_a_small_pool(stack):
    server, subscriber, _, _ = stack
    rng = random.Random(2)
    removed_before = sum(isinstance(e, BlockRemoved) for e in subscriber.events())
    for _ in range(6):  # 6 blocks each, 36 in all: more than the pool holds
        complete(server, tokens(rng, 96))
    assert_events_reproduce_cache(server, subscriber)
    assert sum(isinstance(e, BlockRemoved) for e in subscriber.events()) > removed_before


def test_preemption(stack):
    server, subscriber, _, _ = stack
    rng = random.Random(3)
    preempted_before = server.metrics()["pagedinfer_num_preemptions_total"]
    prompts = [tokens(rng, 48) for _ in range(6)]  # 6 requests of 11 blocks: the pool holds 2
    with ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(lambda p: complete(server, p, max_tokens=120), prompts))
    assert server.metrics()["pagedinfer_num_preemptions_total"] > preempted_before
    assert_events_reproduce_cache(server, subscriber)


def test_reset_clears_the_cache_and_says_so(stack):
    server, subscriber, _, _ = stack
    complete(server, tokens(random.Random(4), 40))
    assert assert_events_reproduce_cache(server, subscriber)
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        assert client.post("/reset_prefix_cache").status_code == 401  # the API key guards it
    with server.client() as client:
        assert client.post("/reset_prefix_cache").status_code == 200
    assert assert_events_reproduce_cache(server, subscriber) == set()
    assert isinstance(subscriber.events()[-1], AllBlocksCleared)


def test_replay_returns_the_missed_batches(stack):
    server, subscriber, endpoint, replay_endpoint = stack
    late = Subscriber(endpoint)
    complete(server, tokens(random.Random(5), 40))
    assert_events_reproduce_cache(server, subscriber)
    deadline = time.monotonic() + CONSISTENT_TIMEOUT_S
    while max(late.batches, default=-1) < max(subscriber.batches):
        assert time.monotonic() < deadline, "the late subscriber never caught up"
        time.sleep(0.1)
    last_seen = max(late.batches)
    late.close()
    for seed in (6, 7):  # batches the closed subscriber misses
        complete(server, tokens(random.Random(seed), 40))
    assert_events_reproduce_cache(server, subscriber)
    missed = replay(replay_endpoint, last_seen + 1)
    assert [seq for seq, _ in missed] == list(range(last_seen + 1, max(subscriber.batches) + 1))
    assert all(payload == subscriber.batches[seq][0] for seq, payload in missed)


def test_garbage_on_the_replay_socket_gets_nothing(stack):
    server, subscriber, _, replay_endpoint = stack
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(replay_endpoint)
    try:
        for frames in ([b""], [b"abc"], [b"", b"\x00" * 7], [b"", b"\x00" * 8, b"more"], [b"\xff" * 4096]):
            dealer.send_multipart(frames)
        assert not dealer.poll(1000), "the replay socket answered garbage"
    finally:
        dealer.close(linger=0)
        context.term()
    assert replay(replay_endpoint, 0)  # still answering, from the start of its buffer
    with server.client() as client:
        assert client.get("/health").status_code == 200
    complete(server, tokens(random.Random(8), 20))
    assert_events_reproduce_cache(server, subscriber)


def test_cache_config_info_and_dropped_events_metrics(stack):
    server = stack[0]
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    info = samples["vllm:cache_config_info"]
    assert info.value == 1
    assert info.labels["block_size"] == str(BLOCK_SIZE) and info.labels["num_gpu_blocks"] == str(NUM_BLOCKS)
    assert info.labels["prefix_caching_hash_algo"] == "sha256_cbor"
    assert samples["pagedinfer_kv_events_dropped_total"].value == 0
