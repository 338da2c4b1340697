"""Block manager: invariants under random operation sequences, eviction order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from inference.block_manager import BlockManager, hash_block, hash_blocks


def check_invariants(bm: BlockManager, tables: list[list[int]]) -> None:
    refs = [0] * bm.num_blocks
    for table in tables:
        for block_id in table:
            refs[block_id] += 1
    assert [b.ref_cnt for b in bm.blocks] == refs
    free_ids = bm.free_queue.block_ids()
    assert len(free_ids) == len(set(free_ids)) == bm.num_free_blocks
    assert set(free_ids) == {i for i, r in enumerate(refs) if r == 0}
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    for block_hash, block in bm.cached.items():
        assert block.block_hash == block_hash


ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "append", "fork", "free", "cow", "cache"]), st.integers(0, 7), st.integers(1, 4)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_random_operations_keep_invariants(operations):
    bm = BlockManager(num_blocks=12, block_size=4)
    tables: list[list[int]] = []
    for op, pick, count in operations:
        table = tables[pick % len(tables)] if tables else None
        if op == "alloc" and count <= bm.num_free_blocks:
            tables.append(bm.allocate(count))
        elif op == "append" and table is not None and bm.num_free_blocks >= 1:
            table.extend(bm.allocate(1))
        elif op == "fork" and table is not None:
            bm.acquire(table)
            tables.append(list(table))
        elif op == "free" and table is not None:
            bm.free(table)
            tables.remove(table)
        elif op == "cow" and table and bm.num_free_blocks >= 1:
            table[-1] = bm.copy_on_write(table[-1])
        elif op == "cache" and table:
            bm.cache_blocks(table, hash_blocks(list(range(count * 4 * len(table))), 4, None)[: len(table)])
        check_invariants(bm, tables)
    for table in tables:
        bm.free(table)
    check_invariants(bm, [])


def test_double_free_raises():
    bm = BlockManager(num_blocks=4, block_size=4)
    table = bm.allocate(2)
    bm.free(table)
    try:
        bm.free(table)
    except RuntimeError as exc:
        assert "double free" in str(exc)
    else:
        raise AssertionError("double free went unnoticed")


def test_copy_on_write_leaves_shared_block_to_others():
    bm = BlockManager(num_blocks=4, block_size=4)
    [shared] = bm.allocate(1)
    bm.acquire([shared])  # a fork
    new = bm.copy_on_write(shared)
    assert new != shared and bm.blocks[shared].ref_cnt == 1 and bm.blocks[new].ref_cnt == 1
    assert bm.copy_on_write(shared) == shared  # sole holder now: write in place


def test_hashes_chain_and_salt():
    a = hash_blocks(list(range(8)), 4, None)
    b = hash_blocks([99, 1, 2, 3] + list(range(4, 8)), 4, None)
    assert a[1] != b[1]  # same tokens, different parent
    assert hash_block(None, [1, 2], "tenant-a") != hash_block(None, [1, 2], "tenant-b")
    assert hash_blocks(list(range(10)), 4, None) == a  # partial last block not hashed


def test_eviction_order_is_lru_and_tail_first():
    """Scripted sequence in the manner of vLLM's prefix-caching tests."""
    bm = BlockManager(num_blocks=6, block_size=2)
    req_a = bm.allocate(3)  # blocks 0, 1, 2
    bm.cache_blocks(req_a, hash_blocks([1, 2, 3, 4, 5, 6], 2, None))
    req_b = bm.allocate(2)  # blocks 3, 4
    bm.cache_blocks(req_b, hash_blocks([7, 8, 9, 10], 2, None))
    assert bm.free_queue.block_ids() == [5]
    bm.free(req_a)  # tail first: 2, 1, 0
    bm.free(req_b)  # then 4, 3
    assert bm.free_queue.block_ids() == [5, 2, 1, 0, 4, 3]
    # A hit on req_a's head takes blocks out of the middle of the queue in O(1).
    hits = bm.lookup(hash_blocks([1, 2, 3, 4], 2, None))
    assert hits == [0, 1]
    bm.acquire(hits)
    assert bm.free_queue.block_ids() == [5, 2, 4, 3]
    # New allocations evict in queue order; evicted blocks lose their hash.
    assert bm.allocate(2) == [5, 2]
    assert bm.lookup(hash_blocks([1, 2, 3, 4, 5, 6], 2, None)) == [0, 1]  # block 2 evicted
    assert bm.allocate(1) == [4]
    # req_b's tail went first; its head is still a hit.
    assert bm.lookup(hash_blocks([7, 8, 9, 10], 2, None)) == [3]


def test_referenced_blocks_are_never_evicted():
    bm = BlockManager(num_blocks=3, block_size=2)
    held = bm.allocate(2)
    bm.cache_blocks(held, hash_blocks([1, 2, 3, 4], 2, None))
    assert bm.allocate(1) == [2]
    assert bm.num_free_blocks == 0
    assert bm.lookup(hash_blocks([1, 2, 3, 4], 2, None)) == held
