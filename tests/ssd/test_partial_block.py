"""Trailing partial blocks (chain.py, targets.py): the m < block_size tokens after a chain's last
full block, stored as one more leaf of the chain, so that a repeated prompt is a full hit. Stored,
verified, healed, quarantined, evicted and rebuilt like a full block; named by a hash over the
tail tokens and their count; served by Tiers from the local store only."""

import os
import shutil

import lmdb
import numpy as np
import pytest

from tqstore.blocks import BlockPayload
from tqstore.errors import InvalidArgument, NotFound
from tqstore.remote.tiers import Tiers
from tqstore.ssd import BlockStore, StoreConfig
from tqstore.ssd.chain import block_hash, chain_hashes, partial_hash, token_array, trailing_tail
from tqstore.ssd.records import decode_quarantine

from .conftest import NS, random_payload, random_tokens, same_bits
from .test_corruption import _flip_file, _flip_index_value

BS = NS.block_size


def partial_payload(rng, m: int, ns=NS) -> BlockPayload:
    shape = (ns.num_layers, ns.num_kv_heads, m, ns.head_dim)
    return BlockPayload(rng.standard_normal(shape).astype(np.float16),
                        rng.standard_normal(shape).astype(np.float16))


def put_chain(s, rng, k=3, m=5, toks=None):
    """k full blocks and a trailing partial of m tokens in one put; (tokens, payloads)."""
    toks = toks if toks is not None else random_tokens(rng, k * BS + m)
    pls = [random_payload(rng) for _ in range(k)] + [partial_payload(rng, m)]
    s.put_blocks(NS, toks, 0, pls, partial=True)
    return toks, pls


def pkey(toks) -> bytes:
    t = token_array(toks)
    k, tail = trailing_tail(NS, t)
    hashes = chain_hashes(NS, t, k)
    return partial_hash(hashes[-1] if k else NS.root_hash(), tail)


def blk(path, key: bytes):
    return path / "blocks" / (key.hex() + ".blk")


def test_chain_helpers():
    toks = token_array(list(range(3 * BS + 5)))
    k, tail = trailing_tail(NS, toks)
    assert k == 3 and tail.tolist() == list(range(3 * BS, 3 * BS + 5))
    assert len(trailing_tail(NS, toks[:2 * BS])[1]) == 0
    parent = chain_hashes(NS, toks, 3)[-1]
    assert partial_hash(parent, tail) == block_hash(parent, tail.astype("<u4").tobytes(), 5)
    # the count is hashed: a full block's prefix of the same tokens never shares the name
    full = token_array(list(range(4 * BS)))
    assert partial_hash(parent, full[3 * BS:]) == chain_hashes(NS, full, 4)[-1]
    assert partial_hash(parent, full[3 * BS:4 * BS - 1]) != chain_hashes(NS, full, 4)[-1]


def test_round_trip_bit_for_bit(tmp_path, rng, store):
    toks, pls = put_chain(store, rng, k=3, m=5)
    assert store.lookup(NS, toks) == 3
    assert store.lookup_partial(NS, toks) == 5
    got = store.get_block(NS, toks, 3, partial=True)
    assert got.keys.shape == (NS.num_layers, NS.num_kv_heads, 5, NS.head_dim)
    assert same_bits(got, pls[3])
    assert all(same_bits(store.get_block(NS, toks, i), pls[i]) for i in range(3))
    assert same_bits(store.get_block(NS, toks, 1, partial=True), pls[1])  # another index: full
    with pytest.raises(InvalidArgument):
        store.get_block(NS, toks, 3)  # block 3 is not a full block
    assert store.lookup_partial(NS, toks[:3 * BS]) == 0  # no tail
    with pytest.raises(InvalidArgument):
        store.get_block(NS, toks[:3 * BS], 3, partial=True)
    st = store.stats()
    assert st.blocks == 4 and st.logical_bytes == 3 * pls[0].keys.nbytes * 2 + pls[3].keys.nbytes * 2
    assert store.check().ok


def test_partial_put_alone_after_its_full_blocks(store, rng):
    toks = random_tokens(rng, 2 * BS + 3)
    fulls = [random_payload(rng) for _ in range(2)]
    store.put_blocks(NS, toks, 0, fulls)
    assert store.lookup_partial(NS, toks) == 0
    p = partial_payload(rng, 3)
    hashes = store.put_blocks(NS, toks, 2, [p], partial=True)
    assert hashes == [pkey(toks)]
    assert store.lookup_partial(NS, toks) == 3
    assert same_bits(store.get_block(NS, toks, 2, partial=True), p)
    # a tail of a chain with no full block (k == 0): the namespace root is the parent
    short = random_tokens(rng, BS - 1)
    q = partial_payload(rng, BS - 1)
    store.put_blocks(NS, short, 0, [q], partial=True)
    assert store.lookup(NS, short) == 0 and store.lookup_partial(NS, short) == BS - 1
    assert same_bits(store.get_block(NS, short, 0, partial=True), q)
    assert store.check().ok


