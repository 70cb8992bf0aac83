"""Sequences over the pool: prefix sharing, copy-on-write, hash publication, no leaks."""

import numpy as np

import tqstore  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx
from tqstore.paged.cache import PagedLayerCache, make_prompt_cache, release_prompt_cache
from tqstore.prefix_hash import hash_prefix_blocks


def feed(caches, rng, n, chunk=None):
    """Push n random tokens of K/V through every layer (prefill chunk, then single tokens)."""
    pool = caches[0].sequence.pool
    H, D = pool.num_kv_heads, pool.key_head_dim
    sizes = [n] if chunk is None else [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    for size in sizes:
        for c in caches:
            k = mx.array(rng.standard_normal((1, H, size, D)).astype(np.float32))
            v = mx.array(rng.standard_normal((1, H, size, D)).astype(np.float32))
            c.update_and_fetch(k, v)
    mx.eval([c.state for c in caches])


def test_shared_system_prompt_is_stored_once(rng, small_pool):
    pool = small_pool(block_size=4, num_blocks=64)
    system = [int(t) for t in rng.integers(0, 1000, 12)]  # 3 full blocks
    first = make_prompt_cache(pool, system + [7])
    feed(first, rng, 13)
    for c in first:
        c.finish_prefill()
    assert first[0].sequence.num_tokens == 13
    assert len(first[0].sequence.block_hashes) == 3
    used_after_first = pool.block_pool.num_used_blocks
    requests = [make_prompt_cache(pool, system + [int(t)] * 3) for t in rng.integers(0, 1000, 7)]
    for caches in requests:
        seq = caches[0].sequence
        assert seq.num_cached_tokens == 12 and caches[0].offset == 12
        assert seq.block_ids[:3] == first[0].sequence.block_ids[:3]
        feed(caches, rng, 3)
    shared = first[0].sequence.blocks[:3]
    assert [b.ref_cnt for b in shared] == [8, 8, 8]
    # 8 requests, 3 shared blocks stored once, each request 1 private tail block.
    assert pool.block_pool.num_used_blocks == used_after_first + 7
    assert pool.stats["prefix_hit_tokens"] == 7 * 12


def test_shared_prefix_decode_reads_the_same_pages(rng, small_pool):
    """A request that hits the prefix attends over exactly the pages the first one wrote."""
    pool = small_pool(block_size=4, num_blocks=32)
    prompt = [int(t) for t in rng.integers(0, 1000, 9)]
    a = make_prompt_cache(pool, prompt)
    feed(a, rng, 8, chunk=8)
    for c in a:
        c.finish_prefill()
    b = make_prompt_cache(pool, prompt)
    assert b[0].offset == 8
    k8a = [c.arena.gather_dense(c.sequence.block_table()[0], 8) for c in a]
    k8b = [c.arena.gather_dense(c.sequence.block_table()[0], 8) for c in b]
    for (ka, va), (kb, vb) in zip(k8a, k8b):
        assert mx.array_equal(ka, kb) and mx.array_equal(va, vb)


def test_fork_copies_partial_block_on_write(rng, small_pool):
    pool = small_pool(block_size=4, num_blocks=32)
    parent = make_prompt_cache(pool, [])
    feed(parent, rng, 6)  # blocks: [full, partial(2)]
    for c in parent:
        c.finish_prefill()
    pseq = parent[0].sequence
    child_seq = pseq.fork()
    assert [b.ref_cnt for b in pseq.blocks] == [2, 2]
    before = [c.arena.gather_dense(pseq.block_table()[0], 6) for c in parent]
    child = [PagedLayerCache(child_seq, l) for l in range(pool.num_layers)]
    assert child[0].offset == 6 and not child[0].in_prefill
    feed(child, rng, 1)  # writes slot 2 of the shared partial block -> copy on write
    assert child_seq.blocks[0] is pseq.blocks[0]
    assert child_seq.blocks[1] is not pseq.blocks[1]
    assert [b.ref_cnt for b in pseq.blocks] == [2, 1]
    assert pool.stats["cow_copies"] == 1
    for layer, c in enumerate(parent):
        k, v = c.arena.gather_dense(pseq.block_table()[0], 6)
        assert mx.array_equal(k, before[layer][0]) and mx.array_equal(v, before[layer][1])
        # The copy carries the parent's 6 tokens: compared as codes (exact by construction;
        # a 7-row and a 6-row dequantizing matmul may round differently on some BLAS builds).
        child_codes = c.arena.quantized(child_seq.block_table()[0], 7)
        parent_codes = c.arena.quantized(pseq.block_table()[0], 6)
        for got, want in zip(child_codes, parent_codes):
            assert mx.array_equal(got.codes[:, :6], want.codes)
            assert mx.array_equal(got.scales[:, :6], want.scales)


def test_trim_then_write_never_changes_a_published_block(rng, small_pool):
    pool = small_pool(block_size=4, num_blocks=32)
    ids = [int(t) for t in rng.integers(0, 1000, 8)]
    caches = make_prompt_cache(pool, ids)
    feed(caches, rng, 8)
    for c in caches:
        c.finish_prefill()
    seq = caches[0].sequence
    published = seq.blocks[1]
    assert pool.block_pool.lookup(seq.block_hashes[1]) is published
    snapshot = caches[0].arena.key_codes[published.block_id]
    for c in caches:
        assert c.trim(2) == 2
    assert seq.num_tokens == 6 and len(seq.block_hashes) == 1
    feed(caches, rng, 1)
    assert seq.blocks[1] is not published
    assert mx.array_equal(caches[0].arena.key_codes[published.block_id], snapshot)


def test_no_leak_after_many_sequences(rng, small_pool):
    pool = small_pool(block_size=4, num_blocks=48)
    prefixes = [[int(t) for t in rng.integers(0, 50, 8)] for _ in range(3)]
    live = []
    for i in range(60):
        ids = prefixes[i % 3] + [int(t) for t in rng.integers(0, 50, int(rng.integers(1, 9)))]
        caches = make_prompt_cache(pool, ids)
        n = len(ids) - caches[0].offset
        feed(caches, rng, n, chunk=n if caches[0].in_prefill else 1)
        feed(caches, rng, int(rng.integers(1, 4)))  # decode a few tokens
        if rng.random() < 0.3:
            live.append(caches[0].sequence.fork())
        live.append(caches[0].sequence)
        while len(live) > 5:
            live.pop(int(rng.integers(len(live)))).release()
    for seq in live:
        seq.release()
        seq.release()  # idempotent
    bp = pool.block_pool
    assert bp.num_free_blocks == pool.num_blocks - 1
    assert all(b.ref_cnt == 0 for b in bp.blocks[1:]) and bp.null_block.ref_cnt == 1
    assert sorted(bp.free_queue.block_ids()) == list(range(1, pool.num_blocks))
    # cached hashes still point at their blocks (lazy eviction), and only at free blocks
    assert all(bp.blocks[b.block_id].block_hash == h for h, b in bp.cached.items())


def test_pool_namespace_includes_codec_but_ssd_namespace_does_not(small_pool):
    from tqstore.codec import CodecConfig
    from tqstore.paged.policy import CachePolicy
    a = small_pool(policy=CachePolicy(codec=CodecConfig(4, 4)))
    b = small_pool(policy=CachePolicy(codec=CodecConfig(8, 8)))
    ids = list(range(8))
    assert hash_prefix_blocks(a.namespace, ids) != hash_prefix_blocks(b.namespace, ids)
    assert hash_prefix_blocks(a.ssd_namespace, ids) == hash_prefix_blocks(b.ssd_namespace, ids)


def test_write_positions_are_shared_by_layers_but_never_outlive_a_shared_block(small_pool):
    """prepare_write builds a step's index arrays once for every layer (a memo), and whole
    blocks come as one index per block. The memo must not survive anything that makes a block
    copy-on-write: a fork, or publication under its hash."""
    pool = small_pool(block_size=4, num_blocks=32)
    seq = pool.new_sequence(list(range(8)))
    ids, slots = seq.prepare_write(0, 8)
    assert slots is None and ids.tolist() == seq.block_ids
    assert seq.prepare_write(0, 8)[0] is ids  # the next layer gets the same arrays
    tokens, token_slots = seq.prepare_write(5, 2)  # inside a block: per token
    assert tokens.tolist() == [seq.block_ids[1]] * 2 and token_slots.tolist() == [1, 2]

    child = seq.fork()  # both now share the blocks: the parent's next write must copy
    again, _ = seq.prepare_write(5, 2)
    assert again.tolist() != tokens.tolist() and child.blocks[1].block_id == tokens.tolist()[0]
    assert pool.stats["cow_copies"] == 1

    first, _ = seq.prepare_write(0, 4)
    for layer in range(pool.num_layers):  # every layer wrote block 0: it is published
        seq.note_written(layer, 4)
    assert seq.block_hashes and pool.block_pool.lookup(seq.block_hashes[0]) is seq.blocks[0]
    rewritten, _ = seq.prepare_write(0, 4)
    assert rewritten.tolist() != first.tolist()  # copied, not written in place
    child.release()
    seq.release()
