"""KV snapshots without a browser: the offline LLM's, their wire form, their
invariants, and `--disable-console`."""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys

import pytest
from console_tools import snapshot_problems
from server_fixtures import REPO
from starlette.testclient import TestClient

from inference import LLM, SamplingParams
from inference.request_stream import EngineDeadError
from inference.async_snapshot import SharedSnapshotRequest
from inference.core_codec import Codec
from inference.core_protocol import CORE_OUTPUTS
from inference.kv_snapshot import kv_snapshot_json
from server.api_server import server_settings
from server.app import create_app
from server.cli import build_core, build_parser

BLOCK_SIZE = 8


def _block_manager_state(llm: LLM) -> tuple:
    bm = llm.engine.core.block_manager
    return ([b.ref_cnt for b in bm.blocks], [b.block_hash for b in bm.blocks], bm.free_queue.block_ids(),
            dict(bm.cached))


def test_offline_snapshot_matches_stats_and_reads_only(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), block_size=BLOCK_SIZE, num_kv_blocks=64, max_model_len=128)
    shared = list(range(300, 332))  # four full blocks both prompts start with
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm.engine.add_request("a", shared + [340, 341], params)
    for _ in range(3):
        llm.engine.step()
    llm.engine.add_request("b", shared + [350], params)
    seen_shared = False
    while llm.engine.has_unfinished_requests():
        before = _block_manager_state(llm)
        snapshot = llm.kv_snapshot()
        assert _block_manager_state(llm) == before, "taking a snapshot changed the block manager"
        stats = llm.stats()
        data = kv_snapshot_json(snapshot)
        assert snapshot_problems(data) == []
        assert data["num_used_blocks"] == stats.num_total_blocks - stats.num_free_blocks
        assert {r["request_id"] for r in data["requests"]} <= {"a", "b"}
        seen_shared |= data["num_shared_blocks"] == len(shared) // BLOCK_SIZE
        llm.engine.step()
    assert seen_shared, "the common prefix never showed as shared blocks"
    data = kv_snapshot_json(llm.kv_snapshot())
    assert data["num_used_blocks"] == 0 and data["requests"] == []
    assert data["num_cached_blocks"] >= len(shared) // BLOCK_SIZE  # freed, still holding the prefix


def test_snapshot_crosses_the_wire_unchanged(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), block_size=BLOCK_SIZE, num_kv_blocks=32, max_model_len=64)
    llm.engine.add_request("r", list(range(300, 310)), SamplingParams(max_tokens=4))
    llm.engine.step()
    snapshot = llm.kv_snapshot()
    codec = Codec(CORE_OUTPUTS)
    assert codec.decode(codec.encode(snapshot)) == snapshot
    data = kv_snapshot_json(snapshot)
    assert data["requests"][0]["block_table"] == llm.engine.scheduler.requests["r"].block_table
    assert all(h is None or len(h) == 8 for h in data["hashes"])


def test_disable_console_gives_404(tiny_llama_dir):
    # The app as `serve` builds it, without starting its engine (the lifespan
    # does not run): which routes exist does not depend on the engine.
    args = build_parser().parse_args(["serve", "--model", str(tiny_llama_dir), "--disable-console"])
    with_console = build_parser().parse_args(["serve", "--model", str(tiny_llama_dir)])
    for parsed, console_on in ((args, False), (with_console, True)):
        client = TestClient(create_app(server_settings(parsed), functools.partial(build_core, parsed)))
        for path in ("/", "/debug/kv", "/debug/kv/stream", "/debug/stats", "/static/console.js"):
            status = client.get(path).status_code
            assert (status != 404) == console_on, (path, status)


def test_snapshot_bench_runs():
    done = subprocess.run([sys.executable, "-m", "bench.kv_snapshot", "--num-blocks", "256", "--repeats", "5"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "take_kv_snapshot (core)" in done.stdout and "256 blocks" in done.stdout


def test_viewers_asking_together_share_one_core_request(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), block_size=BLOCK_SIZE, num_kv_blocks=16, max_model_len=64)
    snapshot = llm.kv_snapshot()

    async def run() -> None:
        pending, sent = SharedSnapshotRequest(), []
        waiters = [asyncio.ensure_future(pending.get(lambda: sent.append(1))) for _ in range(3)]
        await asyncio.sleep(0)
        assert sent == [1]  # one request to the core for three viewers
        waiters[0].cancel()  # one viewer leaving does not cancel the others' reply
        pending.resolve(snapshot)
        assert [await w for w in waiters[1:]] == [snapshot, snapshot]
        failing = asyncio.ensure_future(pending.get(lambda: sent.append(2)))
        await asyncio.sleep(0)
        pending.fail(EngineDeadError("core died"))
        with pytest.raises(EngineDeadError):
            await failing
        assert sent == [1, 2]

    asyncio.run(run())
