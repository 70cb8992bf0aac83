"""Byte budget and the exact eviction order (LRU leaves first, never a parent before its child)."""

import dataclasses
import os

import pytest

from tqstore.errors import NotFound, ResourceExhausted
from tqstore.ssd import BlockStore, StoreConfig
from tqstore.ssd.payload import allocated

from .conftest import NS, random_payload, random_tokens


def _disk_bytes(path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            if f.endswith(".blk"):
                total += allocated(os.path.getsize(os.path.join(root, f)))
    return total


def _present(store, chains):
    return {name: store.lookup(NS, toks) for name, toks in chains.items()}


def test_exact_eviction_order_leaves_first(tmp_path, rng):
    """Chains A (3 blocks) and B (2 blocks) share nothing; C branches from A's block 0.
    Access order then decides; a parent is only a candidate once its children are gone."""
    bs = NS.block_size
    a, b = random_tokens(rng, 3 * bs), random_tokens(rng, 2 * bs)
    c = a[:bs] + random_tokens(rng, bs)
    with BlockStore(tmp_path / "s", StoreConfig(map_size=1 << 28)) as s:
        s.put_blocks(NS, a, 0, [random_payload(rng) for _ in range(3)])  # a0 a1 a2
        s.put_blocks(NS, b, 0, [random_payload(rng) for _ in range(2)])  # b0 b1
        s.put_blocks(NS, c, 1, [random_payload(rng)])                    # c1 (child of a0)
        s.get_block(NS, a, 2)  # a2 now most recent; leaves by access: b1 < c1 < a2
        s.get_block(NS, b, 0)  # b0 most recent of all, but not a leaf while b1 exists
        one = s.stats().payload_bytes // 6
        names = {"a0": (a, 0), "a1": (a, 1), "a2": (a, 2), "b0": (b, 0), "b1": (b, 1), "c1": (c, 1)}

        def present():
            return {n for n, (toks, i) in names.items() if s.lookup(NS, toks) > i}

        order = []
        for _ in range(6):
            before = present()
            assert s.evict(1) == one
            gone = before - present()
            assert len(gone) == 1
            order += gone
        # Leaves by last access: a2 (got), b1 (put), c1 (put) -> b1 goes first and b0 becomes a
        # leaf with its recent access; then c1, a2; a1 and a0 (put time, older than b0's get)
        # become leaves in turn and go before b0.
        assert order == ["b1", "c1", "a2", "a1", "a0", "b0"]
        assert s.stats().blocks == 0 and s.stats().evictions == 6
        assert s.check().ok


def test_last_access_survives_restart(tmp_path, rng):
    bs = NS.block_size
    x, y = random_tokens(rng, bs), random_tokens(rng, bs)
    path = tmp_path / "s"
    with BlockStore(path) as s:
        s.put_blocks(NS, x, 0, [random_payload(rng)])
        s.put_blocks(NS, y, 0, [random_payload(rng)])
        s.get_block(NS, x, 0)  # x more recent than y (batched in memory until close)
    with BlockStore(path) as s:
        s.evict(1)
        assert s.lookup(NS, y) == 0 and s.lookup(NS, x) == 1


def test_budget_is_never_exceeded(tmp_path, rng):
    big = dataclasses.replace(NS, num_layers=4, num_kv_heads=4, head_dim=64, block_size=16)  # 64 KiB
    budget = 1 << 20
    with BlockStore(tmp_path / "s", StoreConfig(max_bytes=budget)) as s:
        chains = []
        for _ in range(15):
            toks = random_tokens(rng, 4 * big.block_size)
            s.put_blocks(big, toks, 0, [random_payload(rng, big) for _ in range(4)])
            chains.append(toks)
            st = s.stats()
            assert st.bytes_on_disk <= budget
            assert _disk_bytes(tmp_path / "s") == st.payload_bytes
            lmdb_file = os.path.getsize(tmp_path / "s" / "index" / "data.mdb")
            assert st.payload_bytes + min(lmdb_file, st.index_bytes) <= budget
        assert s.stats().evictions > 0
        assert s.lookup(big, chains[-1]) == 4  # the newest chain survived intact
        assert s.check().ok


def test_put_larger_than_budget_is_resource_exhausted(tmp_path, rng):
    bs = NS.block_size
    with BlockStore(tmp_path / "s", StoreConfig(max_bytes=64 * 1024)) as s:
        with pytest.raises(ResourceExhausted):
            s.put_blocks(NS, random_tokens(rng, 40 * bs), 0, [random_payload(rng) for _ in range(40)])
        assert s.stats().blocks == 0
        assert os.listdir(s.blocks_dir) == []


def test_evicting_never_orphans(tmp_path, rng):
    bs = NS.block_size
    toks = random_tokens(rng, 5 * bs)
    with BlockStore(tmp_path / "s") as s:
        s.put_blocks(NS, toks, 0, [random_payload(rng) for _ in range(5)])
        for _ in range(5):
            s.get_block(NS, toks, 0)  # the root is the most recent: still it must go last
            s.evict(1)
            n = s.lookup(NS, toks)
            for i in range(n):
                s.get_block(NS, toks, i)
            with pytest.raises(NotFound):
                s.get_block(NS, toks, n) if n < 5 else (_ for _ in ()).throw(NotFound(""))
        assert s.lookup(NS, toks) == 0
