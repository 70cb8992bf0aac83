"""A hit's bytes read straight into MLX's memory, where that memory is the host's (the CPU
device, Metal): the fetch's read is then the restore's only copy.

device_memory.staging_empty gives a fetch these arrays' numpy views off CUDA (on CUDA, the
pinned staging buffer instead), and device_memory.host_to_device hands the restore MLX's arrays
back through mlx_owner, with no copy. On the CPU device what remains of a restore is MLX's zero
fill: first-touch page faults of fresh memory (MLX's CPU allocator takes large arrays from
malloc and keeps no cache of freed ones; docs/BENCHMARKS.md, "A restore with one copy on
unified memory").
"""

from __future__ import annotations

import logging
import threading

import mlx.core as mx
import numpy as np

from tqstore.metal.attention_kernel import gpu_build

log = logging.getLogger("tqstore.unified_memory")
_streams_lock = threading.Lock()


def unified_empty(shapes: list[tuple[int, ...]], dtype: np.dtype) -> list[np.ndarray] | None:
    """Zeroed arrays that MLX allocated, seen through numpy (writable views of the same
    memory), or None where MLX does not give such a view. For unified memory only: on CUDA
    numpy's view of an MLX array moves its buffer into managed memory first.

    Why: reading a hit into np.empty and then ``mx.array`` of it copies every byte twice and
    faults in two sets of fresh pages. Reading into memory MLX owns makes the read the only copy
    (the zero fill is MLX's allocation, on the GPU under Metal). MLX may run this on the fetch's
    worker thread: its evaluation is thread-safe from 0.31.2 (we pin 0.32.4), and the arrays
    are evaluated here, so nothing later waits on this thread's stream. Invariant: nothing
    writes through the views once device_memory.host_to_device has handed the arrays to MLX
    (a fetch fills them, then a restore takes them)."""
    dtype = np.dtype(dtype)
    try:
        mx_dtype = mx.array(np.empty(0, dtype)).dtype
        # stream= rather than `with mx.stream(...)`: the context manager also sets the
        # process-wide default device.
        arrays = [mx.zeros(shape, dtype=mx_dtype, stream=stream)
                  for shape, stream in zip(shapes, _fill_streams(len(shapes)))]
        mx.eval(*arrays)
        views = [np.array(a, copy=False) for a in arrays]
    except (ValueError, TypeError, RuntimeError) as exc:  # a dtype or build without views
        log.warning("MLX gave no view of its memory (%s): fetches read into numpy first", exc)
        return None
    if not all(v.flags.c_contiguous and v.flags.writeable and v.dtype == dtype
               and _owner_of(v) is a for v, a in zip(views, arrays)):
        return None
    return views


_fill_stream_pair: list | None = None  # made once: thread-local streams serve any thread


def _fill_streams(count: int) -> list:
    """Where unified_empty's zero fills run. On a CPU-only build two streams, so K's fill and
    V's run on two threads (the fill is mostly first-touch page faults of fresh memory: 2x
    faster so on the 2-core VM); MLX's thread-local streams, since a plain stream belongs to
    the thread that made it and fetches run on worker threads. With a GPU (Metal) the default
    stream: the fill runs on the GPU."""
    global _fill_stream_pair
    if gpu_build("metal") or gpu_build("cuda"):
        return [None] * count
    with _streams_lock:
        if _fill_stream_pair is None:
            _fill_stream_pair = [mx.new_thread_local_stream(mx.cpu) for _ in range(2)]
    return [_fill_stream_pair[i % 2] for i in range(count)]


def mlx_owner(host: np.ndarray) -> mx.array | None:
    """An MLX array of host's very bytes, where host is a view of an array unified_empty made
    (the whole of it or a leading slice, laid out as host is); None for any other numpy array.
    It is a new, evaluated handle on the same memory (no copy): not the owner itself, which
    the views hold, so MLX never reuses that buffer for an in-place update of the result while
    a view can still see it, and evaluated here, on the caller's thread."""
    owner = _owner_of(host)
    if owner is None:
        return None
    out = owner[tuple(slice(0, n) for n in host.shape)]
    mx.eval(out)
    return out


def _owner_of(host: np.ndarray) -> mx.array | None:
    """The MLX array host views from its start with its layout (see mlx_owner), else None.
    numpy keeps the exporter of a buffer as the base of every view of it: for an MLX array's
    view that is a memoryview whose obj is the array."""
    base = host
    while isinstance(base, np.ndarray):
        base = base.base
    owner = base.obj if isinstance(base, memoryview) else None
    if not isinstance(owner, mx.array) or owner.ndim != host.ndim:
        return None
    whole = np.array(owner, copy=False)  # unified memory: the same buffer, no move
    if (whole.ctypes.data != host.ctypes.data or whole.strides != host.strides
            or whole.dtype != host.dtype or any(h > w for h, w in zip(host.shape, whole.shape))):
        return None
    return owner
