"""A prefill's new blocks on their way to the upload thread (tqstore.upload_landing): the bytes
are the device's, the route is the one the backend allows, and the pinned landing buffer is
lent and kept by the rules (ordinary memory stands in for it off CUDA, and a numpy write stands
in for the copy engine, so those rules run on every machine)."""

import ctypes
import gc

import numpy as np
import pytest

import tqstore  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx

from tqstore import device_memory, upload_landing
from tqstore.pinned_staging import PinnedStaging
from tqstore.errors import TqstoreError
from tqstore.metal import selfcheck
from tqstore.upload_landing import land, then


def _layers(rng, count=3, heads=2, tokens=40, dim=64):
    layers = [tuple(mx.array(rng.standard_normal((1, heads, tokens, dim)).astype(np.float16))
                    for _ in range(2)) for _ in range(count)]
    mx.eval(layers)
    return layers


def _want(layers, start, stop):
    return tuple(np.stack([np.array(pair[which])[0, :, start:stop] for pair in layers])
                 for which in range(2))


@pytest.mark.parametrize("sliced", [False, True])
def test_a_landing_gives_every_layers_slice_bit_for_bit_by_the_backends_route(rng, sliced):
    """The GPU suite runs this on CUDA: the copy-engine route, its self-check passed. The bytes
    are taken on another thread after the caller dropped its arrays and MLX reused memory (both
    routes must keep the arrays alive until their bytes are out). Sliced: every source a view
    that is not row-contiguous (a longer buffer's first tokens)."""
    layers = _layers(rng, tokens=45 if sliced else 40)
    if sliced:
        layers = [tuple(x[:, :, 3:43] for x in pair) for pair in layers]
    want = _want(layers, 5, 37)
    on_cuda = device_memory._cudart() is not None
    landing = land(layers, 5, 37, 1 << 30)
    assert landing.route == ("copy-engine" if on_cuda else "views")
    del layers
    gc.collect()
    mx.eval([mx.ones((3, 2, 45, 64), mx.float16) * i for i in range(8)])
    keys, values = then(landing, lambda k, v: (k.copy(), v.copy())).result(timeout=60)
    assert keys.shape == (3, 2, 32, 64) and keys.dtype == np.float16
    assert keys.tobytes() == want[0].tobytes() and values.tobytes() == want[1].tobytes()


def test_a_landing_refuses_positions_or_layers_it_cannot_hold(rng):
    layers = _layers(rng)
    for start, stop in ((5, 41), (-1, 4), (7, 7)):
        with pytest.raises(TqstoreError, match="one shape"):
            land(layers, start, stop, 1 << 30)
    ragged = layers[:2] + [tuple(x[:, :, :20] for x in layers[2])]
    with pytest.raises(TqstoreError, match="one shape"):
        land(ragged, 0, 10, 1 << 30)


