"""Publishes the engine's KV-cache events over ZeroMQ, off the engine's step.

    engine core, once a step:  publish(records)   put on a bounded queue, never waits
    publisher thread:          encode (inference/kv_events_wire.py), PUB send,
                               keep the last `buffer_steps` batches for replay,
                               answer replay requests on the ROUTER socket

The thread owns both sockets after start-up: ZeroMQ sockets are not
thread-safe, and the step must not wait on a subscriber. A full queue drops
the batch and counts its events in `num_dropped_events` (the
`pagedinfer_kv_events_dropped_total` metric); a slow subscriber past the
PUB socket's high-water mark loses messages inside ZeroMQ, and can ask for
them again by sequence number.

Replay, as vLLM's publisher answers it: a DEALER/REQ client sends one frame,
the 8-byte big-endian sequence number to start from; it gets every buffered
batch from there as (sequence, payload) frames, then (-1 as 8 signed bytes,
empty). Anything else is ignored and answered with nothing; a message over
MAX_REPLAY_REQUEST_BYTES makes ZeroMQ drop that peer.

Invariants: sequence numbers start at 0 and rise by one per batch sent, the
replay buffer holds them in order, and a batch holds one step's events in
the order the cache changed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

import msgspec
import zmq

from inference.kv_cache_events import KVCacheEvent
from inference.kv_events_config import KVEventsConfig
from inference.kv_events_wire import encode_batch

logger = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
MAX_REPLAY_REQUEST_BYTES = 64  # a request is one 8-byte frame
IDLE_POLL_S = 0.05  # how long the thread waits for a batch before looking at the replay socket
SHUTDOWN_TIMEOUT_S = 2.0


def binds(endpoint: str) -> bool:
    """vLLM's rule: wildcard and local endpoints are bound, the rest connected to."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def open_sockets(context: zmq.Context, config: KVEventsConfig) -> tuple[zmq.Socket, zmq.Socket | None]:
    """The PUB socket and the replay ROUTER socket (None without a replay
    endpoint). ValueError, naming the endpoint, if one cannot be opened."""
    pub = context.socket(zmq.PUB)
    replay = None
    endpoint = config.endpoint
    try:
        pub.setsockopt(zmq.SNDHWM, config.hwm)
        pub.setsockopt(zmq.LINGER, 0)
        (pub.bind if binds(endpoint) else pub.connect)(endpoint)
        if config.replay_endpoint is not None:
            endpoint = config.replay_endpoint
            replay = context.socket(zmq.ROUTER)
            replay.setsockopt(zmq.LINGER, 0)
            replay.setsockopt(zmq.MAXMSGSIZE, MAX_REPLAY_REQUEST_BYTES)
            replay.bind(endpoint)
    except zmq.ZMQError as exc:
        pub.close(linger=0)
        if replay is not None:
            replay.close(linger=0)
        raise ValueError(f"cannot open {endpoint}: {exc}") from None
    return pub, replay


class KVEventPublisher:
    def __init__(self, config: KVEventsConfig, block_size: int) -> None:
        self.block_size = block_size
        self.num_dropped_events = 0  # written by the engine's thread only
        self._topic = config.topic.encode()
        self._queue: queue.Queue[tuple[float, list[KVCacheEvent]] | None] = queue.Queue(config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._context = zmq.Context()
        # Opened here, so a bad endpoint fails the engine's start-up, not the thread.
        self._pub, self._replay = open_sockets(self._context, config)
        self._thread = threading.Thread(target=self._run, name="kv-events-publisher", daemon=True)
        self._thread.start()

    def publish(self, events: list[KVCacheEvent]) -> None:
        """Queue one step's events; never blocks (a full queue drops them)."""
        if not events:
            return
        try:
            self._queue.put_nowait((time.time(), events))
        except queue.Full:
            self.num_dropped_events += len(events)

    def shutdown(self) -> None:
        """Send what is queued (for up to SHUTDOWN_TIMEOUT_S), then close."""
        try:
            self._queue.put(None, timeout=SHUTDOWN_TIMEOUT_S)
        except queue.Full:
            pass
        self._thread.join(SHUTDOWN_TIMEOUT_S)
        if self._thread.is_alive():
            logger.warning("KV-event publisher did not stop in %.0f s; dropping what is left", SHUTDOWN_TIMEOUT_S)
            return  # the daemon thread still owns the sockets; the process exit closes them
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._context.term()

    # ---- the publisher thread ------------------------------------------------

    def _run(self) -> None:
        encoder = msgspec.msgpack.Encoder()
        seq = 0
        while True:
            if self._replay is not None:
                self._serve_replays()
            try:
                item = self._queue.get(timeout=IDLE_POLL_S)
            except queue.Empty:
                continue
            if item is None:
                return
            ts, events = item
            try:
                payload = encode_batch(encoder, ts, events, self.block_size)
                self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), zmq.NOBLOCK)
            except zmq.Again:
                pass  # past the high-water mark: ZeroMQ drops it; replay still has it
            except Exception:  # a bug here must not stop later batches
                logger.exception("publishing KV-cache events failed")
                continue
            self._buffer.append((seq, payload))
            seq += 1

    def _serve_replays(self) -> None:
        replay = self._replay
        while replay.poll(0):
            try:
                frames = replay.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            # [identity, start] from a DEALER, [identity, b"", start] from a REQ.
            identity, body = frames[0], frames[1:]
            envelope = [b""] if body[:1] == [b""] else []
            body = body[len(envelope):]
            if len(body) != 1 or len(body[0]) != 8:
                continue  # not a replay request: no answer
            start = int.from_bytes(body[0], "big")
            try:
                for seq, payload in self._buffer:
                    if seq >= start:
                        replay.send_multipart([identity, *envelope, seq.to_bytes(8, "big"), payload], zmq.NOBLOCK)
                replay.send_multipart([identity, *envelope, END_SEQ, b""], zmq.NOBLOCK)
            except zmq.ZMQError:
                continue  # the peer went away or its queue is full: it can ask again
