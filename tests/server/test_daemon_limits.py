"""The daemon's bounds on threads, stream life, memory and environment failures (issue 17),
checked on a real in-process Daemon over loopback gRPC (tqstore/request_limits.py, server.py).

Stalled clients are real: a Put whose request generator blocks on an Event, a Fetch whose
iterator is not read. Waits are bounded polls on state, never timing assertions."""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tqstore.client import KvStoreClient
from tqstore.config import ClientConfig, ServerConfig, StoreConfig
from tqstore.daemon import Daemon
from tqstore.errors import ResourceExhausted
from tqstore.prefix_hash import Namespace
from tqstore.request_limits import CHUNK_OVERHEAD_BYTES
from tqstore.server import KvStoreService
from tqstore.v1 import tqstore_pb2 as pb
from tqstore.v1 import tqstore_pb2_grpc as pb_grpc
from tqstore.wire import BlockAssembler, fp16_chunks, namespace_to_proto, tensor_to_proto

from tests.server.conftest import MiB, random_blocks

NS = Namespace("limits-test", num_layers=2, num_kv_heads=2, head_dim=16, block_size=16)
OK, EXHAUSTED = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
CANCELLED = grpc.StatusCode.CANCELLED


def _daemon(path: Path, **limits) -> Daemon:
    config = dict(path=str(path), listen="127.0.0.1:0", drain_seconds=1, max_put_bytes=8 * MiB,
                  store=StoreConfig(max_bytes=256 * MiB, map_size=128 * MiB))
    config.update(limits)
    return Daemon(ServerConfig(**config)).start()


@pytest.fixture
def make_daemon(tmp_path):
    made: list[Daemon] = []

    def make(**limits):
        made.append(_daemon(tmp_path / f"kv{len(made)}", **limits))
        channel = grpc.insecure_channel(made[-1].address)
        return made[-1], pb_grpc.KvStoreStub(channel), channel
    yield make
    for d in made:
        d.stop(grace=0)


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return OK


def _put_messages(ns: Namespace, tokens: list[int], blocks, first: int = 0) -> list[pb.PutRequest]:
    msgs = [pb.PutRequest(namespace=namespace_to_proto(ns), token_ids=tokens, first_block=first)]
    for i, b in enumerate(blocks):
        msgs += [pb.PutRequest(chunk=c) for c in fp16_chunks(ns, first + i, b.keys, b.values)]
    return msgs


def _stalled(head: pb.PutRequest, release: threading.Event):
    yield head
    release.wait(30)


def _until(predicate, what: str, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.02)


