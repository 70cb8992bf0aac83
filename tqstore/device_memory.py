"""A hit's host bytes into a CUDA device: the staging buffer, the copy, and probes of both.

MLX's CUDA backend gives Python no device pointer, allocates host-made arrays as managed memory
(``mx.array(numpy)`` memcpys on one thread into fresh pages, ~2.5 GB/s on an H100 host, and the
first kernel to read them faults them over at 8-12 GB/s: tools/h2d_probe.py), and moves a device
buffer into fresh managed memory when numpy asks for its pointer. So a restore here:
- reads the fetched K and V into one reused, page-locked, device-mapped staging buffer
  (tqstore.pinned_staging.PinnedStaging: no page faults, no pinning per hit);
- copies them with a custom kernel that reads the staging buffer over the bus into an ordinary
  device array MLX allocates (host_to_device; ~45 GB/s inside a hit);
- anything not in the staging buffer goes by cudaMemcpy into a device-made array, pinned for
  the copy; and off CUDA it is ``mx.array``.
Reached through ctypes (libcudart). ``prefetch_to_device`` (cudaMemPrefetchAsync of managed
arrays) and ``_Cudart.copy_on_thread_stream`` serve tools/h2d_probe.py's measurements only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

import mlx.core as mx
import numpy as np

from tqstore import unified_memory
from tqstore.metal.attention_kernel import gpu_backend, gpu_build
from tqstore.pinned_staging import ALIGN as _ALIGN  # staging arrays: the copy kernel's loads
from tqstore.pinned_staging import PinnedStaging

log = logging.getLogger("tqstore.device_memory")

_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
_LOCATION_DEVICE = 1  # cudaMemLocationTypeDevice
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the driver infers the direction from the pointers


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Cudart:
    """The few runtime calls this module makes, with the signatures this runtime has."""

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
        pointer, size, num = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        for name, args in (("cudaStreamSynchronize", [pointer]),
                           ("cudaMemcpy", [pointer, pointer, size, num]),
                           ("cudaMemcpyAsync", [pointer, pointer, size, num, pointer]),
                           ("cudaStreamCreateWithFlags", [ctypes.POINTER(pointer), ctypes.c_uint]),
                           ("cudaHostRegister", [pointer, size, ctypes.c_uint]),
                           ("cudaHostUnregister", [pointer]), ("cudaGetLastError", []),
                           ("cudaHostGetDevicePointer", [ctypes.POINTER(pointer), pointer,
                                                         ctypes.c_uint]),
                           # the upload landing's
                           ("cudaMemcpy2DAsync", [pointer, size, pointer, size, size, size, num,
                                                  pointer]),
                           ("cudaEventCreateWithFlags", [ctypes.POINTER(pointer), ctypes.c_uint]),
                           ("cudaEventRecord", [pointer, pointer]),
                           ("cudaEventQuery", [pointer]), ("cudaEventDestroy", [pointer])):
            getattr(lib, name).argtypes, getattr(lib, name).restype = args, ctypes.c_int
        self._streams = threading.local()
        self._copy_stream: ctypes.c_void_p | None = None

    def prefetch(self, pointer: int, nbytes: int) -> int:
        if self._by_location:
            return self._prefetch(pointer, nbytes, _MemLocation(_LOCATION_DEVICE, self.device), 0,
                                  None)
        return self._prefetch(pointer, nbytes, self.device, None)

    def synchronize(self) -> int:
        return self.lib.cudaStreamSynchronize(None)

    def copy(self, dst: int, src: int, nbytes: int) -> int:
        return self.lib.cudaMemcpy(dst, src, nbytes, _MEMCPY_DEFAULT)

    def copy_stream(self) -> ctypes.c_void_p | None:
        """The process's non-blocking stream for device-to-host copies by the copy engine
        (tqstore.upload_landing): they never wait for, or hold up, MLX's streams."""
        with _lock:
            if self._copy_stream is None:
                handle = ctypes.c_void_p()
                if self.lib.cudaStreamCreateWithFlags(ctypes.byref(handle), 1) != 0:
                    self.lib.cudaGetLastError()
                    return None
                self._copy_stream = handle
            return self._copy_stream

    def copy_rows_async(self, dst: int, src: int, src_pitch: int, row_bytes: int, rows: int,
                        stream: ctypes.c_void_p) -> int:
        """rows runs of row_bytes, src_pitch apart at src, packed at dst; queued on stream."""
        return self.lib.cudaMemcpy2DAsync(dst, row_bytes, src, src_pitch, row_bytes, rows,
                                          _MEMCPY_DEFAULT, stream)

    def record_event(self, stream: ctypes.c_void_p) -> tuple[int, ctypes.c_void_p]:
        """(status, an event recorded on stream after everything queued there so far)."""
        event = ctypes.c_void_p()
        status = self.lib.cudaEventCreateWithFlags(ctypes.byref(event), 2)  # DisableTiming
        if status == 0:
            status = self.lib.cudaEventRecord(event, stream)
            if status != 0:  # the caller gets no event to destroy
                self.lib.cudaEventDestroy(event)
        return status, event

    def event_status(self, event: ctypes.c_void_p) -> int:
        """0 once the event's work is done, 600 (cudaErrorNotReady) before, else an error."""
        return self.lib.cudaEventQuery(event)

    def destroy_event(self, event: ctypes.c_void_p) -> None:
        self.lib.cudaEventDestroy(event)

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


