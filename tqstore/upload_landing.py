"""A prefill's new fp16 blocks from the device to host memory, without stalling decode.

The upload hook (tqstore.generator.CachedGenerator.upload_hook) fires inside the first decode
step, when the last layer finishes its prefill. Copying the new blocks to the host there, on the
generating thread, delays that step by the copy: on CUDA ``np.array`` of an MLX array also makes
MLX move the whole device buffer into fresh managed memory first (~0.05 s per GB measured on the
H100, plus the copy itself: 1.1 s at 8k tokens of an 8B shape, 5 s at 32k). ``land()`` instead
starts the copy and returns at once; ``then()`` waits for the bytes on a landing thread of its
own, which cuts the blocks out of them (freeing the landing's buffer) and hands them to the
upload thread's Put. Routes:

- ``kernel`` (CUDA): per layer, a copy kernel on a side stream reads the K/V slice from device
  memory and writes it over the bus into a pinned, device-mapped host buffer (its own
  PinnedStaging, ``landing_staging``, so a restore's staging buffer stays free for the next hit).
  A last kernel, ordered after every copy, writes a fresh token into a flag word of that buffer;
  ``result()`` polls the flag, so the landing thread never calls into MLX (MLX must not evaluate
  on two threads at once). Every copy thread fences its writes system-wide before it ends, so
  the host that sees the token sees every byte (the CUDA memory model's fence-then-flag).
- ``views`` (unified memory: CPU, Metal): the evaluated K/V are seen through numpy without a copy
  now; the slicing copy runs on the landing thread. The views keep the MLX arrays alive, so MLX
  never reuses their buffers meanwhile.
- ``copied``: the old way, on the generating thread (a stall): CUDA when the landing buffer is
  held by another upload, over the cap (``ClientConfig.staging_bytes``), not pinnable, a dtype
  other than fp16, libcudart is missing, or the kernel failed its self-check.

Measured (docs/BENCHMARKS.md, "Uploads off the generating thread"): on the H100 the landing runs
at 43-49 GB/s, but the first decode step still grows by about its duration (8k +16 ms, 32k
+86 ms); why it waits is not known yet. Growing the pinned buffer (the first upload longer than
any before, past the warm-up's 256 MB) also happens on the generating thread.

The copy kernel passes the kernels' shared first-use self-check (tqstore.metal.selfcheck,
"upload_landing"): a small landing must come back bit for bit, else the kernel is disabled for
the process with one warning and ``copied`` serves. ``warm_up_landing`` runs it (and compiles
both kernels) when a generator with a daemon is made, not inside the first decode step.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

import mlx.core as mx
import numpy as np

from tqstore import device_memory
from tqstore.device_memory import PinnedStaging
from tqstore.errors import TqstoreError
from tqstore.metal.attention_kernel import gpu_backend

log = logging.getLogger("tqstore.upload_landing")
T = TypeVar("T")

_ALIGN = 256  # each staged array starts on a 256-byte boundary (16-byte words in the kernel)
_THREADS = 256
# Enough stores in flight to fill the bus while leaving most of the SMs to decode, which runs
# beside the landing on the default stream.
_MAX_THREADS = 64 * _THREADS
_KERNEL = "upload_landing"  # its name in the kernels' self-check
_WAIT_S = 300.0  # result() gives up after this long (the buffer is then never lent again)
_POLL_S = 0.0002  # the first pause between looks at the flag; it doubles up to _POLL_MAX_S
_POLL_MAX_S = 0.002
_barrier = threading.Lock()
_CHECK_BYTES = 64 << 10  # a lease is at least this big: the self-check lands into it

# The process's pinned buffer for uploads in flight (capped by ClientConfig.staging_bytes).
# One: a landing holds it only until the landing thread has cut its blocks out (then() below),
# ~0.1 s for 1 GB, so two prefills rarely end that close together; the second of such a pair is
# copied on the generating thread.
landing_staging = PinnedStaging()
_tokens = itertools.count(1)  # a flag value no earlier landing wrote
_abandoned: list[np.ndarray] = []  # leases whose landing never signalled: never lent again
_streams = threading.local()
_kernels: dict[str, object] = {}

# params: destination device address, heads, tokens T of the source, start, stop, bytes per
# token row. The source is (1, heads, T, D) row-contiguous; the destination (heads, stop -
# start, D). 16-byte words where every address and row allows it, else byte by byte.
_LAND_SOURCE = """
    (void)after;
    const unsigned long long dst_address = params[0];
    const unsigned long long heads = params[1], tokens = params[2];
    const unsigned long long start = params[3], stop = params[4], row = params[5];
    const unsigned long long per_head = (stop - start) * row;
    const unsigned long long total = heads * per_head;
    const unsigned char* src = reinterpret_cast<const unsigned char*>(source);
    unsigned char* dst = reinterpret_cast<unsigned char*>(dst_address);
    const unsigned long long first = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    if ((((unsigned long long)src) | dst_address | row) % 16 == 0) {
        const unsigned long long head_words = per_head / 16, words = total / 16;
        const unsigned long long head_stride = tokens * row / 16, skip = start * row / 16;
        const uint4* src_words = reinterpret_cast<const uint4*>(src);
        uint4* dst_words = reinterpret_cast<uint4*>(dst);
        for (unsigned long long w = first; w < words; w += stride) {
            const unsigned long long h = w / head_words;
            dst_words[w] = src_words[h * head_stride + skip + (w - h * head_words)];
        }
    } else {
        for (unsigned long long b = first; b < total; b += stride) {
            const unsigned long long h = b / per_head;
            dst[b] = src[h * tokens * row + start * row + (b - h * per_head)];
        }
    }
    __threadfence_system();
    if (first == 0) {
        done[0] = 0;
    }
