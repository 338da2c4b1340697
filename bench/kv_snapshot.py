"""Cost of a KV snapshot in the engine core, at 10,000 blocks.

    python -m bench.kv_snapshot [--num-blocks 10000] [--repeats 200]

What the core does when the console asks: `take_kv_snapshot` over a block
manager whose blocks are all in use by 64 requests, half of them full and
hashed, then encoding the reply for the socket. Both run on the engine's
loop between two steps, so their sum is what a snapshot costs the engine.
Turning the reply into JSON happens in the front end and is shown apart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from inference.block_manager import BlockManager
from inference.core_codec import Codec
from inference.core_protocol import CORE_OUTPUTS, EngineStats
from inference.kv_snapshot import kv_snapshot_json, take_kv_snapshot
from inference.request import Request, RequestStatus
from inference.sampling_params import SamplingParams

NUM_REQUESTS = 64
BLOCK_SIZE = 16


def _full_cache(num_blocks: int) -> tuple[BlockManager, list[Request]]:
    manager = BlockManager(num_blocks, BLOCK_SIZE)
    per_request = num_blocks // NUM_REQUESTS
    requests = []
    for i in range(NUM_REQUESTS):
        request = Request(f"cmpl-{i:032x}", f"cmpl-{i:032x}", 0, [1], SamplingParams(), (0,), 0.0,
                          status=RequestStatus.RUNNING)
        request.block_table = manager.allocate(per_request)
        request.num_computed_tokens = per_request * BLOCK_SIZE - 3
        half = request.block_table[: per_request // 2]
        manager.cache_blocks(half, [os.urandom(32) for _ in half], [0] * (len(half) * BLOCK_SIZE))
        requests.append(request)
    return manager, requests


def _ms(fn, repeats: int) -> str:
    """Median and p99 wall ms, and p99 CPU ms: on a shared box the wall-clock
    tail is the OS handing the CPU to someone else, which CPU time leaves out."""
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - started) * 1e3)
        cpu.append((time.process_time() - started_cpu) * 1e3)
    p99 = statistics.quantiles(wall, n=100)[98], statistics.quantiles(cpu, n=100)[98]
    return f"{statistics.median(wall):.3f} / {p99[0]:.3f} / {p99[1]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-blocks", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    manager, requests = _full_cache(args.num_blocks)
    stats = EngineStats(len(requests), 0, manager.num_blocks, manager.num_free_blocks, 1.0, 0.0, 0, 0, 0, 0)
    codec = Codec(CORE_OUTPUTS)
    snapshot = take_kv_snapshot(manager, requests, stats)
    take_ms = _ms(lambda: take_kv_snapshot(manager, requests, stats), args.repeats)
    encode_ms = _ms(lambda: codec.encode(take_kv_snapshot(manager, requests, stats)), args.repeats)
    json_ms = _ms(lambda: kv_snapshot_json(snapshot), args.repeats)
    print(f"{args.num_blocks} blocks, {NUM_REQUESTS} requests, {args.repeats} runs; "
          "ms: median wall / p99 wall / p99 CPU")
    print(f"  take_kv_snapshot (core)              {take_ms}")
    print(f"  take + encode for the socket (core)  {encode_ms}")
    print(f"  kv_snapshot_json (front end)         {json_ms}")
    print(f"  reply size {len(codec.encode(snapshot)) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
