"""Prefix-cache block hashes, in vLLM's scheme so a router can recompute them.

A block's hash chains over its parent's: block i of a prompt is keyed by
hash(parent hash, its token ids, its extra keys), so equal hashes mean equal
prefixes. Two algorithms (`--prefix-caching-hash-algo`):

- `sha256_cbor` (the default): SHA-256 over the canonical CBOR encoding of
  the tuple `(parent_hash, tuple(token_ids), extra_keys)`, exactly as vLLM
  hashes blocks. The first block's parent is `NONE_HASH`, which is
  `sha256_cbor(PYTHONHASHSEED)` when that variable is set and 32 random bytes
  otherwise (vLLM does the same), so replicas and routers agree on hashes only
  when they share PYTHONHASHSEED. `extra_keys` is `(cache_salt,)` on the
  first block of a salted request and None elsewhere: the chain carries the
  salt on, as in vLLM. A request of a LoRA adapter puts the adapter's name
  first in every block's extra keys (`(lora_name, cache_salt)` on a salted
  first block), as vLLM does, so two adapters never share a block.
- `sha256`: pagedinfer's earlier scheme, SHA-256 over the parent hash, the
  salt and the token ids as int64; cheaper, but no router speaks it.

Invariants: a hasher is fixed for the life of the engine (hashes of
different algorithms or seeds never meet in one cache), and every hash is
32 bytes. A collision is negligible at this strength, so cache hits are not
re-verified against the tokens.
"""

from __future__ import annotations

import hashlib
import logging
import os
from array import array
from dataclasses import dataclass
from typing import Any

import cbor2

logger = logging.getLogger(__name__)

HASH_ALGOS = ("sha256_cbor", "sha256")
DEFAULT_HASH_ALGO = "sha256_cbor"


def sha256_cbor(value: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


def none_hash_from_env() -> bytes:
    """The first block's parent for `sha256_cbor`, from PYTHONHASHSEED."""
    seed = os.environ.get("PYTHONHASHSEED")
    if seed is None:
        logger.warning("PYTHONHASHSEED is not set: block hashes are random per process, "
                       "so no router or other replica can recompute them")
        return os.urandom(32)
    return sha256_cbor(seed)


def block_extra_keys(block_index: int, cache_salt: str | None, lora_name: str | None = None) -> tuple[Any, ...] | None:
    """vLLM's extra keys of one block: the adapter's name on every block, then
    the salt on the first block only; None when there is neither."""
    keys = ((lora_name,) if lora_name else ()) + ((cache_salt,) if block_index == 0 and cache_salt else ())
    return keys or None


@dataclass(slots=True)
class BlockHasher:
    algo: str  # one of HASH_ALGOS
    none_hash: bytes  # sha256_cbor's first parent; unused by sha256

    @classmethod
    def create(cls, algo: str = DEFAULT_HASH_ALGO) -> BlockHasher:
        if algo not in HASH_ALGOS:
            raise ValueError(f"prefix caching hash algorithm must be one of {HASH_ALGOS}, got {algo!r}")
        return cls(algo, none_hash_from_env() if algo == "sha256_cbor" else b"")

    def hash_block(self, parent_hash: bytes | None, token_ids: list[int], block_index: int,
                   cache_salt: str | None, lora_name: str | None = None) -> bytes:
        if self.algo == "sha256_cbor":
            extra_keys = block_extra_keys(block_index, cache_salt, lora_name)
            return sha256_cbor((parent_hash or self.none_hash, tuple(token_ids), extra_keys))
        h = hashlib.sha256(parent_hash or b"")
        if lora_name:
            h.update(b"lora:" + lora_name.encode())
        if cache_salt:
            h.update(cache_salt.encode())
        h.update(array("q", token_ids).tobytes())
        return h.digest()

    def hash_blocks(self, token_ids: list[int], block_size: int, cache_salt: str | None,
                    known: list[bytes] | None = None, lora_name: str | None = None) -> list[bytes]:
        """Chained hashes of every full block of `token_ids`, extending `known`."""
        hashes = list(known or [])
        for index in range(len(hashes), len(token_ids) // block_size):
            start = index * block_size
            parent = hashes[-1] if hashes else None
            hashes.append(self.hash_block(parent, token_ids[start : start + block_size], index, cache_salt, lora_name))
        return hashes
