"""A prefill's new fp16 blocks from the device to host memory, without stalling decode.

The upload hook (tqstore.generator.CachedGenerator.upload_hook) fires inside the first decode
step, when the last layer finishes its prefill. Copying the new blocks to the host there, on the
generating thread, delays that step by the copy: on CUDA ``np.array`` of an MLX array also makes
MLX move the whole device buffer into fresh managed memory first (~0.05 s per GB measured on the
H100, plus the copy itself: 1.1 s at 8k tokens of an 8B shape, 5 s at 32k). ``land()`` instead
starts the copy and returns at once; ``then()`` waits for the bytes on a landing thread of its
own, which cuts the blocks out of them (freeing the landing's buffer) and hands them to the
upload thread's Put. Routes:

- ``copy-engine`` (CUDA): the GPU's copy engine moves every layer's K/V slice
  (cudaMemcpy2DAsync in pieces of whole rows, _PIECE_BYTES each and at most _WINDOW queued,
  on a non-blocking stream of our own) into a pinned
  host buffer (its own PinnedStaging, ``landing_staging``, so a restore's staging buffer stays
  free for the next hit); ``result()`` polls an event recorded after each piece, so the landing
  thread never evaluates anything in MLX (MLX must not evaluate on two threads at once). MLX
  gives Python no device pointer, so a one-thread kernel writes each (row-contiguous) array's
  address into a uint64: that eval also orders the copies after whatever produced the arrays.
  The Landing holds the arrays until the copies are seen done, so MLX neither frees nor
  donates them. **Rule:** nothing may read a landing's source arrays through the host
  (``np.array``, ``.item()``, ``.tolist()``) until its result is taken: on CUDA that moves the
  device buffer into managed memory and frees the old one under the running copy.
- ``views`` (unified memory: CPU, Metal): the evaluated K/V are seen through numpy without a copy
  now; the slicing copy runs on the landing thread. The views keep the MLX arrays alive, so MLX
  never reuses their buffers meanwhile.
- ``copied``: the old way, on the generating thread (a stall): CUDA when the landing buffer is
  held by another upload, over the cap (``ClientConfig.staging_bytes``), not pinnable, a dtype
  other than fp16, libcudart is missing, or the route failed its self-check.

Why the copy engine (docs/BENCHMARKS.md, "Uploads off the generating thread";
tools/landing_stall_probe.py): the first version landed by copy kernels, SMs storing into
mapped host memory at 43-49 GB/s, and every decode step meanwhile grew by about the landing's
duration (32k tokens of an 8B shape: +86 ms). With stores to host memory flooding the bus,
each small kernel of the default stream took ~7x longer (2,000 dependent small ops: 25 ms
alone, 90 ms beside a landing). The copy engine moves the same 4.29 GB in ~80 ms with no
measurable effect on such work (32.0 against 32.0 ms). Given all 4.29 GB at once, though, the
real first decode step still grew by about the landing's duration (32k tokens: 0.047 -> 0.128
s), and arrays made from host memory (managed memory, which the engine also migrates: 200 of
them 2.2 ms alone, 6.0 beside the landing) queued behind it. In 16 MiB pieces, four queued at
a time, that first step is 1.18x a run with no upload (0.055 against 0.046 s); the landing
itself takes ~0.3 s instead of ~0.08 (the window drains faster than the landing thread polls),
still a fraction of the Put behind it.

The route passes the shared first-use self-check (tqstore.metal.selfcheck,
"upload_landing"): a small landing, a sliced (non-contiguous) source included, must come back
bit for bit, else the route is disabled for the process with one warning and ``copied``
serves. ``warm_up_landing`` runs it (and compiles the address kernel) when a generator with a
daemon is made, not inside the first decode step.
"""

from __future__ import annotations

import logging
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

import mlx.core as mx
import numpy as np

from tqstore import device_memory
from tqstore.pinned_staging import PinnedStaging
from tqstore.errors import TqstoreError
from tqstore.metal.attention_kernel import gpu_backend

log = logging.getLogger("tqstore.upload_landing")
T = TypeVar("T")

