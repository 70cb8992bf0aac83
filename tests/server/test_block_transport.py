"""Moving blocks between the daemon and a generator (issue 16), over a real daemon on loopback
and a real store: same-host reads of the payload files (Locate + pread + XXH3), parallel gRPC
streams, leases against eviction, and uploads in bounded pieces.

The races are staged with the real files: what a racing eviction or put does to a reader is
remove or replace the file between the daemon's answer and the read, which is what these tests
do at exactly that point."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tqstore.blocks import PrefixKV
from tqstore.client import KvStoreClient
from tqstore.config import ClientConfig, StoreConfig
from tqstore.direct_read import DirectReader
from tqstore.errors import NotFound, ResourceExhausted
from tqstore.payload_format import file_name
from tqstore.prefix_hash import Namespace, hash_prefix_blocks
from tqstore.ssd.store import BlockStore

from tests.server.conftest import MiB, random_blocks


@pytest.fixture(params=["c", "python"])
def read_loop(request, monkeypatch):
    """Same-host reads through the C loop (tq_read.c) and through the Python loop: the same
    bytes and the same refusals."""
    from tqstore import direct_read
    from tqstore.native import read_verify

    if request.param == "c":
        from tqstore.native import build

        if build.load() is None:
            pytest.skip("no C compiler on this machine: the Python loop serves")
        # Where the library builds, the C loop must pass its self-check and serve.
        assert read_verify.available()
        results = []

        def counted(*args):
            results.append(read_verify.read_verify(*args))
            return results[-1]

        monkeypatch.setattr(direct_read, "read_verify", counted)
        yield results
        assert results and None not in results, "the C loop did not serve"
    else:
        monkeypatch.setattr(direct_read, "NATIVE_READS", False)
        yield None


def _tokens(rng, ns: Namespace, blocks: int) -> list[int]:
    return rng.integers(0, 49152, size=ns.block_size * blocks + 3).tolist()


def _same(prefix: PrefixKV, blocks) -> bool:
    return len(prefix) == len(blocks) and all(
        np.array_equal(prefix.block(i).keys, b.keys) and np.array_equal(prefix.block(i).values, b.values)
        for i, b in enumerate(blocks))


def _payload_path(daemon, ns: Namespace, tokens: list[int], index: int) -> str:
    key = hash_prefix_blocks(ns, tokens[: (index + 1) * ns.block_size])[index]
    return os.path.join(daemon.store.blocks_dir, file_name(key))


def test_same_host_fetch_reads_the_files_and_equals_grpc_bitwise(daemon, namespace, rng, read_loop):
    tokens = _tokens(rng, namespace, 6)
    blocks = random_blocks(namespace, 6, rng)
    with KvStoreClient(daemon.address) as local, \
            KvStoreClient(ClientConfig(daemon.address, direct_reads="off")) as remote:
        assert local.direct_reads and not remote.direct_reads
        assert local.put(namespace, tokens, 0, blocks) == 6
        direct = local.fetch_fp16_prefix(namespace, tokens, 0, 6)
        wire = remote.fetch_fp16_prefix(namespace, tokens, 0, 6)
        assert (direct.source, wire.source) == ("direct", "grpc")
        assert _same(direct, blocks) and _same(wire, blocks)
        assert direct.keys.tobytes() == wire.keys.tobytes()
        assert direct.keys.shape == (namespace.num_layers, namespace.num_kv_heads,
                                     6 * namespace.block_size, namespace.head_dim)
        # A run starting inside the chain, and a request past what is stored: the stored part.
        assert _same(local.fetch_fp16_prefix(namespace, tokens, 2, 3), blocks[2:5])
        longer = tokens + _tokens(rng, namespace, 2)
        assert _same(local.fetch_fp16_prefix(namespace, longer, 0, 8), blocks)
        with pytest.raises(NotFound):
            local.fetch_fp16_prefix(Namespace("other", 4, 2, 64, 16), tokens, 0, 2)


def test_a_payload_evicted_or_replaced_after_locate_is_a_shorter_hit_never_wrong(daemon, namespace, rng, read_loop):
    tokens = _tokens(rng, namespace, 5)
    blocks = random_blocks(namespace, 5, rng)
    with KvStoreClient(daemon.address) as client:
        client.put(namespace, tokens, 0, blocks)
        located = client._locate(namespace, tokens, 0, 5)
        assert [b.block_index for b in located.blocks] == [0, 1, 2, 3, 4]
        hashes = hash_prefix_blocks(namespace, tokens[: 5 * namespace.block_size])
        # Evicted between the answer and the read: the reader stops before the missing file.
        os.unlink(_payload_path(daemon, namespace, tokens, 3))
        out = PrefixKV.empty((4, 2, 16, 64), 5)
        assert client._reader.read(located, hashes, out, 0) == 3
        assert _same(out.head(3), blocks[:3])
        # Replaced by a file of the same size and a valid header whose body differs: checksums.
        victim = _payload_path(daemon, namespace, tokens, 1)
        raw = bytearray(open(victim, "rb").read())
        raw[-1] ^= 0x40
        with open(victim + ".new", "wb") as f:
            f.write(raw)
        os.replace(victim + ".new", victim)
        assert client._reader.read(located, hashes, PrefixKV.empty((4, 2, 16, 64), 5), 0) == 1
        # The whole fetch: block 0 read here, block 1 asked of the daemon, which finds it damaged
        # too: a one-block hit, and the daemon quarantined what it could not verify.
        got = client.fetch_fp16_prefix(namespace, tokens, 0, 5)
        assert got.source == "direct+grpc" and _same(got, blocks[:1])
        assert client.lookup(namespace, tokens).hit_blocks == 1


def test_a_block_put_again_after_eviction_is_read_whole_from_one_put(daemon, namespace, rng, read_loop):
    """Evicted and put again with other bytes (another machine's prefill) between Locate and the
    read: the old checksums reject the new file, and the gRPC fallback serves the new block."""
    tokens = _tokens(rng, namespace, 3)
    first, second = random_blocks(namespace, 3, rng), random_blocks(namespace, 3, rng)
    with KvStoreClient(daemon.address) as client:
        client.put(namespace, tokens, 0, first)
        located = client._locate(namespace, tokens, 0, 3)
        hashes = hash_prefix_blocks(namespace, tokens[: 3 * namespace.block_size])
        daemon.store.evict(1 << 40)
        assert client.lookup(namespace, tokens).hit_blocks == 0
        client.put(namespace, tokens, 0, second)
        assert client._reader.read(located, hashes, PrefixKV.empty((4, 2, 16, 64), 3), 0) == 0
        assert _same(client.fetch_fp16_prefix(namespace, tokens, 0, 3), second)


def test_a_store_this_process_cannot_see_falls_back_to_grpc(daemon, namespace, rng):
    tokens = _tokens(rng, namespace, 2)
    blocks = random_blocks(namespace, 2, rng)
    with open(os.path.join(daemon.config.path, "store.id"), "w") as f:
        f.write("another-store")  # what a client in another container or host would read
    with KvStoreClient(daemon.address) as client:
        client.put(namespace, tokens, 0, blocks)
        got = client.fetch_fp16_prefix(namespace, tokens, 0, 2)
        assert got.source == "grpc" and _same(got, blocks) and not client.direct_reads


def test_parallel_streams_assemble_in_place_and_stop_at_a_missing_block(daemon, namespace, rng):
    tokens = _tokens(rng, namespace, 12)
    blocks = random_blocks(namespace, 12, rng)
    config = ClientConfig(daemon.address, direct_reads="off", fetch_streams=4, min_stream_bytes=1)
    with KvStoreClient(config) as client:
        client.put(namespace, tokens, 0, blocks)
        got = client.fetch_fp16_prefix(namespace, tokens, 0, 12)
        assert _same(got, blocks) and len(client._stream_stubs) == 4
        os.unlink(_payload_path(daemon, namespace, tokens, 7))  # inside the third stream's range
        assert _same(client.fetch_fp16_prefix(namespace, tokens, 0, 12), blocks[:7])


def test_leased_blocks_are_evicted_last_and_never_block_a_put(tmp_path, rng):
    ns = Namespace("lease-model", num_layers=4, num_kv_heads=1, head_dim=128, block_size=64)
    leased_chain, other_chain, third_chain = (_tokens(rng, ns, 4) for _ in range(3))
    with BlockStore(tmp_path / "kv", StoreConfig(map_size=64 * MiB)) as store:
        store.put_blocks(ns, leased_chain, 0, random_blocks(ns, 4, rng))
        store.put_blocks(ns, other_chain, 0, random_blocks(ns, 4, rng))
        used = store.stats().bytes_on_disk
    # Reopened with a budget that fits these two chains and half of a third next to them (a
    # block is 128 KiB; a put also reserves room for the index's growth).
    index_reserve = 16 * 4096 + 4 * (3 * 4 * 64 + 2400)
    budget = StoreConfig(max_bytes=used + index_reserve + 2 * 132 * 1024, map_size=64 * MiB)
    with BlockStore(tmp_path / "kv", budget) as store:
        assert len(store.locate(ns, leased_chain, 0, 0, lease_s=60)) == 4
        for i in range(4):  # the other chain is now the most recently used
            store.get_block(ns, other_chain, i)
        # LRU alone would take the leased chain first; the lease sends the other one first.
        store.put_blocks(ns, third_chain, 0, random_blocks(ns, 4, rng))
        assert store.lookup(ns, leased_chain) == 4
        assert store.lookup(ns, other_chain) < 4
        # Only leased blocks can make room: the put still succeeds, the lease gives way.
        store.put_blocks(ns, _tokens(rng, ns, 8), 0, random_blocks(ns, 8, rng))
        assert store.lookup(ns, leased_chain) < 4


def test_expired_leases_protect_nothing(tmp_path, rng):
    ns = Namespace("lease-model", num_layers=2, num_kv_heads=1, head_dim=64, block_size=16)
    with BlockStore(tmp_path / "kv", StoreConfig(map_size=64 * MiB)) as store:
        chain = _tokens(rng, ns, 2)
        store.put_blocks(ns, chain, 0, random_blocks(ns, 2, rng))
        store.locate(ns, chain, 0, 0, lease_s=0.0)
        assert store.leases.live() == frozenset()
        store.locate(ns, chain, 0, 0, lease_s=60)
        assert len(store.leases.live()) == 2


def test_a_long_upload_goes_in_bounded_pieces(daemon, namespace, rng):
    """The fixture's daemon takes at most 8 MiB per Put stream; 300 blocks are 9.4 MiB."""
    tokens = _tokens(rng, namespace, 300)
    blocks = random_blocks(namespace, 300, rng)
    with KvStoreClient(ClientConfig(daemon.address, put_piece_bytes=64 * MiB)) as whole:
        with pytest.raises(ResourceExhausted, match="Put stream over"):
            whole.put(namespace, tokens, 0, blocks)
    with KvStoreClient(ClientConfig(daemon.address, put_piece_bytes=1 * MiB)) as pieces:
        assert pieces.put(namespace, tokens, 0, blocks) == 300
        assert pieces.lookup(namespace, tokens).hit_blocks == 300
        assert _same(pieces.fetch_fp16_prefix(namespace, tokens, 0, 300), blocks)


def test_shares_files_needs_the_daemons_store_id_beside_its_blocks(tmp_path):
    from tqstore.payload_format import FILE_VERSION
    from tqstore.v1 import tqstore_pb2 as pb

    (tmp_path / "blocks").mkdir()
    (tmp_path / "store.id").write_text("abc")
    answer = pb.LocateResponse(blocks_dir=str(tmp_path / "blocks"), store_id="abc",
                               payload_version=FILE_VERSION)
    assert DirectReader.shares_files(answer)
    for wrong in (dict(store_id="abd"), dict(store_id=""), dict(payload_version=FILE_VERSION + 1),
                  dict(blocks_dir=str(tmp_path / "elsewhere" / "blocks"))):
        changed = pb.LocateResponse()
        changed.CopyFrom(answer)
        for k, v in wrong.items():
            setattr(changed, k, v)
        assert not DirectReader.shares_files(changed), wrong


@pytest.mark.parametrize("direct", ["auto", "off"])
def test_one_client_fetching_on_several_threads_at_once(daemon, namespace, rng, direct):
    """The serving engine fetches on two threads through one client: the reader and the stream
    channels are made once, and every fetch gets its own bytes."""
    from concurrent.futures import ThreadPoolExecutor

    chains = [_tokens(rng, namespace, 6) for _ in range(4)]
    blocks = [random_blocks(namespace, 6, rng) for _ in chains]
    config = ClientConfig(daemon.address, direct_reads=direct, min_stream_bytes=1)
    with KvStoreClient(config) as client:
        for tokens, chain in zip(chains, blocks):
            client.put(namespace, tokens, 0, chain)
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda t: client.fetch_fp16_prefix(namespace, t, 0, 6), chains * 3))
        assert all(_same(g, blocks[i % 4]) for i, g in enumerate(got))
        assert len(client._stream_stubs) <= config.fetch_streams