"""
# params: the flag's device address, the token. Ordered after every copy (its input).
_SIGNAL_SOURCE = """
    (void)after;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        __threadfence_system();
        *reinterpret_cast<volatile unsigned long long*>(params[0]) = params[1];
        __threadfence_system();
        done[0] = 0;
    }
"""


class Landing:
    """K and V slices on their way to host memory. ``result()``, once, on any thread, gives
    them as (layers, heads, tokens, dim) arrays and lets go of everything else: the landing
    buffer is then free as soon as the caller drops those arrays (the landing thread cuts the
    upload's blocks out of them), and the views route stops holding the MLX arrays."""

    def __init__(self, route: str, make: Callable[[float], tuple[np.ndarray, np.ndarray]],
                 lease: np.ndarray | None = None):
        self.route = route
        self._make: Callable | None = make
        self.started = time.perf_counter()  # land() sets it to when the landing began
        self.ready_s: float | None = None  # seconds from then until result() had the bytes
        self._pending = [lease] if lease is not None else []
        if lease is not None:
            # A kernel landing dropped unwaited may still be writing: its lease is then never
            # lent again.
            weakref.finalize(self, _keep_if_pending, self._pending)

    def result(self, timeout: float = _WAIT_S) -> tuple[np.ndarray, np.ndarray]:
        if self._make is None:
            raise TqstoreError("a landing's result is taken once")
        got = self._make(timeout)
        self._make = None
        self._pending.clear()
        self.ready_s = time.perf_counter() - self.started
        return got


def _keep_if_pending(pending: list[np.ndarray]) -> None:
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
    if not (0 <= start < stop <= k0.shape[2]) or any(
            k.shape != k0.shape or v.shape != v0.shape for k, v in layers):
        raise TqstoreError(f"a landing of positions [{start}, {stop}) needs every layer's K and "
                           f"V of one shape holding them (layer 0: {k0.shape}, {v0.shape})")
    runtime = device_memory._cudart()
    if gpu_backend() != "cuda":
        landing = _by_views(layers, start, stop)  # unified memory: host-addressable
    elif runtime is not None:
        landing = _by_kernel(runtime, layers, start, stop, cap)
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
    """The staged arrays' shapes (K, V), their byte offsets in the lease, and the lease size
    (the flag word last)."""
    k, v = layers[0]
    shapes = [(len(layers), k.shape[1], stop - start, k.shape[3]),
              (len(layers), v.shape[1], stop - start, v.shape[3])]
    offsets, at = [], 0
    for shape in shapes:
        offsets.append(at)
        at += -(-int(np.prod(shape)) * 2 // _ALIGN) * _ALIGN
    offsets.append(at)  # the flag
    return shapes, offsets, at + _ALIGN


def _side_stream():
    """This thread's GPU stream for landings: they run beside decode on the default stream."""
    stream = getattr(_streams, "stream", None)
    if stream is None:
        stream = _streams.stream = mx.new_stream(mx.gpu)
    return stream


def _kernel(name: str, inputs: list[str], source: str):
    if name not in _kernels:
        _kernels[name] = mx.fast.cuda_kernel(name=name, input_names=inputs,
                                             output_names=["done"], source=source)
    return _kernels[name]


def _copies(layers, start: int, stop: int, base: int, offsets: list[int]
            ) -> list[tuple[mx.array, list[int]]]:
    """Per layer, K then V: (source, the copy kernel's params). Layer i's slice lands at
    base + offsets[K or V] + i * (its bytes): the (layers, heads, stop - start, dim) arrays
    _by_kernel reads back."""
    out = []
    for which, offset in enumerate(offsets[:2]):
        for layer, pair in enumerate(layers):
            source = pair[which]
            heads, tokens, dim = source.shape[1], source.shape[2], source.shape[3]
            row = dim * source.itemsize
            at = base + offset + layer * heads * (stop - start) * row
            out.append((source, [at, heads, tokens, start, stop, row]))
    return out


def _launch(layers, start: int, stop: int, base: int, offsets: list[int], token: int) -> mx.array:
    """Every layer's K and V slice copied to base + offsets (device addresses), then the flag
    set to token; returns the signal's output (evaluate it to run them all)."""
    land_kernel = _kernel("tq_land_to_pinned", ["source", "params", "after"], _LAND_SOURCE)
    after = mx.zeros((1,), mx.uint32)
    for source, params in _copies(layers, start, stop, base, offsets):
        nbytes = params[1] * (stop - start) * params[5]
        threads = min(_MAX_THREADS, -(-nbytes // 16 // _THREADS) * _THREADS) or _THREADS
        after, = land_kernel(inputs=[source, mx.array(np.array(params, np.uint64)), after],
                             output_shapes=[(1,)], output_dtypes=[mx.uint32],
                             grid=(threads, 1, 1), threadgroup=(_THREADS, 1, 1))
    signal = _kernel("tq_land_signal", ["params", "after"], _SIGNAL_SOURCE)
    params = mx.array(np.array([base + offsets[2], token], np.uint64))
    done, = signal(inputs=[params, after], output_shapes=[(1,)], output_dtypes=[mx.uint32],
                   grid=(1, 1, 1), threadgroup=(1, 1, 1))
    return done


def _wait_for(flag: np.ndarray, token: int, timeout: float) -> None:
    """Poll the flag word for token. On timeout the landing stays unwaited, so its lease is
    kept for good when it is dropped (Landing): a late kernel may still write there."""
    deadline, pause = time.monotonic() + timeout, _POLL_S
    while int(flag[0]) != token:
        if time.monotonic() > deadline:
            raise TqstoreError(f"the upload's device-to-host copy did not finish in {timeout:.0f} "
                               "s; the blocks are not uploaded")
        time.sleep(pause)
        pause = min(2 * pause, _POLL_MAX_S)  # each wake-up takes the GIL from decode
    # An acquire barrier before reading the bytes (x86 orders loads anyway; ARM hosts do not).
    with _barrier:
        pass


def _by_kernel(runtime, layers, start: int, stop: int, cap: int) -> Landing | None:
    if any(x.dtype != mx.float16 or x.ndim != 4 or x.shape[0] != 1 for pair in layers
           for x in pair):
        return None
    shapes, offsets, size = _layout(layers, start, stop)
    lease = landing_staging.lease(max(size, _CHECK_BYTES), cap)
    if lease is None:
        return None
    base = device_memory.mapped_address(runtime, lease)
    if base is None:
        return None
    if not _usable(lease, base):
        return None
    flag = lease[offsets[2]:offsets[2] + 8].view(np.uint64)
    keys, values = (lease[at:at + int(np.prod(shape)) * 2].view(np.float16).reshape(shape)
                    for at, shape in zip(offsets, shapes))
    token = next(_tokens)
    flag[0] = 0
    try:
        with mx.stream(_side_stream()):
            done = _launch(layers, start, stop, base, offsets, token)
            mx.async_eval(done)
    except Exception as exc:  # noqa: BLE001  (a kernel that fails must not stop generation)
        from tqstore.metal import selfcheck
        _abandoned.append(lease)  # some copies may have been queued: never lend it again
        log.warning("an upload's landing kernel failed to launch; its pinned buffer is not lent "
                    "again and uploads copy on the generating thread from now on")
        selfcheck.disable(_KERNEL, f"{type(exc).__name__}: {str(exc)[:300]}")
        return None

    def make(timeout: float) -> tuple[np.ndarray, np.ndarray]:
        _wait_for(flag, token, timeout)
        return keys, values
    return Landing("kernel", make, lease)


def _usable(lease: np.ndarray, base: int) -> bool:
    """The kernels' shared self-check, once per process: a landing of a small random prefill
    (a tail that is no whole 16-byte word included) into the start of this very lease must
    come back bit for bit."""
    from tqstore.metal import selfcheck

    def check() -> str | None:
        rng = np.random.default_rng(20261126)
        for dim in (64, 12):  # 16-byte words; rows of 24 bytes (byte by byte)
            probe = [tuple(mx.array(rng.standard_normal((1, 2, 9, dim)).astype(np.float16))
                           for _ in range(2)) for _ in range(2)]
            mx.eval(probe)
            shapes, offsets, _ = _layout(probe, 3, 8)
            token = next(_tokens)
            flag = lease[offsets[2]:offsets[2] + 8].view(np.uint64)
            flag[0] = 0
            with mx.stream(_side_stream()):  # the stream the real landings use
                mx.eval(_launch(probe, 3, 8, base, offsets, token))
            for which, (at, shape) in enumerate(zip(offsets, shapes)):
                got = lease[at:at + int(np.prod(shape)) * 2].view(np.float16).reshape(shape)
                want = np.stack([np.array(pair[which])[0, :, 3:8] for pair in probe])
                if got.tobytes() != want.tobytes():
                    return f"the landed bytes differ from the device's (head dim {dim})"
            if int(flag[0]) != token:
                return "the landing's flag was not set"
        return None

    return selfcheck.usable(_KERNEL, ("float16",), check)


def warm_up_landing(cap: int) -> None:
    """On CUDA with staging on: compile the landing kernels, run their self-check and pin the
    landing buffer's first granule now, not inside a first decode step. Nothing elsewhere."""
    runtime = device_memory._cudart()
    if cap <= 0 or runtime is None:
        return
    probe = [(mx.zeros((1, 1, 4, 64), mx.float16), mx.zeros((1, 1, 4, 64), mx.float16))]
    mx.eval(probe)
    landing = _by_kernel(runtime, probe, 0, 4, cap)
    if landing is not None:
        try:
            landing.result(timeout=60.0)
        except TqstoreError as exc:  # a generator must still be made: the copy serves
            from tqstore.metal import selfcheck
            selfcheck.disable(_KERNEL, str(exc))
