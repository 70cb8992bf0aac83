"""Moving host-made arrays onto a CUDA device in bulk before the first kernel reads them.

MLX's CUDA backend allocates every buffer as managed memory (cudaMallocManaged). An array made
from host bytes (a hit's restored K/V: ``mx.array(numpy)``) is written by the CPU, so its pages
sit in host memory, and the first kernel that reads it migrates them one page fault at a time.
On an H100 that ran at ~2 GB/s: restoring 8k tokens of an 8B-shaped model (1.07 GB) took longer
than fetching it (tools/h2d_probe.py, docs/BENCHMARKS.md). ``cudaMemPrefetchAsync`` moves the
same pages with the copy engine. It is a placement hint: managed memory stays coherent whatever
it does, so a failed or skipped prefetch costs speed, never bytes.

Reached through ctypes (MLX exposes no pointer API); on Metal (unified memory), on the CPU, or
where libcudart cannot be loaded, ``prefetch_to_device`` does nothing and says so (returns 0).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

import mlx.core as mx
import numpy as np

log = logging.getLogger("tqstore.device_memory")

_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
_LOCATION_DEVICE = 1  # cudaMemLocationTypeDevice
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the driver infers the direction from the pointers


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Cudart:
    """The few runtime calls a prefetch needs, with the signature this runtime has."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        version = ctypes.c_int(0)
        lib.cudaRuntimeGetVersion(ctypes.byref(version))
        self.version = version.value
        device = ctypes.c_int(0)
        lib.cudaGetDevice(ctypes.byref(device))
        self.device = device.value
        # CUDA 13 removed the (ptr, bytes, int device, stream) form; 12.2+ has the location
        # form as cudaMemPrefetchAsync_v2.
        if self.version >= 13000:
            self._prefetch, self._by_location = lib.cudaMemPrefetchAsync, True
        elif hasattr(lib, "cudaMemPrefetchAsync_v2"):
            self._prefetch, self._by_location = lib.cudaMemPrefetchAsync_v2, True
        else:
            self._prefetch, self._by_location = lib.cudaMemPrefetchAsync, False
        if self._by_location:
            self._prefetch.argtypes = [ctypes.c_void_p, ctypes.c_size_t, _MemLocation,
                                       ctypes.c_uint, ctypes.c_void_p]
        else:
            self._prefetch.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                       ctypes.c_void_p]
        self._prefetch.restype = ctypes.c_int
        lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        lib.cudaStreamSynchronize.restype = ctypes.c_int
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.cudaMemcpy.restype = ctypes.c_int
        lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                        ctypes.c_int, ctypes.c_void_p]
        lib.cudaMemcpyAsync.restype = ctypes.c_int
        lib.cudaStreamCreateWithFlags.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        lib.cudaStreamCreateWithFlags.restype = ctypes.c_int
        lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cudaHostRegister.restype = ctypes.c_int
        lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cudaHostUnregister.restype = ctypes.c_int
        lib.cudaGetLastError.restype = ctypes.c_int
        self._streams = threading.local()

    def prefetch(self, pointer: int, nbytes: int) -> int:
        if self._by_location:
            return self._prefetch(pointer, nbytes, _MemLocation(_LOCATION_DEVICE, self.device), 0,
                                  None)
        return self._prefetch(pointer, nbytes, self.device, None)

    def synchronize(self) -> int:
        return self.lib.cudaStreamSynchronize(None)

    def copy(self, dst: int, src: int, nbytes: int) -> int:
        return self.lib.cudaMemcpy(dst, src, nbytes, _MEMCPY_DEFAULT)

    def copy_on_thread_stream(self, dst: int, src: int, nbytes: int) -> int:
        """A copy on this thread's own non-blocking stream, waited for: copies from several
        threads then run side by side instead of queueing on the legacy default stream."""
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            handle = ctypes.c_void_p()
            status = self.lib.cudaStreamCreateWithFlags(ctypes.byref(handle), 1)
            if status != 0:
                return status
            stream = self._streams.stream = handle
        status = self.lib.cudaMemcpyAsync(dst, src, nbytes, _MEMCPY_DEFAULT, stream)
        return status or self.lib.cudaStreamSynchronize(stream)


