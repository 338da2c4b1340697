"""What happened to the prefix cache, as plain records (no wire format here).

The block manager appends these to its `events` list while the scheduler
drives it, when `record_events` is on; the engine core takes the list once
per step (and after a cache reset) and hands it to the publisher
(`inference/kv_events_publisher.py`), which puts it in vLLM's wire format.
Nothing here calls anyone back, so the scheduler and block manager stay pure
bookkeeping.

Invariants:
- Records are in the order the cache changed, so replaying them from an
  empty cache gives exactly the set of hashes in `BlockManager.cached`.
- A hash is stored at most once until it is removed: a block whose hash
  another block already holds is not cached again, and is not announced.
- `BlocksStored` covers consecutive blocks of one request: block i of the
  record is block `first_block_index + i` of that request's prefix, and its
  parent is the hash of the block before (None for a prefix's first block).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class BlocksStored:
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]  # block_size per block, in order
    first_block_index: int  # position of the first block in its prefix (the salt goes in block 0)
    cache_salt: str | None
    lora_name: str | None = None  # the LoRA adapter whose KV these blocks hold (its name is in every hash)
    lora_id: int | None = None


@dataclass(slots=True)
class BlocksRemoved:
    block_hashes: list[bytes]


@dataclass(slots=True)
class CacheCleared:
    pass


KVCacheEvent = BlocksStored | BlocksRemoved | CacheCleared