@pytest.mark.parametrize("address, local", [
    ("unix:/tmp/kv.sock", True), ("127.0.0.1:50077", True), ("127.0.0.2:1", True),
    ("localhost:80", True), ("[::1]:50077", True), ("10.0.0.5:50077", False),
    ("kv.example.com:50077", False), ("[2001:db8::1]:1", False)])
def test_which_addresses_count_as_this_host(address, local):
    """Same-host reads are tried by default only here (and the daemon warns off loopback)."""
    from tqstore.config import ServerConfig, is_local_address

    assert is_local_address(address) is local
    assert ClientConfig(address).is_local is local
    assert ServerConfig(path="unused", listen=address).is_loopback is local


@pytest.mark.parametrize("piece_bytes", [1, 8192, 1 << 30])
def test_blocks_read_in_pieces_across_threads_equal_the_put_and_stop_at_damage(tmp_path, rng, piece_bytes, read_loop):
    """Pieces of whole checksum chunks (a chunk per piece, two, or the whole block), cut through
    the middle of (layer, head) runs (head_dim 48: a run is 1,536 bytes, a chunk 4,096): the
    bytes equal the put, and a damaged chunk inside one piece fails its whole block."""
    from tqstore.daemon import Daemon
    from tqstore.config import ServerConfig

    ns = Namespace("pieces", num_layers=3, num_kv_heads=2, head_dim=48, block_size=16)
    config = ServerConfig(path=str(tmp_path / "kv"), listen="127.0.0.1:0", drain_seconds=2,
                          store=StoreConfig(max_bytes=64 * MiB, map_size=64 * MiB,
                                            checksum_chunk=4096))
    daemon = Daemon(config).start()
    reader = DirectReader(threads=3, piece_bytes=piece_bytes)
    try:
        tokens = _tokens(rng, ns, 4)
        blocks = random_blocks(ns, 4, rng)
        with KvStoreClient(daemon.address) as client:
            client.put(ns, tokens, 0, blocks)
            located = client._locate(ns, tokens, 0, 4)
            # K then V, 9,216 bytes each: chunks of 4,096, 4,096 and 1,024 bytes each.
            assert list(located.blocks[0].chunk_lengths) == [4096, 4096, 1024] * 2
        hashes = hash_prefix_blocks(ns, tokens[: 4 * ns.block_size])
        layout = (ns.num_layers, ns.num_kv_heads, ns.block_size, ns.head_dim)
        out = PrefixKV.empty(layout, 4)
        assert reader.read(located, hashes, out, 0) == 4 and _same(out, blocks)
        # One byte of block 2's third chunk, in the middle of the file.
        path = os.path.join(daemon.store.blocks_dir, file_name(hashes[2]))
        raw = bytearray(open(path, "rb").read())
        raw[-18432 + 2 * 4096 + 100] ^= 0x01
        with open(path, "wb") as f:
            f.write(raw)
        out = PrefixKV.empty(layout, 4)
        assert reader.read(located, hashes, out, 0) == 2 and _same(out.head(2), blocks[:2])
    finally:
        reader.close()
        daemon.stop(grace=1)