def test_disk_full_and_io_errors_reach_the_client_as_retryable_codes(make_daemon, rng, monkeypatch):
    daemon, stub, _ = make_daemon()
    tokens = rng.integers(0, 50000, 32).tolist()
    blocks = random_blocks(NS, 2, rng)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def io_error(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(daemon.tiers, "put_blocks", disk_full)
    with pytest.raises(grpc.RpcError) as err:
        stub.Put(iter(_put_messages(NS, tokens, blocks)))
    assert err.value.code() == EXHAUSTED and "disk full" in err.value.details()
    monkeypatch.setattr(daemon.tiers, "lookup", io_error)
    request = pb.LookupRequest(namespace=namespace_to_proto(NS), token_ids=tokens)
    with pytest.raises(grpc.RpcError) as err:
        stub.Lookup(request)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "I/O" in err.value.details()
    monkeypatch.undo()
    assert stub.Put(iter(_put_messages(NS, tokens, blocks))).stored_blocks == 2


def test_stalled_puts_hold_no_thread_small_calls_need_and_are_cancelled_when_idle(make_daemon, rng):
    """workers=6: two stream slots (4 threads reserved). Two stalled Puts take both; a third
    stream is refused at once; Lookup and the health check are answered meanwhile; the idle
    watchdog cancels the stalled Puts and a new Put then succeeds."""
    daemon, stub, channel = make_daemon(workers=6, stream_idle_s=2.0)
    tokens = rng.integers(0, 50000, 32).tolist()
    head = pb.PutRequest(namespace=namespace_to_proto(NS), token_ids=tokens)
    release = threading.Event()
    stalled = [stub.Put.future(_stalled(head, release)) for _ in range(2)]
    try:
        _until(lambda: daemon.stream_watch.watching == 2, "both stalled Puts admitted")
        assert _code(stub.Put, iter([head])) == EXHAUSTED  # no stream slot left
        lookup = pb.LookupRequest(namespace=namespace_to_proto(NS), token_ids=tokens)
        assert stub.Lookup(lookup, timeout=10).hit_blocks == 0
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        for future in stalled:  # the watchdog, not the client, ends them
            with pytest.raises(grpc.RpcError) as err:
                future.result(timeout=20)
            assert err.value.code() == CANCELLED
        assert daemon.stream_watch.cancelled == 2
    finally:
        release.set()
    blocks = random_blocks(NS, 2, rng)
    assert stub.Put(iter(_put_messages(NS, tokens, blocks))).stored_blocks == 2


def test_a_fetch_nobody_reads_gives_back_its_heavy_slot(make_daemon, rng):
    """A 24 MiB Fetch far past gRPC's flow-control window, one message read: the handler blocks
    in its send until the watchdog cancels it; its heavy slot is free again."""
    ns = Namespace("limits-big", num_layers=16, num_kv_heads=8, head_dim=128, block_size=16)
    daemon, stub, _ = make_daemon(stream_idle_s=0.5, max_heavy_requests=1,
                                  heavy_request_tokens=256, max_put_bytes=64 * MiB)
    tokens = rng.integers(0, 50000, 16 * 24).tolist()
    ones = np.ones((16, 8, 16, 128), np.float16)
    head = [pb.PutRequest(namespace=namespace_to_proto(ns), token_ids=tokens)]
    chunks = [pb.PutRequest(chunk=c) for b in range(24) for c in fp16_chunks(ns, b, ones, ones)]
    assert stub.Put(iter(head + chunks)).stored_blocks == 24
    heavy = pb.LookupRequest(namespace=namespace_to_proto(ns), token_ids=tokens)
    unread = stub.Fetch(pb.FetchRequest(namespace=namespace_to_proto(ns), token_ids=tokens))
    next(unread)
    _until(lambda: _code(stub.Lookup, heavy) == OK, "the unread Fetch's heavy slot freed")
    assert daemon.stream_watch.cancelled == 1
    with pytest.raises(grpc.RpcError) as err:
        list(unread)
    assert err.value.code() == CANCELLED


def test_put_bytes_count_blocks_and_chunks_per_stream_and_daemon_wide(make_daemon, rng):
    """One-layer chunks of a 64-layer layout: each counts its 512 B overhead, so a stream of
    many tiny chunks hits max_put_bytes long before its payload would. Two Puts that each fit
    max_put_bytes but not put_budget_bytes together: the second is refused, and the budget is
    all given back afterwards."""
    ns = Namespace("limits-tiny", num_layers=64, num_kv_heads=1, head_dim=8, block_size=16)
    block = 2 * 2 * 64 * 16 * 8  # 32 KiB of fp16
    daemon, stub, _ = make_daemon(max_put_bytes=4 * block, put_budget_bytes=6 * block)
    tokens = rng.integers(0, 50000, 16 * 8).tolist()
    one = tensor_to_proto(np.ones((1, 1, 16, 8), np.float16))
    head = pb.PutRequest(namespace=namespace_to_proto(ns), token_ids=tokens)
    tiny = [pb.PutRequest(chunk=pb.KvChunk(block_index=b, layer_start=layer, layer_count=1,
                                           keys=one, values=one))
            for b in range(3) for layer in range(64)]
    # 3 blocks are 96 KiB, under 128 KiB, but 192 chunks add 96 KiB of overhead.
    assert 3 * block <= 4 * block < 3 * block + 192 * CHUNK_OVERHEAD_BYTES
    assert _code(stub.Put, iter([head] + tiny)) == EXHAUSTED
    blocks = random_blocks(ns, 3, rng)
    release = threading.Event()

    def first_put():  # 3 blocks (96 KiB + 3 chunks), then waits
        yield from _put_messages(ns, tokens, blocks)
        release.wait(30)

    holder = stub.Put.future(first_put())
    try:
        _until(lambda: daemon.service.put_bytes.used >= 3 * block, "the first Put's blocks held")
        other = rng.integers(0, 50000, 16 * 8).tolist()
        assert _code(stub.Put, iter(_put_messages(ns, other, blocks))) == EXHAUSTED
    finally:
        release.set()
    assert holder.result(timeout=30).stored_blocks == 3
    assert daemon.service.put_bytes.used == 0
    assert stub.Put(iter(_put_messages(ns, other, blocks))).stored_blocks == 3


def test_heavy_by_bytes_and_by_turboquant_layout(make_daemon, rng):
    """With the one heavy slot held, a Fetch naming more than heavy_request_bytes of blocks and
    a TurboQuant Fetch of a large layout are refused at once, though both carry few token ids;
    a small fp16 Fetch is served."""
    daemon, stub, _ = make_daemon(max_heavy_requests=1, heavy_request_tokens=1024,
                                  heavy_request_bytes=3 * 4096, heavy_turboquant_work=1 << 16)
    tokens = rng.integers(0, 50000, 16 * 4).tolist()  # 4 blocks of 4 KiB: 16 KiB
    blocks = random_blocks(NS, 4, rng)
    assert stub.Put(iter(_put_messages(NS, tokens, blocks))).stored_blocks == 4
    release = threading.Event()
    holder = stub.Put.future(_stalled(pb.PutRequest(namespace=namespace_to_proto(NS),
                                                    token_ids=[1] * 2048), release))
    try:
        small = pb.FetchRequest(namespace=namespace_to_proto(NS), token_ids=tokens, num_blocks=2)
        big = pb.FetchRequest(namespace=namespace_to_proto(NS), token_ids=tokens)
        # Wait on the slot itself: probing with `big` could take the slot first and refuse
        # the holder (a race a loaded machine lost; then no probe is ever refused).
        _until(lambda: daemon.service._heavy.in_use == 1, "the heavy slot held")
        assert _code(stub.Fetch, big) == EXHAUSTED
        assert _code(stub.Fetch, small) == OK
        wide = Namespace("limits-wide", num_layers=32, num_kv_heads=4, head_dim=64, block_size=16)
        tq = pb.FetchRequest(namespace=namespace_to_proto(wide), token_ids=tokens[:16],
                             form=pb.KV_FORM_TURBOQUANT,
                             codec=pb.CodecSettings(key_bits=4, value_bits=4))
        assert _code(stub.Fetch, tq) == EXHAUSTED
        small.form, small.codec.key_bits, small.codec.value_bits = pb.KV_FORM_TURBOQUANT, 4, 4
        assert _code(stub.Fetch, small) == OK  # NS's layout is light
    finally:
        release.set()
    assert holder.result(timeout=30).stored_blocks == 0


def test_a_cancelled_put_is_cancelled_not_internal(make_daemon, rng, caplog):
    daemon, stub, _ = make_daemon(metrics_port=0)
    tokens = rng.integers(0, 50000, 48).tolist()
    release = threading.Event()

    def messages():
        yield from _put_messages(NS, tokens, random_blocks(NS, 3, rng))
        release.wait(30)

    caplog.set_level(logging.INFO)
    try:
        future = stub.Put.future(messages())
        _until(lambda: daemon.service.put_bytes.used > 0, "the Put's blocks received")
        future.cancel()
        _until(lambda: "KvStore/Put" in caplog.text, "the Put's log line")
    finally:
        release.set()
    text = caplog.text
    assert "CANCELLED" in text and "INTERNAL" not in text and "Traceback" not in text
    page = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics").read()
    rows = [line for line in page.decode().splitlines() if line.startswith("tqstore_rpcs_total")]
    assert any('code="CANCELLED"' in r and "KvStore/Put" in r for r in rows), rows
    assert not any('code="INTERNAL"' in r or 'code="UNKNOWN"' in r for r in rows), rows
    assert daemon.service.put_bytes.used == 0
    # Nothing, or (when gRPC showed the cancel as the stream's end a moment before the cancel
    # itself) the whole blocks that had all arrived: never a part of them.
    assert stub.Lookup(pb.LookupRequest(namespace=namespace_to_proto(NS),
                                        token_ids=tokens)).hit_blocks in (0, 3)


def test_a_failed_start_closes_the_store(tmp_path, monkeypatch):
    """Anything failing after the store opened (here the service) closes the store (and the
    server): a second daemon then opens the same store (a leaked one would hold its writer
    lock: Unavailable)."""
    def broken(self, *args, **kwargs):
        raise RuntimeError("service set-up failed")

    monkeypatch.setattr(KvStoreService, "__init__", broken)
    with pytest.raises(RuntimeError, match="service set-up failed"):
        _daemon(tmp_path / "kv")
    monkeypatch.undo()
    again = _daemon(tmp_path / "kv")
    try:
        assert again.store.stats().blocks == 0
    finally:
        again.stop(grace=0)


def test_assembler_takes_chunks_in_any_order_and_refuses_overlaps(rng):
    """Single-layer chunks, last layer first, rebuild the block exactly; a chunk overlapping
    received layers is refused (the per-block layer flags)."""
    ns = Namespace("limits-asm", num_layers=8, num_kv_heads=1, head_dim=8, block_size=16)
    keys = rng.standard_normal((8, 1, 16, 8)).astype(np.float16)
    values = rng.standard_normal((8, 1, 16, 8)).astype(np.float16)
    assembler = BlockAssembler(ns)
    done = None
    for layer in reversed(range(8)):
        chunk = pb.KvChunk(block_index=0, layer_start=layer, layer_count=1,
                           keys=tensor_to_proto(keys[layer:layer + 1]),
                           values=tensor_to_proto(values[layer:layer + 1]))
        assert assembler.pending(0) == (layer != 7)
        done = assembler.add(chunk)
    assert done is not None and done[0] == 0
    assert done[1]["keys"].tobytes() == keys.tobytes()
    assert done[1]["values"].tobytes() == values.tobytes()
    assembler.add(pb.KvChunk(block_index=1, layer_start=2, layer_count=3,
                             keys=tensor_to_proto(keys[2:5]), values=tensor_to_proto(values[2:5])))
    with pytest.raises(Exception, match="overlapping"):
        assembler.add(pb.KvChunk(block_index=1, layer_start=4, layer_count=2,
                                 keys=tensor_to_proto(keys[4:6]),
                                 values=tensor_to_proto(values[4:6])))
    assert assembler.incomplete() == [1]


def test_the_client_retries_a_put_and_a_fetch_refused_for_load(make_daemon, rng):
    """workers=5: one stream slot. A stalled Put holds it; a KvStoreClient put refused "retry
    later" is retried and lands once the slot frees (the stall ends after its first refusal);
    with busy_retry_s=0 the same refusal reaches the caller as ResourceExhausted at once."""
    daemon, stub, _ = make_daemon(workers=5)
    tokens = rng.integers(0, 50000, 32).tolist()
    blocks = random_blocks(NS, 2, rng)
    head = pb.PutRequest(namespace=namespace_to_proto(NS), token_ids=tokens)
    config = ClientConfig(address=daemon.address, direct_reads="off")
    release = threading.Event()
    stalled = stub.Put.future(_stalled(head, release))
    try:
        _until(lambda: daemon.stream_watch.watching == 1, "the stalled Put admitted")
        with KvStoreClient(dataclasses.replace(config, busy_retry_s=0)) as eager:
            with pytest.raises(ResourceExhausted, match="retry later"):
                eager.put(NS, tokens, 0, blocks)
        with KvStoreClient(config) as patient:
            upload = patient.put_async(NS, tokens, 0, blocks)
            time.sleep(0.3)  # refused at least once meanwhile (the slot is held)
            assert not upload.done()
            release.set()
            assert upload.result(timeout=20) == 2
            got = patient.fetch_fp16(NS, tokens)
        assert [b.keys.tobytes() for b in got] == [b.keys.tobytes() for b in blocks]
    finally:
        release.set()
        try:
            stalled.result(timeout=20)
        except grpc.RpcError:
            pass


def test_the_client_retries_grpcs_own_concurrent_call_cap(make_daemon, rng):
    """max_concurrent_rpcs=1: while a stalled Put is the one admitted call, gRPC itself refuses
    the next ("Concurrent RPC limit exceeded"): a load refusal before any work, retried too."""
    daemon, stub, _ = make_daemon(max_concurrent_rpcs=1)
    tokens = rng.integers(0, 50000, 32).tolist()
    blocks = random_blocks(NS, 2, rng)
    release = threading.Event()
    stalled = stub.Put.future(_stalled(pb.PutRequest(namespace=namespace_to_proto(NS),
                                                     token_ids=tokens), release))
    config = ClientConfig(address=daemon.address, direct_reads="off")
    try:
        _until(lambda: daemon.stream_watch.watching == 1, "the stalled Put admitted")
        with KvStoreClient(dataclasses.replace(config, busy_retry_s=0)) as eager:
            with pytest.raises(ResourceExhausted, match="Concurrent RPC limit"):
                eager.lookup(NS, tokens)
        with KvStoreClient(config) as patient, ThreadPoolExecutor(1) as pool:
            lookup = pool.submit(patient.lookup, NS, tokens)
            time.sleep(0.3)
            assert not lookup.done()
            release.set()
            assert lookup.result(timeout=20).hit_blocks == 0
    finally:
        release.set()
        try:
            stalled.result(timeout=20)
        except grpc.RpcError:
            pass
