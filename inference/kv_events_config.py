"""`--kv-events-config`: vLLM's KVEventsConfig, the same JSON fields and defaults.

    {"enable_kv_cache_events": true, "publisher": "zmq",
     "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558",
     "buffer_steps": 10000, "hwm": 100000, "max_queue_size": 100000,
     "topic": "kv@pod-0@model"}

`publisher` defaults to "zmq" when events are enabled, else "null". An
endpoint with `*`, `::`, `ipc://` or `inproc://` is bound; any other is
connected to (a router that binds one socket for the whole fleet), as
vLLM's publisher does. Parsing only checks shapes; whether an endpoint can
be bound is checked by the server at start-up (server/cli.py).

Invariant: a parsed config is valid, so the engine core never fails on it
later except for a bind that someone else won in between.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.json_config import parse_object

PUBLISHERS = ("zmq", "null")


@dataclass(slots=True)
class KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str | None = None  # one of PUBLISHERS; None: "zmq" if enabled, else "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # ZeroMQ high-water mark of the PUB socket
    max_queue_size: int = 100_000  # batches waiting for the publisher thread; past it they are dropped
    topic: str = ""

    def __post_init__(self) -> None:
        if self.publisher is None:
            self.publisher = "zmq" if self.enable_kv_cache_events else "null"

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"

    @classmethod
    def from_json(cls, text: str) -> KVEventsConfig:
        """Parse and check the flag's JSON; ValueError says what is wrong."""
        raw = parse_object(text, cls)
        checks = {
            "enable_kv_cache_events": lambda v: isinstance(v, bool),
            "publisher": lambda v: v is None or v in PUBLISHERS,
            "endpoint": lambda v: isinstance(v, str) and "://" in v,
            "replay_endpoint": lambda v: v is None or (isinstance(v, str) and "://" in v),
            "buffer_steps": lambda v: _is_count(v, 1),
            "hwm": lambda v: _is_count(v, 0),
            "max_queue_size": lambda v: _is_count(v, 1),
            "topic": lambda v: isinstance(v, str),
        }
        for name, value in raw.items():
            if not checks[name](value):
                raise ValueError(f"bad {name}: {value!r} ({_expected(name)})")
        return cls(**raw)


def _is_count(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _expected(name: str) -> str:
    return {
        "enable_kv_cache_events": "true or false",
        "publisher": f"one of {list(PUBLISHERS)}",
        "endpoint": "a ZeroMQ address such as tcp://*:5557",
        "replay_endpoint": "a ZeroMQ address or null",
        "buffer_steps": "an integer >= 1",
        "hwm": "an integer >= 0",
        "max_queue_size": "an integer >= 1",
        "topic": "a string",
    }[name]
