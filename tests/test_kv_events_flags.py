"""Bad --kv-events-config and --prefix-caching-hash-algo stop `serve` before
anything loads: exit code 2 and one line saying what is wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import zmq
from server_fixtures import REPO, free_port

from inference.kv_events_config import KVEventsConfig


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "serve", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def events_flag(**fields) -> tuple[str, str]:
    return "--kv-events-config", json.dumps({"enable_kv_cache_events": True, **fields})


@pytest.mark.parametrize("args, words", [
    (("--kv-events-config", "{not json"), "not valid JSON"),
    (("--kv-events-config", "[1, 2]"), "must be a JSON object"),
    (events_flag(publisher="kafka"), "bad publisher"),
    (events_flag(hwm=-1), "bad hwm"),
    (events_flag(buffer_steps="many"), "bad buffer_steps"),
    (events_flag(endpoints="tcp://*:5557"), "unknown field"),
    (events_flag(endpoint="tcp://*:not-a-port"), "cannot open tcp://*:not-a-port"),
    (("--prefix-caching-hash-algo", "md5"), "unknown algorithm 'md5'"),
])
def test_bad_flag_exits_2_with_one_line(args, words):
    done = serve(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pagedinfer serve: error: argument --"), done.stderr
    assert words in lines[0], lines[0]


def test_endpoint_in_use_exits_2():
    port = free_port()
    context = zmq.Context()
    holder = context.socket(zmq.PUB)
    holder.bind(f"tcp://*:{port}")
    try:
        done = serve(*events_flag(endpoint=f"tcp://*:{free_port()}", replay_endpoint=f"tcp://*:{port}"))
    finally:
        holder.close(linger=0)
        context.term()
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert f"cannot open tcp://*:{port}" in line and "in use" in line, line


def test_config_defaults_are_vllms():
    config = KVEventsConfig.from_json('{"enable_kv_cache_events": true}')
    assert config == KVEventsConfig(True, "zmq", "tcp://*:5557", None, 10_000, 100_000, 100_000, "")
    assert config.enabled
    assert not KVEventsConfig.from_json('{"enable_kv_cache_events": true, "publisher": "null"}').enabled
    assert KVEventsConfig.from_json("{}").publisher == "null"