def test_parents_must_be_present(tmp_path, rng, store):
    toks = random_tokens(rng, 3 * BS + 4)
    store.put_blocks(NS, toks, 0, [random_payload(rng) for _ in range(2)])  # blocks 0, 1 of 3
    with pytest.raises(NotFound):
        store.put_blocks(NS, toks, 3, [partial_payload(rng, 4)], partial=True)
    assert store.lookup_partial(NS, toks) == 0
    assert store.stats().blocks == 2 and len(os.listdir(store.blocks_dir)) == 2


def test_partial_with_a_full_block_missing_is_no_hit(tmp_path, rng):
    """The index lost a full block's record (raw damage, not through the store): the partial's
    record is still there, but without its whole prefix it is no hit."""
    path = tmp_path / "s"
    with BlockStore(path) as s:
        toks, _ = put_chain(s, rng, k=3, m=6)
    env = lmdb.open(str(path / "index"), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"blocks")) as txn:
        assert txn.delete(chain_hashes(NS, token_array(toks), 3)[1])
        assert txn.get(pkey(toks)) is not None
    env.close()
    with BlockStore(path, readonly=True) as s:
        assert s.lookup(NS, toks) == 1
        assert s.lookup_partial(NS, toks) == 0


def test_different_tails_are_different_records(store, rng):
    prefix = random_tokens(rng, 2 * BS)
    fulls = [random_payload(rng) for _ in range(2)]
    store.put_blocks(NS, prefix, 0, fulls)
    a = prefix + random_tokens(rng, 3)
    b = a[:-1] + [(a[-1] + 1) % 49152]  # one token differs
    c = a + random_tokens(rng, 2)  # a's tail is a prefix of c's
    pls = {}
    for name, toks in (("a", a), ("b", b), ("c", c)):
        pls[name] = partial_payload(rng, len(toks) - 2 * BS)
        store.put_blocks(NS, toks, 2, [pls[name]], partial=True)
    assert len({pkey(a), pkey(b), pkey(c)}) == 3
    assert store.stats().blocks == 5
    for name, toks in (("a", a), ("b", b), ("c", c)):
        assert store.lookup_partial(NS, toks) == len(toks) - 2 * BS
        assert same_bits(store.get_block(NS, toks, 2, partial=True), pls[name])
    miss = a[:-1] + [(a[-1] + 2) % 49152]
    assert store.lookup_partial(NS, miss) == 0
    with pytest.raises(NotFound):
        store.get_block(NS, miss, 2, partial=True)
    assert store.lookup_partial(NS, a[:-1]) == 0  # a shorter tail is another block
    assert store.stats().verification_failures == 0 and store.check().ok


@pytest.mark.parametrize("bad", ["no tail", "full-size partial", "float32", "wrong m",
                                 "ends before the tail", "partial shape as a full block"])
def test_invalid_partial_puts_store_nothing(store, rng, bad):
    toks = random_tokens(rng, 2 * BS + 3)
    first, partial = 0, True
    pls = [random_payload(rng) for _ in range(2)] + [partial_payload(rng, 3)]
    if bad == "no tail":
        toks = toks[:2 * BS]
    elif bad == "full-size partial":
        pls[2] = random_payload(rng)
    elif bad == "float32":
        pls[2] = BlockPayload(pls[2].keys.astype(np.float32), pls[2].values.astype(np.float32))
    elif bad == "wrong m":
        pls[2] = partial_payload(rng, 2)
    elif bad == "ends before the tail":
        pls = pls[:2]
    else:
        pls, partial = [random_payload(rng), partial_payload(rng, 3)], False
    with pytest.raises(InvalidArgument):
        store.put_blocks(NS, toks, first, pls, partial=partial)
    assert store.stats().blocks == 0 and os.listdir(store.blocks_dir) == []


def test_put_is_idempotent(store, rng):
    toks, pls = put_chain(store, rng, k=2, m=7)
    files = sorted(os.listdir(store.blocks_dir))
    again = store.put_blocks(NS, toks, 0, pls, partial=True)
    assert again == chain_hashes(NS, token_array(toks), 2) + [pkey(toks)]
    assert store.put_blocks(NS, toks, 2, [pls[2]], partial=True) == [pkey(toks)]
    assert sorted(os.listdir(store.blocks_dir)) == files and store.stats().blocks == 3
    assert store.check().ok