def host_to_device(host: np.ndarray, times: dict[str, float] | None = None) -> mx.array:
    """``mx.array(host)``, on CUDA by the GPU reading pinned host memory or by cudaMemcpy.

    ``mx.array`` memcpys on one CPU thread into fresh managed pages, faulting each one in: ~2.5
    GB/s on an H100 host (tools/h2d_probe.py), and the first kernel to read the result faults
    the pages over again. On CUDA:
    - bytes in the staging buffer (a fetch read them there; pinned and mapped for good): a
      copy kernel reads them over the bus into an ordinary device array MLX allocates (its
      output). Why a kernel: MLX gives Python no device pointer; asking for one (numpy's view
      of an array) moves a device buffer into fresh managed memory first, which cost more than
      the copy (measured on the H100: 0.05 s per GB).
    - other bytes: the destination is an MLX array made for it (a zero fill, evaluated, seen
      through numpy), the host bytes are pinned for the time of the copy, and cudaMemcpy writes
      them into its buffer.
    Either way it is the array ``mx.array(host)`` would give; anywhere else, or if a step
    fails, it is ``mx.array(host)``. Except: where host is a view of an array MLX owns
    (unified_memory.unified_empty: a fetch on unified memory read into it), an MLX array of
    those very bytes, with no copy (unified_memory.mlx_owner). times, if given, gathers
    seconds spent preparing the destination ("prepare"), pinning ("pin") and copying ("copy"),
    and counts copies made by the kernel from the staging buffer ("staged") and arrays taken in
    place ("in_place").
    """
    owned = unified_memory.mlx_owner(host)
    if owned is not None:  # the fetch wrote into MLX's memory (unified_empty): no copy at all
        _add_times(times, prepare=0.0, pin=0.0, copy=0.0, staged=0, in_place=1)
        return owned
    runtime = _cudart()
    host = np.ascontiguousarray(host)
    if runtime is None or host.nbytes == 0:
        return mx.array(host)
    dtype = mx.array(np.empty(0, host.dtype)).dtype
    started = time.perf_counter()
    if staging.holds(host.ctypes.data, host.nbytes) and host.ctypes.data % 16 == 0:
        out = _copy_from_staging(runtime, host, dtype)
        if out is not None:
            _add_times(times, prepare=0.0, pin=0.0, copy=time.perf_counter() - started, staged=1)
            return out
    out = mx.zeros(host.shape, dtype=dtype)
    mx.eval(out)
    view = np.array(out, copy=False)
    if not view.flags.c_contiguous or view.nbytes != host.nbytes:
        return mx.array(host)
    prepared = time.perf_counter()
    # Pinned for the copy: the copy engine then reads it directly (~50 GB/s on an H100 host,
    # registering ~40 GB/s) instead of staging pageable memory through the driver (~8 GB/s).
    # Registration may fail (memory already pinned by a concurrent copy of a neighbouring
    # buffer, a pinning limit): the copy is then from pageable memory.
    registered = runtime.lib.cudaHostRegister(host.ctypes.data, host.nbytes, 0) == 0
    pinned = time.perf_counter()
    try:
        status = runtime.copy(view.__array_interface__["data"][0], host.ctypes.data, host.nbytes)
        # From pageable memory cudaMemcpy may return before the bytes reach the destination,
        # and MLX's streams are not ordered after the legacy stream it used: wait for it.
        status = status or runtime.synchronize()
    finally:
        if registered:
            runtime.lib.cudaHostUnregister(host.ctypes.data)
        runtime.lib.cudaGetLastError()  # a failed registration must not surface in MLX later
    if status != 0:
        log.warning("cudaMemcpy failed (status %d): copying through the host", status)
        return mx.array(host)
    _add_times(times, prepare=prepared - started, pin=pinned - prepared,
               copy=time.perf_counter() - pinned, staged=0)
    return out