_ALIGN = 256  # each staged array starts on a 256-byte boundary
_ROUTE = "upload_landing"  # its name in the kernels' self-check
_WAIT_S = 300.0  # result() gives up after this long (the buffer is then never lent again)
_POLL_S = 0.0002  # the first pause between looks at the event; it doubles up to _POLL_MAX_S
_POLL_MAX_S = 0.002
_NOT_READY = 600  # cudaErrorNotReady
# The copy engine gets the landing in pieces of this many bytes (whole head rows), at most
# _WINDOW queued at a time, so that other work on the engine (MLX's managed-memory
# migrations) never queues behind gigabytes of it; 0 = all at once (one event).
_PIECE_BYTES = 16 << 20
_WINDOW = 4
_CHECK_BYTES = 64 << 10  # a lease is at least this big: the self-check lands into it

# The process's pinned buffer for uploads in flight (capped by ClientConfig.staging_bytes).
# One: a landing holds it only until the landing thread has cut its blocks out (then() below),
# ~0.1 s for 1 GB, so two prefills rarely end that close together; the second of such a pair is
# copied on the generating thread.
landing_staging = PinnedStaging()
_abandoned: list = []  # leases (and sources) of landings never seen done: never let go
_address_kernel = None
# The source's device address (MLX passes the array's data pointer, its offset included).
_ADDRESS_SOURCE = "if (threadIdx.x == 0) { address[0] = (unsigned long long)source; }"


class Landing:
    """K and V slices on their way to host memory. ``result()``, once, on any thread, gives
    them as (layers, heads, tokens, dim) arrays and lets go of everything else: the landing
    buffer is then free as soon as the caller drops those arrays (the landing thread cuts the
    upload's blocks out of them), and the views route stops holding the MLX arrays."""

    def __init__(self, route: str, make: Callable[[float], tuple[np.ndarray, np.ndarray]],
                 pending: list | None = None):
        self.route = route
        self._make: Callable | None = make
        self.started = time.perf_counter()  # land() sets it to when the landing began
        self.ready_s: float | None = None  # seconds from then until result() had the bytes
        self._pending = list(pending or [])
        if self._pending:
            # A copy-engine landing dropped unwaited may still be running: its lease is then
            # never lent again, nor are its source arrays let go (MLX must not free memory
            # that a copy may still read).
            weakref.finalize(self, _keep_if_pending, self._pending)

    def result(self, timeout: float = _WAIT_S) -> tuple[np.ndarray, np.ndarray]:
        if self._make is None:
            raise TqstoreError("a landing's result is taken once")
        got = self._make(timeout)
        self._make = None
        self._pending.clear()
        self.ready_s = time.perf_counter() - self.started
        return got


def _keep_if_pending(pending: list) -> None:
    if pending:
        log.warning("an upload's landing was dropped before its copy was seen to finish: its "
                    "pinned buffer is not lent again in this process")
    _abandoned.extend(pending)


_landing_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tqstore-landing")


def then(landing: Landing, make: Callable[[np.ndarray, np.ndarray], T]) -> Future:
    """make(keys, values) on the landing thread as soon as the bytes are there, as a Future.
    Why a thread of its own: the upload thread reaches a landing only when the Puts queued
    before it are done (seconds each for long prompts), and a landing holds its pinned buffer
    until its bytes are taken; make() should copy what it needs out of them (the blocks)."""
    return _landing_thread.submit(lambda: make(*landing.result()))


def land(layers: list[tuple[mx.array, mx.array]], start: int, stop: int, cap: int) -> Landing:
    """Start moving positions [start, stop) of every layer's evaluated (1, heads, T, dim) K
    and V to host memory; cap: the most pinned bytes the landing buffer may grow to."""
    started = time.perf_counter()
    k0, v0 = layers[0]
    if not (0 <= start < stop <= min(k0.shape[2], v0.shape[2])) or any(
            k.shape != k0.shape or v.shape != v0.shape for k, v in layers):
        raise TqstoreError(f"a landing of positions [{start}, {stop}) needs every layer's K and "
                           f"V of one shape holding them (layer 0: {k0.shape}, {v0.shape})")
    runtime = device_memory._cudart()
    if gpu_backend() != "cuda":
        landing = _by_views(layers, start, stop)  # unified memory: host-addressable
    elif runtime is not None:
        landing = _by_copy_engine(runtime, layers, start, stop, cap)
    else:
        landing = None  # CUDA without libcudart: copied (numpy views would move the buffers)
    if landing is None:
        landing = _copied(layers, start, stop)
    landing.started = started
    return landing


