"""KV-cache block manager: free-block queue, reference counts, prefix cache.

The KV cache is `num_blocks` blocks of `block_size` token slots. The block
manager only does bookkeeping on block ids; it never touches tensors and never
sees requests (the scheduler owns those and calls in with block ids).

Invariants:
- Every block is in exactly one of two states: in use (`ref_cnt > 0`) or in
  the free queue (`ref_cnt == 0`). So free + used == total, always.
- A block's `ref_cnt` equals the number of block tables holding it; `free`
  on a block with `ref_cnt == 0` is a double free and raises.
- The free queue is a doubly linked list: popping the head, appending and
  removing a block from the middle are all O(1).
- Prefix caching: a full block may carry `block_hash`, and `cached` maps each
  hash to at most one block. Freed blocks keep their hash and stay findable
  (lazy eviction) until `allocate` pops them for new data; only then is the
  hash dropped. A block with `ref_cnt > 0` is never evicted, since it is not
  in the free queue.
- Eviction order is the free-queue order: least recently freed first, and a
  request's blocks are freed tail first so its tail goes before its head.
- Block hashes come from `inference/block_hashing.py`; this file only
  compares them.
- With `record_events` on, every change to the set of cached hashes is
  appended to `events` (inference/kv_cache_events.py) in the order it
  happened; the engine core takes the list. Off, nothing is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.kv_cache_events import BlocksRemoved, BlocksStored, CacheCleared, KVCacheEvent


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    prev_free: Block | None = None
    next_free: Block | None = None


class FreeBlockQueue:
    """Doubly linked list of free blocks with sentinels; all ops O(1)."""

    def __init__(self, blocks: list[Block]) -> None:
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def append(self, block: Block) -> None:
        last = self._tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free += 1

    def remove(self, block: Block) -> None:
        if block.prev_free is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def popleft(self) -> Block:
        block = self._head.next_free
        if block is self._tail:
            raise RuntimeError("no free blocks")
        self.remove(block)
        return block

    def block_ids(self) -> list[int]:
        """Free block ids in eviction order (tests and debugging)."""
        ids, block = [], self._head.next_free
        while block is not self._tail:
            ids.append(block.block_id)
            block = block.next_free
        return ids


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 record_events: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, Block] = {}
        self.record_events = record_events
        self.events: list[KVCacheEvent] = []

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.free_queue.num_free

    def lookup(self, block_hashes: list[bytes]) -> list[int]:
        """Block ids of the longest cached prefix of `block_hashes`."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for block_hash in block_hashes:
            block = self.cached.get(block_hash)
            if block is None:
                break
            hits.append(block.block_id)
        return hits

    def num_blocks_to_acquire(self, block_ids: list[int]) -> int:
        """How many free blocks taking `block_ids` would use up (those not in use)."""
        return sum(1 for i in block_ids if self.blocks[i].ref_cnt == 0)

    def acquire(self, block_ids: list[int]) -> None:
        """Take a reference on existing blocks: cache hits, or a fork's shared blocks."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > self.free_queue.num_free:
            raise RuntimeError(f"asked for {num_blocks} blocks, {self.free_queue.num_free} free")
        block_ids = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            block_ids.append(block.block_id)
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference on each block, tail first (see eviction order)."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def copy_on_write(self, block_id: int) -> int:
        """Return a block the caller may write to in place of `block_id`.

        A shared block is left to its other holders and a fresh one returned;
        the caller must copy the KV data across before writing."""
        if self.blocks[block_id].ref_cnt == 1:
            return block_id
        [new_id] = self.allocate(1)
        self.free([block_id])
        return new_id

    def cache_blocks(self, block_ids: list[int], block_hashes: list[bytes], token_ids: list[int],
                     cache_salt: str | None = None, lora_name: str | None = None, lora_id: int | None = None) -> None:
        """Register full, computed blocks under their hashes: `block_ids` and
        `block_hashes` are a request's first blocks, `token_ids` its tokens
        (read only to record events)."""
        if not self.enable_prefix_caching:
            return
        run_start = None  # first block of the run of newly cached blocks, for one event per run
        for index, (block_id, block_hash) in enumerate(zip(block_ids, block_hashes)):
            block = self.blocks[block_id]
            if block.block_hash is None and block_hash not in self.cached:
                block.block_hash = block_hash
                self.cached[block_hash] = block
                if run_start is None:
                    run_start = index
                continue
            # Already cached, or another block holds the same data (keep the first).
            if run_start is not None and self.record_events:
                self._record_stored(block_hashes, run_start, index, token_ids, cache_salt, lora_name, lora_id)
            run_start = None
        if run_start is not None and self.record_events:
            self._record_stored(block_hashes, run_start, min(len(block_ids), len(block_hashes)), token_ids, cache_salt,
                                lora_name, lora_id)

    def _record_stored(self, block_hashes: list[bytes], start: int, stop: int, token_ids: list[int],
                       cache_salt: str | None, lora_name: str | None, lora_id: int | None) -> None:
        size = self.block_size
        self.events.append(BlocksStored(
            block_hashes[start:stop], block_hashes[start - 1] if start else None,
            token_ids[start * size : stop * size], start, cache_salt, lora_name, lora_id,
        ))

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
                if self.record_events:
                    self.events.append(BlocksRemoved([block.block_hash]))
            block.block_hash = None

    def reset_prefix_cache(self) -> None:
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()
        if self.record_events:
            self.events.append(CacheCleared())

    def take_events(self) -> list[KVCacheEvent]:
        events, self.events = self.events, []
        return events