def _add_times(times: dict[str, float] | None, **parts: float) -> None:
    if times is not None:
        for name, value in parts.items():
            times[name] = times.get(name, 0.0) + value


# Each thread copies 16-byte words, grid-striding; the few bytes past the last whole word one by
# one. The source is pinned host memory mapped into the device's address space (registered
# with cudaHostRegisterMapped): its device address travels as data (MLX passes arrays only).
_COPY_SOURCE = """
    const unsigned long long address = (unsigned long long)source[0];
    const unsigned long long nbytes = (unsigned long long)source[1];
    const unsigned long long words = nbytes / 16;
    const unsigned long long first = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const uint4* src = reinterpret_cast<const uint4*>(address);
    uint4* dst = reinterpret_cast<uint4*>(out);
    for (unsigned long long w = first; w < words; w += stride) {
        dst[w] = src[w];
    }
    const unsigned char* src_bytes = reinterpret_cast<const unsigned char*>(address);
    unsigned char* dst_bytes = reinterpret_cast<unsigned char*>(out);
    for (unsigned long long b = words * 16 + first; b < nbytes; b += stride) {
        dst_bytes[b] = src_bytes[b];
    }
"""
_COPY_THREADS = 256
_COPY_MAX_THREADS = 1 << 20  # enough loads in flight to fill the bus; the rest grid-strides
_COPY_KERNEL = "staging_copy"  # its name in the kernels' self-check (tqstore.metal.selfcheck)
_CHECK_BYTES = 1000  # the self-check copies this much of the caller's bytes (a tail included)
_copy_kernel = None


def mapped_address(runtime: _Cudart, host: np.ndarray) -> int | None:
    """The device address of host bytes in memory registered as mapped (the staging buffers),
    or None where the runtime has none for them."""
    address = ctypes.c_void_p()
    if runtime.lib.cudaHostGetDevicePointer(ctypes.byref(address),
                                            ctypes.c_void_p(host.ctypes.data), 0) != 0:
        runtime.lib.cudaGetLastError()  # a failed lookup must not surface in MLX later
        return None
    return address.value or None


