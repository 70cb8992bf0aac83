"""Hostile and oversized input (issue 17): every bad request gets INVALID_ARGUMENT or
RESOURCE_EXHAUSTED (never INTERNAL or UNKNOWN), its work is bounded, and the daemon keeps
serving the blocks it held. A real daemon on loopback with small limits."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import lmdb
import numpy as np
import pytest

from tqstore.cli.inspect import render, summarize
from tqstore.client import KvStoreClient
from tqstore.config import ClientConfig, ServerConfig, StoreConfig
from tqstore.daemon import Daemon
from tqstore.errors import ResourceExhausted
from tqstore.payload_format import file_name
from tqstore.prefix_hash import Namespace, hash_prefix_blocks
from tqstore.server import _status_for
from tqstore.ssd.store import BlockStore
from tqstore.v1 import tqstore_pb2 as pb
from tqstore.v1 import tqstore_pb2_grpc as pb_grpc
from tqstore.wire import fp16_chunks, namespace_to_proto

from tests.server.conftest import MiB, random_blocks

ROOT = Path(__file__).resolve().parents[2]
NS = Namespace("hostile-test", num_layers=2, num_kv_heads=2, head_dim=16, block_size=16)
LIMITS = dict(max_request_tokens=4096, min_block_size=16, max_request_blocks=64,
              heavy_request_tokens=1024, max_heavy_requests=1, max_string_bytes=64,
              max_stats_namespaces=3)
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


def _config(path: Path) -> ServerConfig:
    return ServerConfig(path=str(path), listen="127.0.0.1:0", drain_seconds=1,
                        max_put_bytes=8 * MiB, **LIMITS,
                        store=StoreConfig(max_bytes=256 * MiB, map_size=128 * MiB))


@pytest.fixture
def small(tmp_path, rng):
    """A daemon with small limits holding one 4-block chain: (daemon, stub, tokens, blocks)."""
    d = Daemon(_config(tmp_path / "kv")).start()
    tokens = rng.integers(0, 50000, NS.block_size * 4 + 3).tolist()
    blocks = random_blocks(NS, 4, rng)
    with KvStoreClient(ClientConfig(d.address, direct_reads="off")) as c:
        assert c.put(NS, tokens, 0, blocks) == 4
    channel = grpc.insecure_channel(d.address)
    yield d, pb_grpc.KvStoreStub(channel), tokens, blocks
    channel.close()
    d.stop(grace=1)


def _code(call, *args) -> grpc.StatusCode:
    try:
        result = call(*args)
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _still_serving(daemon, tokens, blocks) -> None:
    """A normal Lookup answers and the chain stored before the bad requests is unchanged."""
    with KvStoreClient(ClientConfig(daemon.address, direct_reads="off")) as c:
        assert c.lookup(NS, tokens).hit_blocks == len(blocks)
        got = c.fetch_fp16(NS, tokens)
    assert [g.keys.tobytes() + g.values.tobytes() for g in got] == \
           [b.keys.tobytes() + b.values.tobytes() for b in blocks]


def _ns(**changes) -> pb.Namespace:
    msg = namespace_to_proto(NS)
    for name, value in changes.items():
        setattr(msg, name, value)
    return msg


def test_oversized_requests_are_refused_before_the_work(small):
    daemon, stub, tokens, blocks = small
    too_many = [7] * (LIMITS["max_request_tokens"] + 1)
    assert _code(stub.Lookup, pb.LookupRequest(namespace=_ns(), token_ids=too_many)) == INVALID
    assert _code(stub.Fetch, pb.FetchRequest(namespace=_ns(), token_ids=too_many)) == INVALID
    assert _code(stub.Locate, pb.LocateRequest(namespace=_ns(), token_ids=too_many)) == INVALID
    assert _code(stub.Put, iter([pb.PutRequest(namespace=_ns(), token_ids=too_many)])) == INVALID
    tiny = _ns(block_size=LIMITS["min_block_size"] - 1)
    assert _code(stub.Lookup, pb.LookupRequest(namespace=tiny, token_ids=tokens)) == INVALID
    long = [1] * (16 * 100)  # 100 full blocks, over max_request_blocks (64)
    assert _code(stub.Fetch, pb.FetchRequest(namespace=_ns(), token_ids=long, num_blocks=65)) == INVALID
    assert _code(stub.Locate, pb.LocateRequest(namespace=_ns(), token_ids=long, num_blocks=65)) == INVALID
    # num_blocks 0 ("to the end") is capped at the bound, not refused: a miss here.
    assert _code(stub.Locate, pb.LocateRequest(namespace=_ns(), token_ids=long)) == grpc.StatusCode.OK
    _still_serving(daemon, tokens, blocks)


def test_heavy_requests_take_slots_and_never_queue_small_ones(small):
    """One heavy slot: a Put stream over heavy_request_tokens holds it (its stream stays open);
    a second heavy request is refused at once; a small Lookup is served meanwhile."""
    daemon, stub, tokens, blocks = small
    heavy = tokens[:16] * 80  # 1280 token ids > heavy_request_tokens (1024)
    release = threading.Event()

    def stream():
        yield pb.PutRequest(namespace=_ns(), token_ids=heavy)
        release.wait(30)

    holder = stub.Put.future(stream())
    try:
        # Wait on the daemon's own count (probing with heavy Lookups raced the Put: a Lookup
        # holding the one slot when the Put's header arrived got the Put refused instead).
        deadline = time.monotonic() + 20
        while daemon.service._heavy.in_use < 1:
            assert time.monotonic() < deadline, "the heavy Put never took its slot"
            time.sleep(0.01)
        assert _code(stub.Lookup, pb.LookupRequest(namespace=_ns(), token_ids=heavy)) == EXHAUSTED
        assert stub.Lookup(pb.LookupRequest(namespace=_ns(), token_ids=tokens)).hit_blocks == 4
    finally:
        release.set()
    assert holder.result(timeout=30).stored_blocks == 0
    assert stub.Lookup(pb.LookupRequest(namespace=_ns(), token_ids=heavy)).hit_blocks == 1
    _still_serving(daemon, tokens, blocks)


def test_strings_dtypes_and_stats_are_bounded(tmp_path, rng):
    """A store written before the bound holds a 1 MiB fingerprint: Stats still answers (the row
    cut to max_string_bytes), lists the largest namespaces and counts the others; new long
    fingerprints, empty or unknown dtypes are refused."""
    path = tmp_path / "kv"
    models = ["m" * (1 << 20), "a", "b", "c", "d"]
    with BlockStore(str(path), StoreConfig(max_bytes=256 * MiB, map_size=128 * MiB)) as store:
        for model, n in zip(models, [5, 1, 2, 3, 4]):
            ns = Namespace(model, 2, 2, 16, 16)
            store.put_blocks(ns, list(range(16 * n)), 0, random_blocks(ns, n, rng))
    daemon = Daemon(_config(path)).start()
    try:
        channel = grpc.insecure_channel(daemon.address)
        stub = pb_grpc.KvStoreStub(channel)
        stats = stub.Stats(pb.StatsRequest())
        assert [n.model for n in stats.namespaces] == ["m" * 64, "d", "c"]  # largest first
        assert stats.namespaces_omitted == 2 and stats.blocks == 15
        tokens = list(range(16))
        for ns in (_ns(model_fingerprint="x" * 65), _ns(model_fingerprint="é" * 33),
                   _ns(model_fingerprint=""), _ns(kv_dtype=""), _ns(kv_dtype="bfloat16")):
            assert _code(stub.Lookup, pb.LookupRequest(namespace=ns, token_ids=tokens)) == INVALID
        assert _code(stub.Lookup, pb.LookupRequest(namespace=_ns(model_fingerprint="x" * 64),
                                                   token_ids=tokens)) == grpc.StatusCode.OK
        channel.close()
    finally:
        daemon.stop(grace=1)
    with BlockStore(str(path), readonly=True) as store:  # the store itself is untouched
        assert sorted(len(n.model) for n in store.stats().namespaces) == [1, 1, 1, 1, 1 << 20]


def test_undecodable_bytes_and_deep_profiles_are_invalid_argument(small):
    daemon, stub, tokens, blocks = small
    channel = grpc.insecure_channel(daemon.address)
    ident = lambda b: b  # noqa: E731
    junk = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length past the end
    for method in ("Lookup", "Locate", "Stats"):
        call = channel.unary_unary(f"/tqstore.v1.KvStore/{method}", ident, ident)
        with pytest.raises(grpc.RpcError) as err:
            call(junk)
        assert err.value.code() == INVALID and "does not decode" in err.value.details()
    fetch = channel.unary_stream("/tqstore.v1.KvStore/Fetch", ident, ident)
    assert _code(lambda: fetch(junk)) == INVALID
    put = channel.stream_unary("/tqstore.v1.KvStore/Put", ident, ident)
    first = pb.PutRequest(namespace=_ns(), token_ids=tokens).SerializeToString()
    assert _code(lambda: put(iter([first, junk]))) == INVALID
    depth = 20000
    head = ("[" * depth + "]" * depth).encode()
    profile = b"TQPROF1\0" + len(head).to_bytes(4, "little") + head
    request = pb.FetchRequest(namespace=_ns(), token_ids=tokens, form=pb.KV_FORM_TURBOQUANT,
                              codec=pb.CodecSettings(key_bits=4, value_bits=4, profile=profile))
    assert _code(stub.Fetch, request) == INVALID
    request.codec.profile = b"\0" * (5 << 20)  # over the profile bound
    assert _code(stub.Fetch, request) == INVALID
    channel.close()
    _still_serving(daemon, tokens, blocks)


def test_environment_failures_map_to_retryable_codes():
    """Disk full and a damaged index are the environment's fault: RESOURCE_EXHAUSTED and
    UNAVAILABLE, never INTERNAL (the store's own errors are mapped the same way)."""
    assert _status_for(OSError(errno.ENOSPC, "No space left on device")) == EXHAUSTED
    assert _status_for(OSError(errno.EDQUOT, "Disk quota exceeded")) == EXHAUSTED
    assert _status_for(ResourceExhausted("disk full")) == EXHAUSTED
    assert _status_for(lmdb.CorruptedError("MDB_CORRUPTED")) == grpc.StatusCode.UNAVAILABLE
    assert _status_for(lmdb.MapFullError("full")) == EXHAUSTED
    assert _status_for(OSError(errno.EIO, "I/O error")) == grpc.StatusCode.UNAVAILABLE
    assert _status_for(RuntimeError("a bug")) == grpc.StatusCode.INTERNAL


def test_lax_messages_are_refused(small, rng):
    daemon, stub, tokens, blocks = small
    fetch = pb.FetchRequest(namespace=_ns(), token_ids=tokens, form=7)
    assert _code(stub.Fetch, fetch) == INVALID  # unknown KvForm, not served as fp16
    fresh = rng.integers(0, 50000, 16 * 2).tolist()
    payload = random_blocks(NS, 2, rng)
    chunks = [pb.PutRequest(chunk=c) for i, p in enumerate(payload)
              for c in fp16_chunks(NS, i, p.keys, p.values)]
    head = pb.PutRequest(namespace=_ns(), token_ids=fresh)
    late = [pb.PutRequest(chunk=chunks[0].chunk, first_block=1),
            pb.PutRequest(chunk=chunks[0].chunk, token_ids=[1]),
            pb.PutRequest(chunk=chunks[0].chunk, namespace=_ns(model_fingerprint="other"))]
    for bad in late:  # a later message's header fields are refused, not ignored
        assert _code(stub.Put, iter([head, bad] + chunks[1:])) == INVALID
    other = random_blocks(NS, 1, rng)[0]
    again = [pb.PutRequest(chunk=c) for c in fp16_chunks(NS, 0, other.keys, other.values)]
    assert _code(stub.Put, iter([head] + chunks + again)) == INVALID  # block 0 twice
    assert stub.Lookup(pb.LookupRequest(namespace=_ns(), token_ids=fresh)).hit_blocks == 0
    assert stub.Put(iter([head] + chunks)).stored_blocks == 2  # the same stream, well formed
    _still_serving(daemon, tokens, blocks)


@pytest.mark.parametrize("direct_reads", ["off", "on"])
def test_payload_damaged_after_a_lookup_hit_gives_the_verified_shorter_prefix(small, direct_reads):
    """Lookup verifies index records, not payload bytes: damage block 2's payload after a hit of
    4 and the client's fetch returns blocks 0-1, bit-exact."""
    daemon, stub, tokens, blocks = small
    with KvStoreClient(ClientConfig(daemon.address, direct_reads=direct_reads)) as c:
        assert c.lookup(NS, tokens).hit_blocks == 4
        key = hash_prefix_blocks(NS, tokens)[2]
        path = os.path.join(daemon.store.blocks_dir, file_name(key))
        with open(path, "r+b") as f:
            f.seek(-100, os.SEEK_END)  # inside the body, which ends the file (payload_format)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        got = c.fetch_fp16_prefix(NS, tokens)
    assert len(got) == 2
    for i in range(2):
        assert got.block(i).keys.tobytes() == blocks[i].keys.tobytes()
        assert got.block(i).values.tobytes() == blocks[i].values.tobytes()


def test_inspect_escapes_every_foreign_string():
    view = {"source": "daemon x", "blocks": 1, "bytes_on_disk": 1, "payload_bytes": 1,
            "index_bytes": 0, "logical_bytes": 1, "max_bytes": 2, "compression": "none\x1b[2J",
            "lookups": 0, "lookup_tokens": 0, "hit_tokens": 0, "evictions": 0,
            "verification_failures": 0, "quarantined": 0, "attention_backend": "ref\x07",
            "recent_request_hit_rates": None, "block_size_histogram": {16: 1},
            "namespaces_omitted": 7,
            "namespaces": [{"digest": "ab\ncd", "model": "m\x1b", "model_name": "m\\x1b",
                            "num_layers": 1, "num_kv_heads": 1, "head_dim": 8,
                            "block_size": 16, "blocks": 1, "bytes": 1}],
            "tiers": {"lookup_tokens": "1", "remote_address": "r\x1b]0;x\x07",
                      "remote_state": "up\r", "remote_last_error": "e\x00"}}
    text = render(summarize(view))
    assert not any(c in text for c in "\x1b\x07\x00\r")
    assert "ab\\ncd" in text and "7 smaller namespaces not listed" in text


def test_small_fuzz_run_finds_no_internal_status():
    out = subprocess.run([sys.executable, str(ROOT / "tools/fuzz_daemon.py"), "--seed", "7",
                          "--messages", "300"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert '"failure_count": 0' in out.stdout and '"stored_blocks_unchanged": true' in out.stdout