class _FakeDevice:
    """Host memory in place of the copy engine: _start_copies writes the slices with numpy at
    the addresses _copies gives (so the per-layer address arithmetic runs here too), then its
    done() says so (optionally wrong bytes, or never done)."""

    def __init__(self, monkeypatch, wrong: bool = False, finishes: bool = True) -> None:
        self.wrong, self.finishes, self.starts = wrong, finishes, 0
        self.piece_sizes: list[int | None] = []
        self.memory: dict[int, np.ndarray] = {}
        self.staging = PinnedStaging(self._allocate, lambda address: self.memory.pop(address))
        monkeypatch.setattr(upload_landing, "landing_staging", self.staging)
        monkeypatch.setattr(upload_landing, "_start_copies", self._start_copies)

    def _allocate(self, size: int) -> int:
        buf = np.zeros(size, np.uint8)
        self.memory[buf.ctypes.data] = buf
        return buf.ctypes.data

    def _start_copies(self, runtime, layers, start, stop, host, offsets, piece_bytes=None):
        self.starts += 1
        self.piece_sizes.append(piece_bytes)
        copies = upload_landing._copies(layers, start, stop, host, offsets)
        for source, (at, heads, tokens, first, last, row) in copies:
            got = np.ascontiguousarray(np.array(source)[0, :, first:last])
            assert got.shape == (heads, last - first, row // 2) and source.shape[2] == tokens
            if self.wrong:
                got = got + np.float16(1)
            ctypes.memmove(at, got.ctypes.data, got.nbytes)

        def done() -> bool:
            return self.finishes
        done.held = [source for source, _ in copies]  # K of every layer, then V (as the route)
        return done


def test_the_copy_engine_route_lends_its_buffers_until_the_landed_arrays_are_gone(monkeypatch, rng):
    fake = _FakeDevice(monkeypatch)
    layers = _layers(rng)
    try:
        selfcheck.reset()
        first = upload_landing._by_copy_engine(None, layers, 0, 40, 1 << 30)
        assert first is not None and first.route == "copy-engine"
        assert selfcheck.kernel_report()["upload_landing"].startswith("ok")
        assert fake.starts == 3  # the self-check's two head dims, then the landing
        assert fake.piece_sizes == [1, 1, None]  # the check: one row a piece; then the default
        keys, values = first.result()
        want = _want(layers, 0, 40)
        assert keys.tobytes() == want[0].tobytes() and values.tobytes() == want[1].tobytes()
        assert fake.staging.holds(keys.ctypes.data, keys.nbytes)
        with pytest.raises(TqstoreError, match="once"):
            first.result()
        # A second upload while those bytes are alive finds the buffer held (the caller
        # copies); the first landing object still exists, its arrays gone: the buffer is free.
        assert upload_landing._by_copy_engine(None, layers, 0, 8, 1 << 30) is None
        del keys, values
        gc.collect()
        third = upload_landing._by_copy_engine(None, layers, 16, 24, 1 << 30)
        assert third is not None
        landed = third.result()[1]
        assert fake.staging.holds(landed.ctypes.data, landed.nbytes)
        assert landed.tobytes() == _want(layers, 16, 24)[1].tobytes()
        assert fake.starts == 4  # checked once per process
        assert first is not None
    finally:
        selfcheck.reset()


def test_a_landing_route_that_gives_other_bytes_is_disabled_and_the_copy_serves(monkeypatch, rng):
    fake = _FakeDevice(monkeypatch, wrong=True)
    monkeypatch.setattr(device_memory, "_cudart", lambda: object())  # a CUDA process
    monkeypatch.setattr(upload_landing, "gpu_backend", lambda: "cuda")
    layers = _layers(rng)
    try:
        selfcheck.reset()
        landing = land(layers, 3, 30, 1 << 30)
        assert landing.route == "copied" and fake.starts == 1
        assert selfcheck.kernel_report()["upload_landing"].startswith("disabled")
        keys, values = landing.result()
        want = _want(layers, 3, 30)
        assert keys.tobytes() == want[0].tobytes() and values.tobytes() == want[1].tobytes()
        assert land(layers, 3, 30, 1 << 30).route == "copied" and fake.starts == 1
    finally:
        selfcheck.reset()


def test_a_landing_that_never_finishes_times_out_and_its_buffer_is_never_lent_again(monkeypatch,
                                                                                     rng):
    fake = _FakeDevice(monkeypatch)
    layers = _layers(rng)
    monkeypatch.setattr(upload_landing, "_abandoned", [])
    try:
        selfcheck.reset()
        upload_landing._by_copy_engine(None, layers, 0, 4, 1 << 30).result()  # checked, waited
        gc.collect()
        assert upload_landing._abandoned == []
        fake.finishes = False
        landing = upload_landing._by_copy_engine(None, layers, 0, 40, 1 << 30)
        with pytest.raises(TqstoreError, match="did not finish"):
            landing.result(timeout=0.05)
        del landing
        gc.collect()
        lease, sources = upload_landing._abandoned  # kept for good: the copy may still run
        assert isinstance(lease, np.ndarray) and sources[0] is layers[0][0]
        assert fake.staging.lease(4, 1 << 30) is None  # still held, for good
        # Dropped without waiting: also kept for good (a late copy may still read and write).
        monkeypatch.setattr(upload_landing, "_abandoned", [])
        monkeypatch.setattr(upload_landing, "landing_staging",
                            PinnedStaging(fake._allocate, lambda a: None))
        dropped = upload_landing._by_copy_engine(None, layers, 0, 40, 1 << 30)
        assert dropped is not None
        del dropped
        gc.collect()
        assert len(upload_landing._abandoned) == 2
    finally:
        selfcheck.reset()


def test_over_the_cap_or_another_dtype_the_copy_serves(monkeypatch, rng):
    _FakeDevice(monkeypatch)
    monkeypatch.setattr(device_memory, "_cudart", lambda: object())
    monkeypatch.setattr(upload_landing, "gpu_backend", lambda: "cuda")
    layers = _layers(rng)
    try:
        selfcheck.reset()
        assert land(layers, 0, 40, 1000).route == "copied"  # cap of 1,000 bytes
        wide = [tuple(x.astype(mx.float32) for x in pair) for pair in layers]
        landing = land(wide, 0, 10, 1 << 30)
        assert landing.route == "copied" and landing.result()[0].dtype == np.float32
    finally:
        selfcheck.reset()


def test_an_upload_relays_the_puts_result_and_either_the_landings_or_the_puts_error(daemon,
                                                                                     rng):
    """The generator hands the upload thread the landing thread's future (its blocks): the Put
    future gives the Put's block count, or the landing's error, or the Put's own."""
    from concurrent.futures import Future

    from tqstore.client import KvStoreClient
    from tqstore.generator import _payloads
    from tqstore.prefix_hash import Namespace

    def done(value=None, error=None) -> Future:
        f: Future = Future()
        f.set_exception(error) if error else f.set_result(value)
        return f

    ns = Namespace("landing-relay-00", 2, 2, 8, 16)
    ids = list(range(100, 133))
    keys = rng.standard_normal((2, 2, 32, 8)).astype(np.float16)
    with KvStoreClient(daemon.address) as client:
        landed = done(_payloads(keys, -keys, 2, 16, 0))
        assert client.put_async_lazy(ns, ids[:32], 0, landed.result).result(timeout=60) == 2
        failed = done(error=TqstoreError("landing"))
        assert isinstance(client.put_async_lazy(ns, ids[:32], 0, failed.result)
                          .exception(timeout=60), TqstoreError)
        narrow = done(_payloads(keys[..., :4], keys[..., :4], 2, 16, 0))  # head dim 4, not 8
        assert isinstance(client.put_async_lazy(ns, ids[:32], 0, narrow.result)
                          .exception(timeout=60), TqstoreError)
    with pytest.raises(RuntimeError):  # a closed client says so at once
        client.put_async_lazy(ns, ids[:32], 0, landed.result)


class _HostCopyEngine:
    """A runtime whose copy engine is memmove on host memory: the real _start_copies (its
    address arithmetic, held sources, event handling and error paths) runs on every machine.
    Each event reports 'not ready' once; `fail_copy` fails that copy call, `event_error` is
    the status a finished event reports. It counts the events in flight at most."""

    def __init__(self, fail_copy: int | None = None, event_error: int = 0) -> None:
        self.fail_copy, self.event_error = fail_copy, event_error
        self.copies, self.queries, self.destroyed, self.synchronized = 0, 0, [], 0
        self.events, self.most_in_flight = 0, 0
        self.polls: dict[str, int] = {}
        engine = self

        class Lib:
            @staticmethod
            def cudaGetLastError() -> int:
                return 0

            @staticmethod
            def cudaStreamSynchronize(stream) -> int:
                engine.synchronized += 1
                return 0
        self.lib = Lib()

    def copy_stream(self):
        return "stream"

    def copy_rows_async(self, dst, src, pitch, width, rows, stream) -> int:
        if self.copies == self.fail_copy:
            return 1  # cudaErrorInvalidValue
        for r in range(rows):
            ctypes.memmove(dst + r * width, src + r * pitch, width)
        self.copies += 1
        return 0

    def record_event(self, stream):
        event, self.events = f"event{self.events}", self.events + 1
        self.most_in_flight = max(self.most_in_flight, self.events - len(self.destroyed))
        return 0, event

    def event_status(self, event) -> int:
        assert event not in self.destroyed, "an event queried after it was destroyed"
        self.queries += 1
        self.polls[event] = self.polls.get(event, 0) + 1
        return upload_landing._NOT_READY if self.polls[event] == 1 else self.event_error

    def destroy_event(self, event) -> None:
        assert event not in self.destroyed, "an event destroyed twice"
        self.destroyed.append(event)


@pytest.fixture
def host_addresses(monkeypatch):
    """The address kernel's stand-in: each source's bytes in host memory, kept alive."""
    hosts: list[np.ndarray] = []

    def addresses(sources):
        hosts.extend(np.ascontiguousarray(np.array(x)) for x in sources)
        return [h.ctypes.data for h in hosts[-len(sources):]]
    monkeypatch.setattr(upload_landing, "_addresses", addresses)


def test_the_copy_engine_lands_every_slice_and_lets_go_of_its_sources_once_done(
        monkeypatch, host_addresses, rng):
    """Sources sliced along tokens (not row-contiguous: made so first, a pitch of 40), as the route
    reads them back; the sources (made row-contiguous) are held, flat, K then V, until the
    event says the copies are done, and the event is destroyed once."""
    monkeypatch.setattr(upload_landing, "_PIECE_BYTES", 0)  # all at once: one event
    layers = [tuple(x[:, :, 3:43] for x in pair) for pair in _layers(rng, heads=4, tokens=45)]
    engine = _HostCopyEngine()
    shapes, offsets, size = upload_landing._layout(layers, 5, 37)
    lease = np.zeros(size, np.uint8)
    done = upload_landing._start_copies(engine, layers, 5, 37, lease.ctypes.data, offsets)
    assert engine.copies == 6 and len(done.held) == 6
    assert not done()  # not ready yet: still held
    assert len(done.held) == 6
    assert done() and done() and not done.held and engine.destroyed == ["event0"]
    got = upload_landing._landed(lease, shapes, offsets)
    assert [x.tobytes() for x in got] == [x.tobytes() for x in _want(layers, 5, 37)]


def test_a_copy_that_fails_to_queue_waits_for_the_queued_ones_and_a_failed_event_stays_failed(
        monkeypatch, host_addresses, rng):
    monkeypatch.setattr(upload_landing, "_PIECE_BYTES", 0)  # all at once: one event
    layers = _layers(rng)
    shapes, offsets, size = upload_landing._layout(layers, 0, 40)
    lease = np.zeros(size, np.uint8)
    engine = _HostCopyEngine(fail_copy=4)
    with pytest.raises(TqstoreError, match="cudaMemcpy2DAsync failed"):
        upload_landing._start_copies(engine, layers, 0, 40, lease.ctypes.data, offsets)
    assert engine.copies == 4 and engine.synchronized == 1
    engine = _HostCopyEngine(event_error=700)  # cudaErrorIllegalAddress
    done = upload_landing._start_copies(engine, layers, 0, 40, lease.ctypes.data, offsets)
    assert not done()
    for _ in range(2):  # the same error again, without touching the destroyed event
        with pytest.raises(TqstoreError, match="status 700"):
            done()
    assert engine.queries == 2 and engine.destroyed == ["event0"] and not done.held


@pytest.mark.parametrize("piece_bytes, copies, events, most_in_flight",
                         [(0, 6, 1, 1), (8192, 12, 12, 4), (1, 24, 24, 4)])
def test_the_copy_engine_gets_pieces_of_whole_rows_a_window_at_a_time(
        monkeypatch, host_addresses, rng, piece_bytes, copies, events, most_in_flight):
    """Sources sliced along tokens (made row-contiguous: a head row of 32 tokens x 128 bytes =
    4,096 bytes, a pitch of 40 tokens): all at once (one copy per array), two head rows a
    piece, one row a piece (a piece smaller than a row); at most _WINDOW pieces queued; the
    bytes land where the route reads them, and the sources are held until the last piece has
    landed."""
    monkeypatch.setattr(upload_landing, "_PIECE_BYTES", piece_bytes)
    layers = [tuple(x[:, :, 3:43] for x in pair) for pair in _layers(rng, heads=4, tokens=45)]
    engine = _HostCopyEngine()
    shapes, offsets, size = upload_landing._layout(layers, 5, 37)
    lease = np.zeros(size, np.uint8)
    done = upload_landing._start_copies(engine, layers, 5, 37, lease.ctypes.data, offsets)
    while not done():
        assert len(done.held) == 6  # every source, until the last piece has landed
    assert not done.held and len(engine.destroyed) == engine.events == events
    assert (engine.copies, engine.most_in_flight) == (copies, most_in_flight)
    got = upload_landing._landed(lease, shapes, offsets)
    assert [x.tobytes() for x in got] == [x.tobytes() for x in _want(layers, 5, 37)]


def test_a_piece_that_fails_ends_the_landing_and_waits_for_the_queued_ones(
        monkeypatch, host_addresses, rng):
    """A copy refused when done() queues a later piece: the error leaves once the stream is
    synchronized, every event is destroyed once, the sources are let go, and done() keeps
    raising the same error."""
    monkeypatch.setattr(upload_landing, "_PIECE_BYTES", 1)
    layers = _layers(rng)
    shapes, offsets, size = upload_landing._layout(layers, 0, 40)
    lease = np.zeros(size, np.uint8)
    engine = _HostCopyEngine(fail_copy=6)
    done = upload_landing._start_copies(engine, layers, 0, 40, lease.ctypes.data, offsets)
    assert engine.copies == 4  # the first window
    for _ in range(2):
        with pytest.raises(TqstoreError, match="cudaMemcpy2DAsync failed"):
            upload_landing._wait_for(done, 10.0)
    assert engine.synchronized == 1 and engine.copies == 6 and not done.held
    assert sorted(engine.destroyed) == sorted(set(engine.destroyed))
    assert len(engine.destroyed) == engine.events


def test_a_disabled_route_pins_nothing(monkeypatch, rng):
    fake = _FakeDevice(monkeypatch)
    try:
        selfcheck.reset()
        selfcheck.disable("upload_landing", "planted")
        assert upload_landing._by_copy_engine(None, _layers(rng), 0, 40, 1 << 30) is None
        assert fake.memory == {} and fake.starts == 0
    finally:
        selfcheck.reset()