_lock = threading.Lock()
_runtime: _Cudart | None = None
_probed = False


def _cudart() -> _Cudart | None:
    """The CUDA runtime, once per process; None off CUDA or where it does not load."""
    global _runtime, _probed
    with _lock:
        if _probed:
            return _runtime
        _probed = True
        from tqstore.metal.attention_kernel import gpu_backend
        if gpu_backend() != "cuda":
            return None
        names = list(_CUDART_NAMES)
        found = ctypes.util.find_library("cudart")
        if found:
            names.append(found)
        for name in names:
            try:
                _runtime = _Cudart(ctypes.CDLL(name))
                break
            except (OSError, AttributeError):
                continue
        if _runtime is None:
            log.warning("libcudart not found: restored prefixes reach the GPU by page faults")
        return _runtime


def prefetch_to_device(arrays: list[mx.array]) -> int:
    """Migrate the (evaluated, contiguous) arrays' pages to the CUDA device now and wait for
    it; returns the bytes moved (0 where there is nothing to do or no way to do it)."""
    runtime = _cudart()
    if runtime is None:
        return 0
    moved = 0
    for arr in arrays:
        view = np.array(arr, copy=False)  # the managed buffer itself (host-addressable)
        pointer = view.__array_interface__["data"][0]
        status = runtime.prefetch(pointer, view.nbytes)
        if status != 0:
            log.warning("cudaMemPrefetchAsync failed (status %d): page faults will do", status)
            return moved
        moved += view.nbytes
    runtime.synchronize()
    return moved


def host_to_device(host: np.ndarray) -> mx.array:
    """``mx.array(host)``, on CUDA written by cudaMemcpy from pinned host memory.

    ``mx.array`` memcpys on one CPU thread into fresh managed pages, faulting each one in: ~2.5
    GB/s on an H100 host (tools/h2d_probe.py), and the first kernel to read the result faults
    the pages over again. Here the destination is an MLX array made for it (a zero fill,
    evaluated, contiguous, referenced by nobody else), the host bytes are pinned for the time of
    the copy, and cudaMemcpy writes them into its buffer; so it is the same array
    ``mx.array(host)`` would give. Anywhere else, or if any step fails, it is ``mx.array(host)``.
    """
    runtime = _cudart()
    host = np.ascontiguousarray(host)
    if runtime is None or host.nbytes == 0:
        return mx.array(host)
    out = mx.zeros(host.shape, dtype=mx.array(np.empty(0, host.dtype)).dtype)
    mx.eval(out)
    view = np.array(out, copy=False)
    if not view.flags.c_contiguous or view.nbytes != host.nbytes:
        return mx.array(host)
    # Pinned for the copy: the copy engine then reads it directly (~50 GB/s on an H100 host,
    # registering ~40 GB/s) instead of staging pageable memory through the driver (~8 GB/s).
    # Registration may fail (memory already pinned by a concurrent copy of a neighbouring
    # buffer, a pinning limit): the copy is then from pageable memory.
    pinned = runtime.lib.cudaHostRegister(host.ctypes.data, host.nbytes, 0) == 0
    try:
        status = runtime.copy(view.__array_interface__["data"][0], host.ctypes.data, host.nbytes)
        # From pageable memory cudaMemcpy may return before the bytes reach the destination,
        # and MLX's streams are not ordered after the legacy stream it used: wait for it.
        status = status or runtime.synchronize()
    finally:
        if pinned:
            runtime.lib.cudaHostUnregister(host.ctypes.data)
        runtime.lib.cudaGetLastError()  # a failed registration must not surface in MLX later
    if status != 0:
        log.warning("cudaMemcpy failed (status %d): copying through the host", status)
        return mx.array(host)
    return out
