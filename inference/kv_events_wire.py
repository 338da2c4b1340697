"""vLLM's KV-cache event wire format (vllm/distributed/kv_events.py), as msgspec structs.

One ZeroMQ message per engine step that changed the cache:

    frame 0  topic (bytes of the configured topic)
    frame 1  sequence number, 8 bytes big-endian, +1 per batch from 0
    frame 2  msgpack KVEventBatch: [ts, [event, ...], data_parallel_rank]

Every struct is array-like (positional) and every event is tagged with its
class name as the first element. Trailing optional fields that say nothing
are left off, which vLLM's own decoders accept (those fields have defaults);
msgspec's omit_defaults does not trim array-like structs, so a BlockStored
whose blocks carry extra keys is a struct of its own, one field longer. A
`BlockStored` is

    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
     lora_id, medium, lora_name(, extra_keys)]

and a batch is always [ts, events, 0]: vLLM's EventBatch with one
data-parallel rank, named.

Positional, not vLLM's newer map encoding: llm-d's indexer decodes arrays
in every version, maps only in its newest. Its older decoders also want the
exact field count they know (seven for `BlockStored`, two for
`BlockRemoved`, three for a batch), so the newer optional fields are sent
only when they say something: vLLM's later `group_idx` and KV-cache spec
fields are never sent (the engine has one full-attention group, which a
reader assumes when they are absent), and `extra_keys` only when a block of
the event has some.

Block hashes go out as vLLM does by default (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES):
the low 64 bits of the 32-byte hash read big-endian, as an unsigned int.
`extra_keys` holds one entry per block of the event: the tuple that
sha256_cbor puts into its hash (`(cache_salt,)` on a salted prefix's first
block), or None. `medium` is "GPU", vLLM's name for the engine's own KV
pool, on any device: routers score that tier as the live cache.
"""

from __future__ import annotations

from typing import Any

import msgspec

from inference.block_hashing import block_extra_keys
from inference.kv_cache_events import BlocksRemoved, BlocksStored, KVCacheEvent

MEDIUM = "GPU"
DATA_PARALLEL_RANK = 0


class EventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int


class KVCacheEventStruct(msgspec.Struct, array_like=True, gc=False, tag=True):
    """Base of the tagged events (the tag is the class name)."""


class BlockStored(KVCacheEventStruct):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockStoredWithExtraKeys(BlockStored, tag="BlockStored"):
    """A BlockStored whose blocks carry extra keys: the same event, one field longer."""

    extra_keys: list[tuple[Any, ...] | None]


class BlockRemoved(KVCacheEventStruct):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEventStruct):
    pass


def external_hash(block_hash: bytes) -> int:
    return int.from_bytes(block_hash[-8:], "big")


def to_wire(event: KVCacheEvent, block_size: int) -> BlockStored | BlockRemoved | AllBlocksCleared:
    if isinstance(event, BlocksStored):
        first = event.first_block_index
        fields = ([external_hash(h) for h in event.block_hashes],
                  None if event.parent_block_hash is None else external_hash(event.parent_block_hash),
                  event.token_ids, block_size, event.lora_id, MEDIUM, event.lora_name)
        extra_keys = [block_extra_keys(first + i, event.cache_salt, event.lora_name)
                      for i in range(len(event.block_hashes))]
        if any(keys is not None for keys in extra_keys):
            return BlockStoredWithExtraKeys(*fields, extra_keys)
        return BlockStored(*fields)
    if isinstance(event, BlocksRemoved):
        return BlockRemoved([external_hash(h) for h in event.block_hashes], MEDIUM)
    return AllBlocksCleared()


def encode_batch(encoder: msgspec.msgpack.Encoder, ts: float, events: list[KVCacheEvent], block_size: int) -> bytes:
    """One KVEventBatch payload: [ts, [event, ...], data_parallel_rank]."""
    return encoder.encode(EventBatch(ts, [to_wire(e, block_size) for e in events], DATA_PARALLEL_RANK))
