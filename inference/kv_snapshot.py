"""A read-only picture of the KV cache: every block's state and who holds it.

`take_kv_snapshot` runs in the engine core between two steps, so it never
sees a half-updated block manager, and it only reads: the scheduler stays
the one writer of requests and blocks. It copies plain per-block columns
and each request's block table, nothing per (block, owner) pair, so its
cost is two list comprehensions over the blocks (see bench/kv_snapshot.py
for its cost at 10,000 blocks); turning that into JSON (`kv_snapshot_json`)
is the reader's work, off the engine's loop.

Invariants of a snapshot (the block manager's, seen at one instant):
- `ref_cnts[i]` equals the number of `requests` whose `block_table` holds
  block i;
- blocks with `ref_cnts[i] == 0` are free, and their number is
  `stats.num_free_blocks`; free + used == total;
- a free block whose `block_hashes[i]` is set still holds a cached prefix
  (evictable); an in-use block may carry a hash too (a full, shareable block).

The JSON (`GET /debug/kv` and each event of `GET /debug/kv/stream` add
"time", the Unix time it was sent):

    {
      "block_size": 16, "num_blocks": 512,
      "num_used_blocks": 37,      # ref_cnt > 0
      "num_cached_blocks": 120,   # free, still holding a cached prefix
      "num_shared_blocks": 16,    # ref_cnt > 1
      "ref_cnts": [0, 2, 1, ...],            # one per block id
      "hashes": [null, "9f3a61c2", ...],     # last 8 hex digits of the prefix hash, or null
      "requests": [                          # every request holding blocks: ids only, never text
        {"request_id": "cmpl-...", "block_table": [1, 2, 7], "num_computed_tokens": 40,
         "lora_name": "sql"}                 # its LoRA adapter, null for the base model
      ],
      "stats": {"num_running": 1, "num_waiting": 0, "num_total_blocks": 512, "num_free_blocks": 475,
                "kv_cache_usage": 0.072, "kv_waste_ratio": 0.17, "prefix_cache_hit_rate": 0.5,
                "num_preemptions": 0, ...}
    }

Block i of a request holds `min(block_size, num_computed_tokens - i * block_size)`
computed tokens (slots filled).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from inference.core_protocol import EngineStats, KVSnapshot, RequestBlocks

if TYPE_CHECKING:
    from inference.block_manager import BlockManager
    from inference.request import Request

# Enough to tell blocks apart on sight. The last digits, so that a block
# reads the same here as in the KV-cache events, which carry the hash's
# low 64 bits (inference/kv_events_wire.py).
HASH_HEX_DIGITS = 8


def take_kv_snapshot(block_manager: BlockManager, requests: Iterable[Request], stats: EngineStats) -> KVSnapshot:
    """Copy the block manager's state; reads only."""
    blocks = block_manager.blocks
    return KVSnapshot(
        block_size=block_manager.block_size,
        ref_cnts=[block.ref_cnt for block in blocks],
        block_hashes=[block.block_hash for block in blocks],
        requests=[
            RequestBlocks(request.request_id, list(request.block_table), request.num_computed_tokens,
                          request.lora_name)
            for request in requests
            if request.block_table
        ],
        stats=stats,
    )


def kv_snapshot_json(snapshot: KVSnapshot) -> dict[str, Any]:
    """The documented JSON form (see the module docstring)."""
    ref_cnts = snapshot.ref_cnts
    hashes = [None if h is None else h[-(HASH_HEX_DIGITS // 2) :].hex() for h in snapshot.block_hashes]
    stats = asdict(snapshot.stats)
    stats["prefix_cache_hit_rate"] = snapshot.stats.prefix_cache_hit_rate
    return {
        "block_size": snapshot.block_size,
        "num_blocks": len(ref_cnts),
        "num_used_blocks": sum(1 for count in ref_cnts if count),
        "num_cached_blocks": sum(1 for count, h in zip(ref_cnts, hashes) if not count and h is not None),
        "num_shared_blocks": sum(1 for count in ref_cnts if count > 1),
        "ref_cnts": ref_cnts,
        "hashes": hashes,
        # Not asdict(): it deep-copies every block table.
        "requests": [{"request_id": r.request_id, "block_table": r.block_table,
                      "num_computed_tokens": r.num_computed_tokens, "lora_name": r.lora_name}
                     for r in snapshot.requests],
        "stats": stats,
    }