def test_eviction_takes_the_partial_before_its_parent(store, rng):
    toks, _ = put_chain(store, rng, k=2, m=4)
    store.get_block(NS, toks, 2, partial=True)
    store.get_block(NS, toks, 1)  # the parent is the most recent, yet not a leaf
    store.get_block(NS, toks, 0)
    seen = []
    for _ in range(3):
        store.evict(1)
        seen.append((store.lookup(NS, toks), store.lookup_partial(NS, toks)))
        assert store.check().ok  # children and leaves stay exact
    assert seen == [(2, 0), (1, 0), (0, 0)]
    assert os.listdir(store.blocks_dir) == []


def test_budget_eviction_never_orphans_a_partial(tmp_path, rng):
    with BlockStore(tmp_path / "s", StoreConfig(max_bytes=512 * 1024)) as s:
        chains = []
        for _ in range(30):
            toks, _ = put_chain(s, rng, k=3, m=int(rng.integers(1, BS)))
            s.get_block(NS, toks, 2)  # parents recent, partials older: LRU alone would err
            chains.append(toks)
            for t in chains:  # the partial's file exists only while its parent's does
                h = chain_hashes(NS, token_array(t), 3)
                if blk(tmp_path / "s", pkey(t)).exists():
                    assert blk(tmp_path / "s", h[2]).exists()
        assert s.stats().evictions > 0
        assert s.lookup_partial(NS, chains[-1]) == len(chains[-1]) - 3 * BS
        assert s.check().ok


def test_damaged_payload_is_never_served_and_quarantined(tmp_path, rng):
    path = tmp_path / "s"
    with BlockStore(path) as s:
        toks, pls = put_chain(s, rng, k=2, m=5)
    victim = blk(path, pkey(toks))
    _flip_file(victim, os.path.getsize(victim) - 10)  # a byte of the body
    with BlockStore(path) as s:
        assert s.lookup_partial(NS, toks) == 5  # the record is fine: lookup trusts it
        with pytest.raises(NotFound):
            s.get_block(NS, toks, 2, partial=True)
        assert s.lookup_partial(NS, toks) == 0 and not victim.exists()
        st = s.stats()
        assert st.quarantined == 1 and st.verification_failures == 1
        assert all(same_bits(s.get_block(NS, toks, i), pls[i]) for i in range(2))
        assert s.check().ok


def test_damaged_partial_record_is_healed_from_its_file(tmp_path, rng):
    path = tmp_path / "s"
    with BlockStore(path) as s:
        toks, pls = put_chain(s, rng, k=2, m=3)
    _flip_index_value(path, pkey(toks), 40)
    with BlockStore(path) as s:
        assert s.lookup_partial(NS, toks) == 3  # healed by the lookup, then a hit
        assert s.stats().healed_records == 1
        assert same_bits(s.get_block(NS, toks, 2, partial=True), pls[2])
        assert s.check().ok


def test_damaged_record_and_file_quarantine_with_exact_counters(tmp_path, rng):
    path = tmp_path / "s"
    with BlockStore(path) as s:
        toks, pls = put_chain(s, rng, k=2, m=3)
    _flip_index_value(path, pkey(toks), 40)
    victim = blk(path, pkey(toks))
    _flip_file(victim, os.path.getsize(victim) - 10)
    with BlockStore(path) as s:
        with pytest.raises(NotFound):
            s.get_block(NS, toks, 2, partial=True)
        assert s.lookup_partial(NS, toks) == 0 and s.stats().quarantined == 1
        assert s.check().ok  # the logical bytes of a 3-token block were taken off, not a full one


def test_record_of_another_tail_under_this_name_is_a_token_mismatch(tmp_path, rng):
    """Block a's key holds the (valid) record of block b, a sibling tail of the same length:
    refused on the record's token ids, before any payload byte is read."""
    path = tmp_path / "s"
    with BlockStore(path) as s:
        a, _ = put_chain(s, rng, k=1, m=4)
        b = a[:-1] + [(a[-1] + 1) % 49152]
        s.put_blocks(NS, b, 1, [partial_payload(rng, 4)], partial=True)
    env = lmdb.open(str(path / "index"), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"blocks")) as txn:
        txn.put(pkey(a), txn.get(pkey(b)))
    env.close()
    with BlockStore(path) as s:
        with pytest.raises(NotFound):
            s.get_block(NS, a, 1, partial=True)
        assert s.lookup_partial(NS, a) == 0 and s.lookup_partial(NS, b) == 4
    env = lmdb.open(str(path / "index"), max_dbs=8, readonly=True)
    with env.begin(db=env.open_db(b"quarantine")) as txn:
        assert decode_quarantine(txn.get(pkey(a)))["reason"] == "token ids mismatch"
    env.close()


