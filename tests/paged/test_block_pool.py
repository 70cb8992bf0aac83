"""Block pool: exact eviction order, lazy eviction, ref counting under sharing."""

import pytest

import tqstore  # noqa: F401  (BLAS preload before mlx)
from tqstore.errors import InvalidArgument, ResourceExhausted
from tqstore.paged.block_pool import NULL_BLOCK_ID, BlockPool, FreeBlockQueue, KVBlock
from tqstore.prefix_hash import BlockHash


def h(i: int) -> BlockHash:
    return BlockHash(bytes([i]) * 32)


def test_null_block_is_never_handed_out():
    pool = BlockPool(5)
    ids = [b.block_id for b in pool.allocate(4)]
    assert ids == [1, 2, 3, 4]
    assert NULL_BLOCK_ID not in ids
    with pytest.raises(ResourceExhausted):
        pool.allocate(1)
    pool.free([pool.null_block])  # freeing the null block is a no-op
    assert pool.null_block.ref_cnt == 1 and pool.num_free_blocks == 0
    with pytest.raises(InvalidArgument):
        pool.cache_block(pool.null_block, h(1))


def test_exact_eviction_order_is_free_order():
    pool = BlockPool(6)
    a, b, c, d, e = pool.allocate(5)
    pool.free([c, a, e])
    assert pool.free_queue.block_ids() == [3, 1, 5]
    pool.free([b])
    got = [blk.block_id for blk in pool.allocate(4)]
    assert got == [3, 1, 5, 2]
    assert pool.num_free_blocks == 0


def test_lazy_eviction_keeps_hash_until_reuse():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    pool.cache_block(a, h(1))
    pool.cache_block(b, h(2))
    pool.free([b, a])  # b evicts first
    assert pool.lookup(h(1)) is a and pool.lookup(h(2)) is b
    assert a.ref_cnt == 0 and a.block_hash == h(1)
    # a hit on a free cached block pulls it out of the middle of the queue
    pool.incref(a)
    assert a.ref_cnt == 1 and pool.free_queue.block_ids() == [2]
    (reused,) = pool.allocate(1)
    assert reused is b and b.block_hash is None and pool.lookup(h(2)) is None
    assert pool.lookup(h(1)) is a and pool.evictions == 1


def test_ref_counting_under_sharing():
    pool = BlockPool(4)
    (blk,) = pool.allocate(1)
    for _ in range(7):  # eight sequences share one system-prompt block
        pool.incref(blk)
    assert blk.ref_cnt == 8
    for i in range(7):
        pool.free([blk])
        assert blk.ref_cnt == 7 - i and not blk.in_free_queue
    pool.free([blk])
    assert blk.ref_cnt == 0 and pool.free_queue.block_ids()[-1] == blk.block_id
    with pytest.raises(InvalidArgument):
        pool.free([blk])


def test_cache_block_keeps_first_holder_canonical():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, h(9)) is a
    assert pool.cache_block(b, h(9)) is a
    assert b.block_hash is None


def test_free_queue_middle_removal_is_consistent():
    blocks = [KVBlock(i) for i in range(1, 8)]
    q = FreeBlockQueue(blocks)
    for victim in (blocks[3], blocks[0], blocks[6]):
        q.remove(victim)
    assert q.block_ids() == [2, 3, 5, 6]
    assert q.num_free == 4
    assert q.popleft().block_id == 2
    q.append(blocks[0])
    assert q.block_ids() == [3, 5, 6, 1]
