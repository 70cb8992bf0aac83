"""An index record damaged while its payload file is intact is healed from the file's
self-description (tqstore/ssd/heal.py, issue 17); a damaged file is still quarantined, and a
readonly store only counts a miss."""

import os
import shutil

import lmdb
import pytest

from tqstore.errors import NotFound
from tqstore.ssd import BlockStore
from tqstore.ssd.chain import chain_hashes, token_array
from tqstore.ssd.records import BlockRecord

from .conftest import NS, fill_chains, same_bits


def _flip_record(path, key, offset) -> bytes:
    """Flip one bit of block `key`'s index record inside LMDB; returns the intact record."""
    env = lmdb.open(str(path / "index"), max_dbs=8)
    db = env.open_db(b"blocks")
    with env.begin(write=True, db=db) as txn:
        good = bytes(txn.get(key))
        v = bytearray(good)
        v[offset % len(v)] ^= 0x10
        txn.put(key, bytes(v))
    env.close()
    return good


def _record(path, key) -> BlockRecord:
    env = lmdb.open(str(path / "index"), max_dbs=8, readonly=True)
    with env.begin(db=env.open_db(b"blocks", create=False)) as txn:
        rec = BlockRecord.decode(txn.get(key))
    env.close()
    return rec


@pytest.mark.parametrize("via", ["lookup", "get", "locate"])
def test_damaged_record_with_intact_file_is_healed(tmp_path, rng, via):
    """A record failing its frame CRC no longer costs the block and its subtree: the writer
    rewrites it from the payload file's verified self-description and serves."""
    path = tmp_path / "s"
    (toks, pls), = fill_chains(path, rng, chains=1, n=5)
    hashes = chain_hashes(NS, token_array(toks))
    good = BlockRecord.decode(_flip_record(path, hashes[2], 29))
    with BlockStore(path) as s:
        before = s.stats()
        if via == "lookup":  # the binary search over 5 blocks probes block 2 first
            assert s.lookup(NS, toks) == 5
        elif via == "get":
            assert same_bits(s.get_block(NS, toks, 2), pls[2])
        else:
            assert [i for i, _ in s.locate(NS, toks, 0, 0, 1.0)] == [0, 1, 2, 3, 4]
        st = s.stats()
        assert (st.healed_records, st.quarantined, st.verification_failures) == (1, 0, 1)
        assert (st.blocks, st.payload_bytes, st.logical_bytes) == (
            before.blocks, before.payload_bytes, before.logical_bytes)
        assert s.lookup(NS, toks) == 5
        assert all(same_bits(s.get_block(NS, toks, i), p) for i, p in enumerate(pls))
        assert s.check().ok
        assert len(os.listdir(s.blocks_dir)) == 5
    healed = _record(path, hashes[2])
    for name in ("ns", "parent", "index", "tokens", "layout", "compression", "raw_size",
                 "stored_size", "file_size", "chunks", "created"):
        assert getattr(healed, name) == getattr(good, name), name
    with BlockStore(path) as s:  # persisted, and nothing left to heal
        assert s.stats().healed_records == 1 and s.check().ok
        s.evict(1)  # the derived databases agree after the heal: the LRU leaf is the tail
        assert s.lookup(NS, toks) == 4


@pytest.mark.parametrize("file_damage", ["body", "swap", "symlink"])
def test_damaged_record_with_damaged_file_is_quarantined(tmp_path, rng, file_damage):
    path = tmp_path / "s"
    (toks, pls), = fill_chains(path, rng, chains=1, n=4)
    hashes = chain_hashes(NS, token_array(toks))
    _flip_record(path, hashes[2], 11)
    victim = path / "blocks" / (hashes[2].hex() + ".blk")
    if file_damage == "body":
        with open(victim, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            b = f.read(1)
            f.seek(-3, os.SEEK_END)
            f.write(bytes([b[0] ^ 0x01]))
    elif file_damage == "swap":  # a sound file of another block under this name
        shutil.copy(path / "blocks" / (hashes[1].hex() + ".blk"), victim)
    else:  # a symlink to an intact copy of the very file: never read
        shutil.move(victim, tmp_path / "copy.blk")
        os.symlink(tmp_path / "copy.blk", victim)
    with BlockStore(path) as s:
        assert s.lookup(NS, toks) == 2
        st = s.stats()
        assert (st.healed_records, st.quarantined, st.blocks) == (0, 1, 2)
        assert same_bits(s.get_block(NS, toks, 1), pls[1]) and s.check().ok
        assert sorted(os.listdir(s.blocks_dir)) == sorted(h.hex() + ".blk" for h in hashes[:2])


def test_damaged_record_is_a_miss_for_a_readonly_store(tmp_path, rng):
    path = tmp_path / "s"
    (toks, pls), = fill_chains(path, rng, chains=1, n=4)
    hashes = chain_hashes(NS, token_array(toks))
    _flip_record(path, hashes[2], 5)
    with BlockStore(path, readonly=True) as r:
        assert r.lookup(NS, toks) == 2
        with pytest.raises(NotFound):
            r.get_block(NS, toks, 2)
        st = r.stats()
        assert (st.healed_records, st.quarantined) == (0, 0) and st.verification_failures >= 1
        assert not r.check().ok
    assert _record(path, hashes[1]) and len(os.listdir(path / "blocks")) == 4
    with BlockStore(path) as s:  # the writer heals what the reader could only report
        assert s.lookup(NS, toks) == 4 and s.stats().healed_records == 1