def test_pieces_cover_the_body_once_at_chunk_boundaries():
    from tqstore.direct_read import _pieces, _Runs, _views
    from tqstore.v1 import tqstore_pb2 as pb

    # 18,432 bytes in 12 runs of 1,536 bytes, run i at byte 10,000 * i of a buffer.
    memory = np.zeros(120_000, dtype=np.uint8)
    base = memory.ctypes.data
    runs = _Runs(base + np.arange(12, dtype=np.uint64) * np.uint64(10_000),
                 np.full(12, 1536, np.uint64))
    lengths = [4096] * 4 + [2048]
    loc = pb.BlockLocation(compression="none", stored_size=18432, raw_size=18432,
                           file_size=20000, chunk_lengths=lengths, chunk_checksums=[7] * 5)
    for piece_bytes, starts in ((1, [0, 4096, 8192, 12288, 16384]), (8192, [0, 8192, 16384]),
                                (10000, [0, 8192, 16384]), (1 << 30, [0])):
        pieces = _pieces(loc, runs, piece_bytes)
        assert [p[1] for p in pieces] == starts
        assert [sum(len(r) for r in _views(p[2])) for p in pieces] == [sum(p[3]) for p in pieces]
        for _, start, cut, chunks, _ in pieces:
            # Piece byte b of the body is run b // 1536's byte b % 1536, at 10,000 * (b // 1536)
            # + b % 1536 of the buffer.
            assert int(cut.lengths.sum()) == sum(chunks)
            at = start
            for address, length in zip(cut.addresses.tolist(), cut.lengths.tolist()):
                assert address == base + 10_000 * (at // 1536) + at % 1536
                assert length == min(1536 - at % 1536, start + sum(chunks) - at)
                at += length
        assert sum(sum(p[3]) for p in pieces) == 18432
        assert [c for p in pieces for c in p[3]] == lengths
    # Descriptions that do not fit this body are not read at all.
    for bad in (dict(compression="zstd"), dict(stored_size=18431), dict(file_size=18432),
                dict(chunk_lengths=[4096] * 4 + [2047]), dict(chunk_checksums=[7] * 4)):
        fields = dict(compression="none", stored_size=18432, raw_size=18432, file_size=20000,
                      chunk_lengths=lengths, chunk_checksums=[7] * 5)
        fields.update(bad)
        assert _pieces(pb.BlockLocation(**fields), runs, 8192) == []
