"""A request's KV blocks, as the scheduler hands them out, caches and takes back.

The scheduler's own part: only it calls these, so it alone still mutates
requests and the block manager (vLLM's scheduler has its KV-cache manager
the same way).

    lookup_prefix(request)     cached blocks a request being admitted can reuse
    allocate(request, ...)     blocks for its next tokens, or False with nothing changed
    free_uncomputed(request)   blocks past its computed tokens (only rejected drafts wrote them)
    cache_full_blocks(request) its computed full blocks, registered under their hashes
    share(leader, sample)      a sample of n > 1 starts on its leader's prompt blocks

Invariants:
- After `allocate(request, n)`, `block_table` holds exactly
  ceil((num_computed_tokens + n) / block_size) blocks, the block it writes
  first owned by it alone (copied on write when shared).
- Only full blocks of computed tokens are hashed and cached: a block that
  holds a rejected draft's KV, or a token not yet computed, never is.
- At most the last prompt token is recomputed on a prefix-cache hit, so the
  step that finishes the prompt has logits to sample from.
"""

from __future__ import annotations

from inference.block_hashing import BlockHasher
from inference.block_manager import BlockManager
from inference.request import Request


class RequestBlocks:
    def __init__(self, block_manager: BlockManager, block_size: int, enable_prefix_caching: bool,
                 hash_algo: str) -> None:
        self.block_manager = block_manager
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hasher = BlockHasher.create(hash_algo)

    def lookup_prefix(self, request: Request) -> list[int]:
        """Block ids of the cached prefix a request being admitted can reuse."""
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        request.block_hashes = self.hasher.hash_blocks(
            request.token_ids, self.block_size, request.cache_salt, request.block_hashes, request.lora_name
        )
        max_blocks = (request.num_tokens_target - 1) // self.block_size
        return self.block_manager.lookup(request.block_hashes[:max_blocks])

    def allocate(self, request: Request, num_new: int, copies: list[tuple[int, int]], hits: list[int] = ()) -> bool:
        """Give `request` the blocks for `num_new` more tokens (after the cached
        prefix `hits`, for a request being admitted); block copies the forward
        must make first go to `copies`. False if the pool cannot, in which case
        nothing changed."""
        bm = self.block_manager
        num_computed = len(hits) * self.block_size if hits else request.num_computed_tokens
        num_held = len(hits) if hits else len(request.block_table)
        num_fresh = max(-(-(num_computed + num_new) // self.block_size) - num_held, 0)
        write_index = num_computed // self.block_size
        shared_tail = (
            write_index < len(request.block_table)
            and bm.blocks[request.block_table[write_index]].ref_cnt > 1
        )
        if bm.num_blocks_to_acquire(hits) + num_fresh + shared_tail > bm.num_free_blocks:
            return False
        if hits:
            bm.acquire(hits)
            request.block_table = list(hits)
            request.num_computed_tokens = num_computed
        if shared_tail:
            src = request.block_table[write_index]
            dst = bm.copy_on_write(src)
            request.block_table[write_index] = dst
            copies.append((src, dst))
        request.block_table.extend(bm.allocate(num_fresh))
        return True

    def free_uncomputed(self, request: Request) -> None:
        """Give back the blocks past the computed tokens: only rejected drafts wrote them."""
        num_needed = -(-request.num_computed_tokens // self.block_size)
        if len(request.block_table) > num_needed:
            self.block_manager.free(request.block_table[num_needed:])
            del request.block_table[num_needed:]

    def cache_full_blocks(self, request: Request) -> None:
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        if num_full > len(request.block_hashes):
            request.block_hashes = self.hasher.hash_blocks(
                request.token_ids[: num_full * self.block_size], self.block_size,
                request.cache_salt, request.block_hashes, request.lora_name,
            )
        self.block_manager.cache_blocks(
            request.block_table[:num_full], request.block_hashes[:num_full], request.token_ids, request.cache_salt,
            request.lora_name, request.lora_id,
        )

    def share(self, leader: Request, sample: Request) -> None:
        """`sample` holds its leader's blocks too (one reference more each) and
        continues from the same computed tokens."""
        self.block_manager.acquire(leader.block_table)
        sample.block_table = list(leader.block_table)
        sample.block_hashes = list(leader.block_hashes)
        sample.num_computed_tokens = leader.num_computed_tokens