def test_quarantining_a_full_block_takes_its_partial(tmp_path, rng):
    path = tmp_path / "s"
    with BlockStore(path) as s:
        toks, _ = put_chain(s, rng, k=3, m=2)
    h = chain_hashes(NS, token_array(toks), 3)
    _flip_file(blk(path, h[1]), os.path.getsize(blk(path, h[1])) - 10)
    with BlockStore(path) as s:
        with pytest.raises(NotFound):
            s.get_block(NS, toks, 1)
        assert s.lookup(NS, toks) == 1 and s.lookup_partial(NS, toks) == 0
        assert not blk(path, pkey(toks)).exists()
        with pytest.raises(NotFound):
            s.get_block(NS, toks, 3, partial=True)
        assert s.stats().blocks == 1 and s.check().ok


def test_survives_reopen_and_rebuild(tmp_path, rng):
    path = tmp_path / "s"
    with BlockStore(path) as s:
        toks, pls = put_chain(s, rng, k=2, m=6)
        short, spls = put_chain(s, rng, k=0, m=1)
    with BlockStore(path) as s:
        assert s.rebuild is None and s.lookup_partial(NS, toks) == 6
        assert same_bits(s.get_block(NS, toks, 2, partial=True), pls[2])
    shutil.rmtree(path / "index")  # the payload files describe themselves
    with BlockStore(path) as s:
        assert s.rebuild is not None and (s.rebuild.recovered, s.rebuild.lost) == (4, 0)
        assert s.lookup(NS, toks) == 2 and s.lookup_partial(NS, toks) == 6
        assert same_bits(s.get_block(NS, toks, 2, partial=True), pls[2])
        assert s.lookup_partial(NS, short) == 1
        assert same_bits(s.get_block(NS, short, 0, partial=True), spls[0])
        assert s.check().ok


def test_check_is_clean_and_repair_keeps_partials(tmp_path, rng):
    path = tmp_path / "s"
    with BlockStore(path) as s:
        toks, pls = put_chain(s, rng, k=2, m=5)
        other, _ = put_chain(s, rng, k=2, m=1)
        report = s.check()
        assert report.ok and report.records_checked == 6
    h = chain_hashes(NS, token_array(other), 2)
    _flip_file(blk(path, h[0]), os.path.getsize(blk(path, h[0])) - 10)  # other's whole chain goes
    (path / "blocks" / ("ab" * 32 + ".blk")).write_bytes(b"junk")  # an orphan file
    with BlockStore(path) as s:
        report = s.check(repair=True)
        assert not report.ok and report.repaired
        assert s.check().ok
        assert s.lookup_partial(NS, toks) == 5 and s.lookup_partial(NS, other) == 0
        assert same_bits(s.get_block(NS, toks, 2, partial=True), pls[2])
        assert s.stats().blocks == 3


def test_tiers_without_a_remote(store, rng):
    tiers = Tiers(store)
    toks = random_tokens(rng, 3 * BS + 5)
    pls = [random_payload(rng) for _ in range(3)] + [partial_payload(rng, 5)]
    assert tiers.put_blocks(NS, toks, 0, pls, partial=True)[-1] == pkey(toks)
    assert tiers.lookup(NS, toks) == 3 and tiers.lookup_partial(NS, toks) == 5
    got = list(tiers.blocks(NS, toks, 0, 3, partial=True))
    assert [i for i, _ in got] == [0, 1, 2, 3]
    assert all(same_bits(p, pls[i]) for i, p in got)
    assert [i for i, _ in tiers.blocks(NS, toks, 0, 3)] == [0, 1, 2]
    assert [i for i, _ in tiers.blocks(NS, toks, 1, 1, partial=True)] == [1]  # not up to k
    (i, p), = tiers.blocks(NS, toks, 3, 0, partial=True)
    assert i == 3 and same_bits(p, pls[3])
    with pytest.raises(NotFound):
        list(tiers.blocks(NS, toks, 3, 0))
    other = toks[:-1] + [(toks[-1] + 1) % 49152]  # same full blocks, another tail: not stored
    assert tiers.lookup_partial(NS, other) == 0
    assert [i for i, _ in tiers.blocks(NS, other, 0, 3, partial=True)] == [0, 1, 2]
    with pytest.raises(NotFound):
        list(tiers.blocks(NS, other, 3, 0, partial=True))
