"""Flipped bytes in payloads and index values: misses (counted, quarantined), never a wrong block,
never a crash; check finds every kind of damage and repair makes the store consistent again. A
damaged index record whose payload file is intact is healed from the file by a writer
(heal.py; more in test_index_damage.py)."""

import os

import lmdb
import pytest

from tqstore.errors import NotFound
from tqstore.ssd import BlockStore, StoreConfig

from .conftest import NS, random_payload, random_tokens, same_bits


def _fill(path, rng, n=4):
    toks = random_tokens(rng, n * NS.block_size)
    pls = [random_payload(rng) for _ in range(n)]
    with BlockStore(path) as s:
        hashes = s.put_blocks(NS, toks, 0, pls)
    return toks, pls, hashes


def _flip_file(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def _flip_index_value(store_path, key, offset):
    env = lmdb.open(str(store_path / "index"), max_dbs=8)
    db = env.open_db(b"blocks")
    with env.begin(write=True, db=db) as txn:
        v = bytearray(txn.get(key))
        v[offset % len(v)] ^= 0x01
        txn.put(key, bytes(v))
    env.close()


@pytest.mark.parametrize("where", ["body", "header", "truncate", "delete", "swap"])
def test_payload_damage_is_a_counted_miss(tmp_path, rng, where):
    path = tmp_path / "s"
    toks, pls, hashes = _fill(path, rng)
    victim = path / "blocks" / (hashes[2].hex() + ".blk")
    if where == "body":
        _flip_file(victim, 64 + int(rng.integers(0, os.path.getsize(victim) - 64)))
    elif where == "header":
        _flip_file(victim, int(rng.integers(0, 64)))
    elif where == "truncate":
        os.truncate(victim, os.path.getsize(victim) - 1)
    elif where == "delete":
        os.unlink(victim)
    else:  # a valid payload file of another block under this name
        os.replace(path / "blocks" / (hashes[1].hex() + ".blk"), victim)
    with BlockStore(path) as s:
        report = s.check()
        assert not report.ok
        bad = {h for h, _ in report.bad_records}
        assert hashes[2].hex() in bad
        if where == "swap":
            assert hashes[1].hex() in bad  # its own file is now missing
            with pytest.raises(NotFound):  # lookup reads metadata only: the get finds it
                s.get_block(NS, toks, 1)
            good = 1
        else:
            assert bad == {hashes[2].hex()}
            assert same_bits(s.get_block(NS, toks, 1), pls[1])
            good = 2
        with pytest.raises(NotFound):
            s.get_block(NS, toks, 2)
        st = s.stats()
        assert st.verification_failures >= 1 and st.quarantined >= 1
        # Block 2 and its subtree (block 3) are quarantined; the prefix before it still serves.
        assert s.lookup(NS, toks) == good
        assert same_bits(s.get_block(NS, toks, 0), pls[0])
        with pytest.raises(NotFound):
            s.get_block(NS, toks, 3)
        assert s.check().ok
        # A re-put heals the chain.
        s.put_blocks(NS, toks, good, pls[good:])
        assert all(same_bits(s.get_block(NS, toks, i), pls[i]) for i in range(4))


def test_index_value_damage_is_a_counted_miss_or_healed(tmp_path, rng):
    path = tmp_path / "s"
    toks, pls, hashes = _fill(path, rng)
    _flip_index_value(path, hashes[1], int(rng.integers(0, 1000)))
    with BlockStore(path, readonly=True) as r:  # a reader without repair rights: miss, no crash
        with pytest.raises(NotFound):
            r.get_block(NS, toks, 1)
        assert r.stats().verification_failures == 1
        assert not r.check().ok
    with BlockStore(path) as s:
        # get_block finds the damaged record and, the payload file being intact, the writer
        # rewrites the record from the file's self-description and serves the block.
        assert same_bits(s.get_block(NS, toks, 1), pls[1])
        assert s.lookup(NS, toks) == 4
        assert all(same_bits(s.get_block(NS, toks, i), pls[i]) for i in range(4))
        assert (s.stats().quarantined, s.stats().healed_records) == (0, 1)
        assert s.check().ok


def test_index_value_damage_with_a_damaged_file_is_quarantined(tmp_path, rng):
    path = tmp_path / "s"
    toks, pls, hashes = _fill(path, rng)
    _flip_index_value(path, hashes[1], int(rng.integers(0, 1000)))
    victim = path / "blocks" / (hashes[1].hex() + ".blk")
    _flip_file(victim, os.path.getsize(victim) - 10)  # a byte of the body
    with BlockStore(path) as s:
        # lookup is a binary search that verifies the record frames it visits (O(log n): the
        # 2 ms budget); a damaged record it did not visit is caught by get_block, which then
        # quarantines the block and its subtree (no heal: the file fails verification), so the
        # next lookup stops before it.
        assert s.lookup(NS, toks) in (1, 4)
        with pytest.raises(NotFound):
            s.get_block(NS, toks, 1)
        assert s.lookup(NS, toks) == 1
        assert same_bits(s.get_block(NS, toks, 0), pls[0])
        assert (s.stats().quarantined, s.stats().healed_records) == (1, 0)
        assert s.check().ok


def test_check_finds_and_repairs_everything(tmp_path, rng):
    path = tmp_path / "s"
    toks, pls, hashes = _fill(path, rng, n=6)
    other_toks, other_pls, other_hashes = _fill(path, rng, n=2)
    _flip_file(path / "blocks" / (hashes[4].hex() + ".blk"), 100)
    _flip_index_value(path, other_hashes[1], 7)
    (path / "blocks" / ("ab" * 32 + ".blk")).write_bytes(b"orphan")
    (path / "blocks" / "junk.blk.tmp123").write_bytes(b"torn")
    with BlockStore(path, StoreConfig()) as s:  # opening removes the orphans of a crash...
        assert s.recovered_orphans == 2
    (path / "blocks" / ("cd" * 32 + ".blk")).write_bytes(b"orphan")
    with BlockStore(path, readonly=True) as r:  # ...a readonly check only reports them
        report = r.check()
    assert {h for h, _ in report.bad_records} == {hashes[4].hex(), other_hashes[1].hex()}
    assert report.dangling == [hashes[5].hex()]
    assert report.orphan_files == ["cd" * 32 + ".blk"]
    with BlockStore(path) as s:
        fixed = s.check(repair=True)
        assert fixed.repaired and s.check().ok
        assert s.lookup(NS, toks) == 4 and s.lookup(NS, other_toks) == 1
        assert s.stats().blocks == 5 and s.stats().quarantined == 2
        assert same_bits(s.get_block(NS, toks, 3), pls[3])


@pytest.mark.parametrize("file_intact", [True, False])
def test_lookup_heals_or_quarantines_a_damaged_record_it_visits(tmp_path, rng, file_intact):
    path = tmp_path / "s"
    toks, pls, hashes = _fill(path, rng, n=4)
    _flip_index_value(path, hashes[2], 20)  # the binary search over 4 blocks probes block 2 first
    if not file_intact:
        victim = path / "blocks" / (hashes[2].hex() + ".blk")
        _flip_file(victim, os.path.getsize(victim) - 10)  # a byte of the body
    with BlockStore(path) as s:
        assert s.lookup(NS, toks) == (4 if file_intact else 2)
        st = s.stats()
        assert st.verification_failures == 1
        assert (st.healed_records, st.quarantined) == ((1, 0) if file_intact else (0, 1))
        assert s.check().ok


def test_garbage_everywhere_never_crashes(tmp_path, rng):
    path = tmp_path / "s"
    toks, _pls, hashes = _fill(path, rng, n=3)
    for h in hashes:
        f = path / "blocks" / (h.hex() + ".blk")
        f.write_bytes(rng.bytes(os.path.getsize(f)))
    with BlockStore(path) as s:
        for i in range(3):
            with pytest.raises(NotFound):
                s.get_block(NS, toks, i)
        assert s.lookup(NS, toks) == 0
        assert s.stats().verification_failures == 1  # block 0 took its subtree with it
        assert s.check().ok


def test_check_cli_exit_status(tmp_path, rng, capsys):
    import argparse

    from tqstore.cli import check as check_cli

    path = tmp_path / "s"
    toks, _pls, hashes = _fill(path, rng, n=2)
    parser = argparse.ArgumentParser()
    check_cli.add_arguments(parser)
    assert check_cli.run(parser.parse_args([str(path)])) == 0
    _flip_file(path / "blocks" / (hashes[1].hex() + ".blk"), 70)
    assert check_cli.run(parser.parse_args([str(path), "--json"])) == 1
    assert hashes[1].hex() in capsys.readouterr().out
    assert check_cli.run(parser.parse_args([str(path), "--repair"])) == 0
    assert check_cli.run(parser.parse_args([str(path)])) == 0
