"""Round trip, persistence, validation, namespaces, compression modes."""

import dataclasses

import numpy as np
import pytest

from tqstore.blocks import BlockPayload
from tqstore.errors import InvalidArgument, NotFound, Unavailable
from tqstore.prefix_hash import hash_prefix_blocks
from tqstore.ssd import BlockStore, StoreConfig

from .conftest import NS, random_payload, random_tokens, same_bits


def test_bitwise_round_trip_including_special_values(store, rng):
    toks = random_tokens(rng, 3 * NS.block_size + 5)
    pls = [random_payload(rng) for _ in range(3)]
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 6.1e-5, 65504], dtype=np.float16)
    pls[1].keys.reshape(-1)[: special.size] = special
    hashes = store.put_blocks(NS, toks, 0, pls)
    assert hashes == hash_prefix_blocks(NS, toks)
    for i, p in enumerate(pls):
        assert same_bits(store.get_block(NS, toks, i), p)
    assert store.lookup(NS, toks) == 3
    assert store.lookup(NS, toks[: 2 * NS.block_size + 7]) == 2
    assert store.lookup(NS, random_tokens(rng, 40)) == 0


def test_restart_persistence(tmp_path, rng):
    toks = random_tokens(rng, 4 * NS.block_size)
    pls = [random_payload(rng) for _ in range(4)]
    with BlockStore(tmp_path / "s") as s:
        s.put_blocks(NS, toks, 0, pls[:2])
        s.put_blocks(NS, toks, 2, pls[2:])
        s.get_block(NS, toks, 1)
        s.lookup(NS, toks)
    with BlockStore(tmp_path / "s") as s:
        assert s.lookup(NS, toks) == 4
        for i in range(4):
            assert same_bits(s.get_block(NS, toks, i), pls[i])
        st = s.stats()
    assert st.blocks == 4 and st.lookups == 2 and st.get_hits == 5
    assert st.hit_tokens == 8 * NS.block_size and st.lookup_tokens == 8 * NS.block_size
    assert st.logical_bytes == 4 * 2 * pls[0].keys.nbytes
    assert [(r.model, r.blocks, r.layout) for r in st.namespaces] == [(NS.model_fingerprint, 4, (3, 2, 8, 16))]
    assert st.block_size_histogram == {8: 4}
    assert st.bytes_on_disk == st.payload_bytes + st.index_bytes


def test_put_is_idempotent_and_needs_its_prefix(store, rng):
    toks = random_tokens(rng, 3 * NS.block_size)
    pls = [random_payload(rng) for _ in range(3)]
    with pytest.raises(NotFound):
        store.put_blocks(NS, toks, 1, pls[1:2])
    store.put_blocks(NS, toks, 0, pls[:2])
    before = store.stats()
    again = store.put_blocks(NS, toks, 0, pls[:3])
    assert again == hash_prefix_blocks(NS, toks)
    after = store.stats()
    assert after.blocks == before.blocks + 1 == 3
    assert same_bits(store.get_block(NS, toks, 2), pls[2])


@pytest.mark.parametrize("change", ["shape", "dtype", "values_shape"])
def test_layout_mismatch_is_invalid(store, rng, change):
    p = random_payload(rng)
    if change == "shape":
        p = BlockPayload(p.keys[:, :1], p.values[:, :1])
    elif change == "dtype":
        p = BlockPayload(p.keys.astype(np.float32), p.values)
    else:
        p = BlockPayload(p.keys, p.values[:2])
    with pytest.raises(InvalidArgument):
        store.put_blocks(NS, random_tokens(rng, NS.block_size), 0, [p])
    assert store.stats().blocks == 0


def test_tokens_must_cover_the_blocks(store, rng):
    with pytest.raises(InvalidArgument):
        store.put_blocks(NS, random_tokens(rng, NS.block_size - 1), 0, [random_payload(rng)])
    with pytest.raises(InvalidArgument):
        store.get_block(NS, random_tokens(rng, NS.block_size), 1)


@pytest.mark.parametrize("other", [
    dataclasses.replace(NS, model_fingerprint="other-model"),
    dataclasses.replace(NS, format_version=NS.format_version + 1),
    dataclasses.replace(NS, num_kv_heads=1),
    dataclasses.replace(NS, block_size=4),
])
def test_namespaces_never_mix(store, rng, other):
    toks = random_tokens(rng, 2 * NS.block_size)
    store.put_blocks(NS, toks, 0, [random_payload(rng), random_payload(rng)])
    assert store.lookup(other, toks) == 0
    with pytest.raises(NotFound):
        store.get_block(other, toks, 0)
    assert store.stats().verification_failures == 0
    # The other namespace can hold the same tokens independently.
    p = random_payload(rng, other)
    store.put_blocks(other, toks, 0, [p])
    assert same_bits(store.get_block(other, toks, 0), p)
    assert store.lookup(NS, toks) == 2
    assert len(store.stats().namespaces) == 2


@pytest.mark.parametrize("compression", ["zstd", "zstd-planes"])
def test_compression_modes_round_trip(tmp_path, rng, compression):
    toks = random_tokens(rng, 2 * NS.block_size)
    smooth = np.cumsum(rng.standard_normal((3, 2, 8, 16)), axis=-1).astype(np.float16)
    pls = [BlockPayload(smooth, smooth * 0.5), random_payload(rng)]
    with BlockStore(tmp_path / "s", StoreConfig(compression=compression)) as s:
        s.put_blocks(NS, toks, 0, pls)
    with BlockStore(tmp_path / "s") as s:  # reading needs no config: the record says how
        for i in range(2):
            assert same_bits(s.get_block(NS, toks, i), pls[i])
        assert s.check().ok


def test_single_writer_and_readonly(tmp_path, rng):
    toks = random_tokens(rng, NS.block_size)
    with BlockStore(tmp_path / "s") as s:
        with pytest.raises(Unavailable):
            BlockStore(tmp_path / "s")
        s.put_blocks(NS, toks, 0, [random_payload(rng)])
    # (readonly beside a live writer is another process: test_concurrency.py; py-lmdb refuses
    # to open one environment twice in a process)
    with BlockStore(tmp_path / "s", readonly=True) as r:
        assert r.lookup(NS, toks) == 1
        with pytest.raises(InvalidArgument):
            r.put_blocks(NS, toks, 0, [random_payload(rng)])
    with pytest.raises(NotFound):
        BlockStore(tmp_path / "nothing", readonly=True)