def _copied(layers, start: int, stop: int) -> Landing:
    keys = np.stack([np.array(k[0, :, start:stop]) for k, _ in layers])
    values = np.stack([np.array(v[0, :, start:stop]) for _, v in layers])
    return Landing("copied", lambda timeout: (keys, values))


def _by_views(layers, start: int, stop: int) -> Landing | None:
    try:  # no copy: the arrays are evaluated and live in host-addressable memory
        keys = [np.array(k, copy=False) for k, _ in layers]
        values = [np.array(v, copy=False) for _, v in layers]
    except (ValueError, TypeError, RuntimeError):
        return None  # a dtype numpy cannot view (bfloat16): copied

    def make(timeout: float) -> tuple[np.ndarray, np.ndarray]:
        # The views keep the MLX arrays alive until result() lets go of them: MLX then frees
        # them on this thread, which its allocator (locked) allows.
        return (np.stack([k[0, :, start:stop] for k in keys]),
                np.stack([v[0, :, start:stop] for v in values]))
    return Landing("views", make)


def _layout(layers, start: int, stop: int) -> tuple[list[tuple], list[int], int]:
    """The staged arrays' shapes (K, V), their byte offsets in the lease, and the lease size."""
    k, v = layers[0]
    shapes = [(len(layers), k.shape[1], stop - start, k.shape[3]),
              (len(layers), v.shape[1], stop - start, v.shape[3])]
    offsets, at = [], 0
    for shape in shapes:
        offsets.append(at)
        at += -(-int(np.prod(shape)) * 2 // _ALIGN) * _ALIGN
    return shapes, offsets, at


def _landed(lease: np.ndarray, shapes: list[tuple], offsets: list[int]) -> list[np.ndarray]:
    """K and V as the copies land them in the lease (_layout's shapes at its offsets)."""
    return [lease[at:at + int(np.prod(shape)) * 2].view(np.float16).reshape(shape)
            for at, shape in zip(offsets, shapes)]


def _addresses(sources: list[mx.array]) -> list[int]:
    """Each row-contiguous array's device address, evaluated (which also waits for whatever
    produced the arrays: the copies that follow read finished bytes)."""
    global _address_kernel
    if _address_kernel is None:
        _address_kernel = mx.fast.cuda_kernel(
            name="tq_address_of", input_names=["source"], output_names=["address"],
            source=_ADDRESS_SOURCE)
    out = [_address_kernel(inputs=[x], output_shapes=[(1,)], output_dtypes=[mx.uint64],
                           grid=(1, 1, 1), threadgroup=(1, 1, 1))[0] for x in sources]
    return mx.concatenate(out).tolist()


def _copies(layers, start: int, stop: int, host: int, offsets: list[int]
            ) -> list[tuple[mx.array, list[int]]]:
    """Per layer, K then V: (source, [host address, heads, tokens T of the source, start, stop,
    bytes per token row]). Layer i's slice lands at host + offsets[K or V] + i * (its bytes):
    the (layers, heads, stop - start, dim) arrays _by_copy_engine reads back."""
    out = []
    for which, offset in enumerate(offsets):
        for layer, pair in enumerate(layers):
            source = pair[which]
            heads, tokens, dim = source.shape[1], source.shape[2], source.shape[3]
            row = dim * source.itemsize
            at = host + offset + layer * heads * (stop - start) * row
            out.append((source, [at, heads, tokens, start, stop, row]))
    return out


def _start_copies(runtime, layers, start: int, stop: int, host: int, offsets: list[int],
                  piece_bytes: int | None = None) -> Callable[[], bool]:
    """Start copying every layer's K and V slice on the copy stream; returns done(), True once
    all have landed (a CUDA error raises TqstoreError; done() stays raising after that). Each
    source (1, heads, T, dim) is made row-contiguous first (MLX copies only where it must), so
    its heads are T rows apart. With piece_bytes (default _PIECE_BYTES) the copies go in pieces
    of whole rows, at most _WINDOW queued at a time, and done() (polled by the landing thread) queues the next
    as pieces land. If queueing fails part way, the copies already queued are waited for before
    the error leaves, so nothing still reads the sources or writes the lease."""
    stream = runtime.copy_stream()
    if stream is None:
        raise TqstoreError("no CUDA stream for the landing's copies")
    copies = [(mx.contiguous(source), params)
              for source, params in _copies(layers, start, stop, host, offsets)]
    addresses = _addresses([source for source, _ in copies])
    held = [source for source, _ in copies]  # alive until every piece has landed
    piece_bytes = _PIECE_BYTES if piece_bytes is None else piece_bytes
    pieces = []  # (dst, src, src pitch, row bytes, rows), queued from the end
    for address, (_, (at, heads, tokens, first, last, row)) in zip(addresses, copies):
        width = (last - first) * row
        step = max(1, piece_bytes // width) if piece_bytes else max(1, heads)
        for h in range(0, heads, step):
            pieces.append((at + h * width, address + (h * tokens + first) * row, tokens * row,
                           width, min(step, heads - h)))
    pieces.reverse()
    window = max(1, _WINDOW) if piece_bytes else 1
    per_event = 1 if piece_bytes else len(pieces)
    state: dict = {"events": [], "error": None}  # events of queued pieces, oldest first

    def fill() -> None:
        try:
            while pieces and len(state["events"]) < window:
                for _ in range(min(per_event, len(pieces))):
                    _check(runtime, runtime.copy_rows_async(*pieces.pop(), stream),
                           "cudaMemcpy2DAsync")
                status, event = runtime.record_event(stream)
                _check(runtime, status, "cudaEventRecord")
                state["events"].append(event)
        except Exception as exc:  # noqa: BLE001 - any failure: wait for what was queued first
            runtime.lib.cudaStreamSynchronize(stream)
            error = exc if isinstance(exc, TqstoreError) else TqstoreError(
                f"queueing the landing's copies failed: {type(exc).__name__}: {exc}")
            finish(error)
            raise error from None

    def finish(error: TqstoreError | None) -> None:
        for event in state["events"]:
            runtime.destroy_event(event)
        state["events"].clear()
        pieces.clear()
        held.clear()
        state["error"] = error

    def done() -> bool:
        if state["error"] is not None:
            raise state["error"]
        events = state["events"]
        while events:
            status = runtime.event_status(events[0])
            if status == _NOT_READY:
                break
            runtime.destroy_event(events.pop(0))
            try:
                _check(runtime, status, "the landing's copies")
            except TqstoreError as exc:
                runtime.lib.cudaStreamSynchronize(stream)
                finish(exc)
                raise
        if pieces:
            fill()
        if events or pieces:
            return False
        held.clear()
        return True

    fill()
    done.held = held  # what a landing never seen done keeps alive for good (see Landing)
    return done


def _check(runtime, status: int, what: str) -> None:
    """Raise for a failed CUDA call, clearing the runtime's last error (a failure reported when
    a call is queued; a fault inside a copy is sticky and ends the process's CUDA context,
    MLX's too: the self-check and the address arithmetic are what keep that from happening)."""
    if status != 0:
        runtime.lib.cudaGetLastError()
        raise TqstoreError(f"{what} failed (CUDA status {status})")


def _wait_for(done: Callable[[], bool], timeout: float) -> None:
    """Poll done() with growing pauses. On timeout the landing stays unwaited, so its lease and
    sources are kept for good when it is dropped (Landing): the copy may still run."""
    deadline, pause = time.monotonic() + timeout, _POLL_S
    while not done():
        if time.monotonic() > deadline:
            raise TqstoreError(f"the upload's device-to-host copy did not finish in {timeout:.0f} "
                               "s; the blocks are not uploaded")
        time.sleep(pause)
        pause = min(2 * pause, _POLL_MAX_S)  # each wake-up takes the GIL from decode


def _by_copy_engine(runtime, layers, start: int, stop: int, cap: int) -> Landing | None:
    if any(x.dtype != mx.float16 or x.ndim != 4 or x.shape[0] != 1 for pair in layers
           for x in pair):
        return None
    from tqstore.metal import selfcheck
    if selfcheck.is_disabled(_ROUTE):
        return None  # before leasing: a disabled route must not pin memory for nothing
    shapes, offsets, size = _layout(layers, start, stop)
    lease = landing_staging.lease(max(size, _CHECK_BYTES), cap)
    if lease is None:
        return None
    if not _usable(runtime, lease):
        return None
    keys, values = _landed(lease, shapes, offsets)
    try:
        done = _start_copies(runtime, layers, start, stop, lease.ctypes.data, offsets)
    except Exception as exc:  # noqa: BLE001  (a failed copy must not stop generation)
        _abandoned.append(lease)  # never lent again (queued copies were waited for, but the
        # stream's state after a failed call is not worth trusting with a buffer)
        log.warning("an upload's landing failed to start; its pinned buffer is not lent again "
                    "and uploads copy on the generating thread from now on")
        selfcheck.disable(_ROUTE, f"{type(exc).__name__}: {str(exc)[:300]}")
        return None

    def make(timeout: float) -> tuple[np.ndarray, np.ndarray]:
        _wait_for(done, timeout)
        return keys, values
    return Landing("copy-engine", make, [lease, done.held])


def _usable(runtime, lease: np.ndarray) -> bool:
    """The shared first-use self-check, once per process: a landing of a small random prefill
    (a sliced, non-contiguous source and rows of 24 bytes included), one row a piece, into the
    start of this very lease must come back bit for bit."""
    from tqstore.metal import selfcheck

    def check() -> str | None:
        rng = np.random.default_rng(20261126)
        def rand(*shape):
            return mx.array(rng.standard_normal(shape).astype(np.float16))

        for dim in (64, 12):
            # layer 0: K a slice along tokens (not row-contiguous: copied first), V a slice
            # along heads (row-contiguous at an offset into its buffer); layer 1 whole arrays
            probe = [(rand(1, 2, 11, dim)[:, :, 2:], rand(1, 3, 9, dim)[:, 1:]),
                     (rand(1, 2, 9, dim), rand(1, 2, 9, dim))]
            mx.eval(probe)
            shapes, offsets, _ = _layout(probe, 3, 8)
            # one row a piece: every later piece's address arithmetic runs on the device too
            done = _start_copies(runtime, probe, 3, 8, lease.ctypes.data, offsets, piece_bytes=1)
            try:
                _wait_for(done, 60.0)
            except TqstoreError:
                _abandoned.extend([lease, done.held])  # a copy may still run: keep both
                raise
            for which, got in enumerate(_landed(lease, shapes, offsets)):
                want = np.stack([np.array(pair[which])[0, :, 3:8] for pair in probe])
                if got.tobytes() != want.tobytes():
                    return f"the landed bytes differ from the device's (head dim {dim})"
        return None

    return selfcheck.usable(_ROUTE, ("float16",), check)


def warm_up_landing(cap: int) -> None:
    """On CUDA with staging on: compile the address kernel, run the route's self-check and pin
    the landing buffer's first granule now, not inside a first decode step. Nothing elsewhere."""
    runtime = device_memory._cudart()
    if cap <= 0 or runtime is None:
        return
    probe = [(mx.zeros((1, 1, 4, 64), mx.float16), mx.zeros((1, 1, 4, 64), mx.float16))]
    mx.eval(probe)
    landing = _by_copy_engine(runtime, probe, 0, 4, cap)
    if landing is not None:
        try:
            landing.result(timeout=60.0)
        except TqstoreError as exc:  # a generator must still be made: the copy serves
            from tqstore.metal import selfcheck
            selfcheck.disable(_ROUTE, str(exc))
