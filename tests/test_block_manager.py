"""Block manager: invariants under random operation sequences, eviction order,
and the cache events it records."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from inference.block_hashing import BlockHasher
from inference.block_manager import BlockManager
from inference.kv_cache_events import BlocksRemoved, BlocksStored, CacheCleared

HASHER = BlockHasher.create("sha256_cbor")


def hash_blocks(token_ids: list[int], block_size: int, salt: str | None) -> list[bytes]:
    return HASHER.hash_blocks(token_ids, block_size, salt)


def cache(bm: BlockManager, table: list[int], token_ids: list[int], salt: str | None = None) -> None:
    bm.cache_blocks(table, hash_blocks(token_ids, bm.block_size, salt), token_ids, salt)


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
    st.tuples(st.sampled_from(["alloc", "append", "fork", "free", "cow", "cache", "reset"]), st.integers(0, 7),
              st.integers(1, 4)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_random_operations_keep_invariants(operations):
    bm = BlockManager(num_blocks=12, block_size=4, record_events=True)
    replayed: set[bytes] = set()
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
            tokens = list(range(count, count + 4 * len(table)))
            cache(bm, table, tokens, salt="s" if count % 2 else None)
        elif op == "reset":
            bm.reset_prefix_cache()
        check_invariants(bm, tables)
        apply_events(replayed, bm.take_events(), bm.block_size)
        assert replayed == set(bm.cached)
    for table in tables:
        bm.free(table)
    check_invariants(bm, [])


def apply_events(cached: set[bytes], events: list, block_size: int) -> None:
    """Replay recorded events onto a set of hashes, checking each record's shape."""
    for event in events:
        if isinstance(event, BlocksStored):
            assert len(event.token_ids) == block_size * len(event.block_hashes)
            assert not cached & set(event.block_hashes), "a hash stored twice"
            if event.first_block_index == 0:
                assert event.parent_block_hash is None
            cached.update(event.block_hashes)
        elif isinstance(event, BlocksRemoved):
            assert set(event.block_hashes) <= cached
            cached.difference_update(event.block_hashes)
        else:
            assert isinstance(event, CacheCleared)
            cached.clear()


def test_stored_events_split_around_blocks_already_cached():
    bm = BlockManager(num_blocks=8, block_size=2, record_events=True)
    tokens = [1, 2, 3, 4, 5, 6]
    first = bm.allocate(2)
    cache(bm, first, tokens[:4])
    second = bm.allocate(3)  # same data in its first two blocks: only the third is new
    cache(bm, second, tokens)
    stored = bm.take_events()
    hashes = hash_blocks(tokens, 2, None)
    assert [(e.block_hashes, e.parent_block_hash, e.token_ids, e.first_block_index) for e in stored] == [
        (hashes[:2], None, [1, 2, 3, 4], 0),
        (hashes[2:], hashes[1], [5, 6], 2),
    ]
    assert bm.take_events() == []
    bm.free(second)
    bm.free(first)
    bm.allocate(8)  # evicts all three cached blocks, one event each
    assert sorted(h for e in bm.take_events() for h in e.block_hashes) == sorted(hashes)


def test_no_events_unless_asked():
    bm = BlockManager(num_blocks=4, block_size=2)
    cache(bm, bm.allocate(2), [1, 2, 3, 4])
    bm.reset_prefix_cache()
    assert bm.events == []


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
    for hasher in (HASHER, BlockHasher.create("sha256")):
        a = hasher.hash_blocks(list(range(8)), 4, None)
        b = hasher.hash_blocks([99, 1, 2, 3] + list(range(4, 8)), 4, None)
        assert a[1] != b[1]  # same tokens, different parent
        salted = [hasher.hash_blocks([1, 2], 2, salt) for salt in ("tenant-a", "tenant-b", None)]
        assert len({h for hashes in salted for h in hashes}) == 3
        assert hasher.hash_blocks(list(range(10)), 4, None) == a  # partial last block not hashed
        assert hasher.hash_blocks(list(range(12)), 4, None, known=a)[:2] == a


def test_eviction_order_is_lru_and_tail_first():
    """Scripted sequence in the manner of vLLM's prefix-caching tests."""
    bm = BlockManager(num_blocks=6, block_size=2)
    req_a = bm.allocate(3)  # blocks 0, 1, 2
    cache(bm, req_a, [1, 2, 3, 4, 5, 6])
    req_b = bm.allocate(2)  # blocks 3, 4
    cache(bm, req_b, [7, 8, 9, 10])
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
    cache(bm, held, [1, 2, 3, 4])
    assert bm.allocate(1) == [2]
    assert bm.num_free_blocks == 0
    assert bm.lookup(hash_blocks([1, 2, 3, 4], 2, None)) == held