def _run_copy_kernel(runtime: _Cudart, host: np.ndarray, dtype: mx.Dtype) -> mx.array | None:
    """host (inside the staging buffer) as a new device array, read by the copy kernel and
    waited for (the staging buffer may be lent again once this returns); None where mapping
    its address fails."""
    global _copy_kernel
    device_address = mapped_address(runtime, host)
    if device_address is None:
        return None
    if _copy_kernel is None:
        _copy_kernel = mx.fast.cuda_kernel(name="tq_copy_from_pinned", input_names=["source"],
                                           output_names=["out"], source=_COPY_SOURCE)
    words = max(1, host.nbytes // 16)
    threads = min(_COPY_MAX_THREADS, -(-words // _COPY_THREADS) * _COPY_THREADS)
    source = mx.array(np.array([device_address, host.nbytes], np.uint64))
    out, = _copy_kernel(inputs=[source], output_shapes=[host.shape], output_dtypes=[dtype],
                        grid=(threads, 1, 1), threadgroup=(_COPY_THREADS, 1, 1))
    mx.eval(out)
    return out


def _copy_from_staging(runtime: _Cudart, host: np.ndarray, dtype: mx.Dtype) -> mx.array | None:
    """host (inside the staging buffer, 16-byte aligned) as a new device array by the copy
    kernel; None if the kernel may not serve. The kernel goes through the kernels' shared
    self-check once per dtype (MLX compiles it per output dtype): a copy of the first
    _CHECK_BYTES of these very bytes must come back bit for bit, else it is disabled for the
    process with one warning, named in kernel_report() like the others."""
    from tqstore.metal import selfcheck

    def check() -> str | None:
        flat = host.reshape(-1)
        head = flat[:max(1, min(flat.size, _CHECK_BYTES // flat.itemsize))]
        got = _run_copy_kernel(runtime, head, dtype)
        if got is None:
            return None  # no mapped address here: nothing the kernel did wrong
        same = np.array(got).view(np.uint8).tobytes() == head.view(np.uint8).tobytes()
        return None if same else "the copied bytes differ from the host's"

    if not selfcheck.usable(_COPY_KERNEL, (str(dtype),), check):
        return None
    try:
        return _run_copy_kernel(runtime, host, dtype)
    except Exception as exc:  # noqa: BLE001  (a kernel that fails must not stop a hit)
        selfcheck.disable(_COPY_KERNEL, f"{type(exc).__name__}: {str(exc)[:300]}")
        return None


def warm_up(cap: int) -> None:
    """On CUDA with staging on (cap: ClientConfig.staging_cap), compile the staging copy kernel
    and run its self-check now (seconds with NVRTC) rather than inside the first hit's TTFT;
    this also pins the staging buffer's first granule (or the cap, if smaller). Nothing
    elsewhere, or with cap 0. MLX compiles a custom kernel once per output dtype (a uint8 warm-up left the first fp16
    hit compiling on the H100), so the warm-up copies fp16, what a restore copies."""
    if cap <= 0 or _cudart() is None:
        return
    probe = staging_empty([(37,)], np.float16, cap)[0]  # 74 bytes: a tail past whole words
    if not staging.holds(probe.ctypes.data, probe.nbytes):
        return  # held by a fetch already, or not pinnable: its first hit compiles
    probe[...] = np.arange(37, dtype=np.float16)
    host_to_device(probe)  # compiles the kernel and runs its self-check


staging = PinnedStaging()  # the process's one staging buffer


def staging_empty(shapes: list[tuple[int, ...]], dtype: np.dtype, cap: int) -> list[np.ndarray]:
    """C-contiguous arrays of these shapes for a fetch to fill before a restore:
    - on CUDA, uninitialized, in pinned staging memory when it is free and big enough (the
      fetch that fills them is then a hit's only host copy), else ordinary np.empty;
    - on unified memory (the CPU, Metal), arrays MLX owns (unified_empty): the fetch's read is
      then the restore's only copy, and host_to_device hands back MLX's arrays."""
    # The build, not the default device: that is one setting for the whole process, which
    # another thread may have switched for a moment (a self-check's CPU reference), and this
    # runs on the fetch's worker thread.
    if not gpu_build("cuda"):
        owned = unified_memory.unified_empty(shapes, dtype)
        if owned is not None:
            return owned
        return [np.empty(shape, dtype) for shape in shapes]
    dtype = np.dtype(dtype)
    sizes = [int(np.prod(shape)) * dtype.itemsize for shape in shapes]
    whole = staging.lease(sum(-(-size // _ALIGN) * _ALIGN for size in sizes), cap)
    if whole is None:
        return [np.empty(shape, dtype) for shape in shapes]
    out, at = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(whole[at:at + size].view(dtype).reshape(shape))
        at += -(-size // _ALIGN) * _ALIGN  # each array 256-byte aligned (the copy kernel's loads)
    return out
