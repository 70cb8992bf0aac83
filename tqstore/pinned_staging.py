"""The pinned host buffer a CUDA client lends to hits and uploads (PinnedStaging), and the
registered memory behind it.

Owned here: the lending rules (one holder at a time, released when the holder's last view is
collected), growth up to a cap, and the registered buffers themselves. tqstore.device_memory
owns the CUDA runtime this registers through and the copies that read the buffer;
tqstore.upload_landing has a second PinnedStaging of its own for uploads.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

log = logging.getLogger("tqstore.pinned_staging")

ALIGN = 256  # buffers and the arrays carved from them start on 256-byte boundaries
_REGISTER_PORTABLE_MAPPED = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped


class PinnedStaging:
    """One page-locked host buffer, kept and reused, that a CUDA client reads fetched prefixes
    into (PrefixKV's K and V), so a hit's bytes go from the page cache to the device with no
    page faults and no pinning on the way.

    Why: a read into fresh pageable memory faults every page in (a raw read of the payload
    files ran at 3.2-3.5 GB/s into fresh memory against 5.6-6.1 into a reused buffer on the
    H100 host), and host_to_device then pins those pages (cudaHostRegister, ~40 GB/s) before the
    copy engine reads them (~50 GB/s). Pinned once, both costs are gone from every later hit.

    Invariants: one holder at a time, and nobody releases by hand. A lease is a ctypes array
    over the buffer; numpy arrays made from it (and every view of those) keep it alive, since
    numpy's base chain stops at a non-array exporter. The buffer is free again exactly when the
    last of them is collected, so bytes a caller still holds are never read into again. A
    request that finds the buffer held, or is larger than the cap, gets None (the caller uses
    ordinary memory: slower, never wrong). It grows by doubling (at least to the prefix asked
    for) up to the cap; pinned memory cannot be swapped out, hence the cap.
    """

    GRANULE = 256 << 20  # the smallest buffer; growth at least doubles it (up to the cap)

    def __init__(self, allocate: Callable[[int], int] | None = None,
                 free: Callable[[int], None] | None = None) -> None:
        """allocate(size) -> address (0: failed) and free(address); default: registered
        host memory (_cuda_host_allocator), and no staging at all off CUDA."""
        self._allocate, self._free = allocate, free
        self._lock = threading.Lock()
        self._span = (0, 0)  # (address, size): replaced whole, so holds() needs no lock
        self._failed = 1 << 62  # the smallest size that could not be pinned: not retried
        self._holder: weakref.ref | None = None

    def lease(self, nbytes: int, cap: int) -> np.ndarray | None:
        """nbytes of pinned memory as a uint8 array, or None (not CUDA, held or being grown
        by another fetch, over cap, or the memory could not be pinned). Never waits for
        another fetch: a second one at the same time gets None (ordinary memory)."""
        if nbytes <= 0 or nbytes > cap or nbytes >= self._failed:
            return None
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self._allocate is None:
                from tqstore.device_memory import _cudart  # it imports this module
                runtime = _cudart()
                if runtime is None:
                    return None
                self._allocate, self._free = _cuda_host_allocator(runtime)
            if self._holder is not None and self._holder() is not None:
                return None
            pointer, size = self._span
            if nbytes > size:
                grown = min(cap, max(-(-nbytes // self.GRANULE) * self.GRANULE, 2 * size))
                new = self._allocate(grown)
                if not new:  # the old buffer stays; this size is not tried again
                    self._failed = nbytes
                    log.warning("could not pin %d bytes of staging (fetched prefixes or uploads "
                                "landing): %d bytes or more go through pageable memory", grown,
                                nbytes)
                    return None
                self._span = (new, grown)
                if pointer:
                    self._free(pointer)
                pointer = new
            lease = (ctypes.c_char * nbytes).from_address(pointer)
            self._holder = weakref.ref(lease)
            return np.frombuffer(lease, np.uint8)
        finally:
            self._lock.release()

    def close(self) -> bool:
        """Free the buffer now if nobody holds it (True); a held one stays (False)."""
        with self._lock:
            if self._holder is not None and self._holder() is not None:
                return False
            pointer, _ = self._span
            if pointer:
                self._free(pointer)
            self._span = (0, 0)
            return True

    @property
    def size(self) -> int:
        """Bytes pinned now (0: none yet)."""
        return self._span[1]

    def holds(self, pointer: int, nbytes: int) -> bool:
        """True when [pointer, pointer + nbytes) lies in the pinned buffer."""
        start, size = self._span
        return bool(start) and start <= pointer and pointer + nbytes <= start + size


_pinned: dict[int, np.ndarray] = {}  # registered buffers by address until free() (never GC'd)


def _cuda_host_allocator(runtime) -> tuple[Callable[[int], int], Callable[[int], None]]:
    """Pinned, mapped host memory: ordinary pages, faulted in on several threads, then
    registered. Why not cudaHostAlloc: it zeroes and pins on one thread, ~2 GB/s on the H100
    host (a 4.3 GB buffer cost the first 32k-token hit 2.5 s); touching pages runs in parallel
    and registering already-resident pages ran at 38-40 GB/s (tools/h2d_probe.py). Buffers are
    kept in the module's _pinned, not this closure: one must never return to the heap still
    registered (a dropped PinnedStaging did, and every later cudaMallocManaged of MLX's on the
    H100 failed: 'invalid argument'); one never freed stays pinned for the process instead."""
    owned = _pinned

    def allocate(size: int) -> int:
        try:
            raw = np.empty(size + ALIGN, np.uint8)
            start = -raw.ctypes.data % ALIGN
            buffer = raw[start:start + size]
            step = 64 << 20
            threads = min(16, os.cpu_count() or 1)
            with ThreadPoolExecutor(threads, thread_name_prefix="tqstore-pin") as pool:
                list(pool.map(lambda at: buffer[at:at + step].fill(0), range(0, size, step)))
        except MemoryError:
            return 0
        # Portable (every device) and mapped (a kernel reads it at its device address).
        if runtime.lib.cudaHostRegister(buffer.ctypes.data, size, _REGISTER_PORTABLE_MAPPED) != 0:
            runtime.lib.cudaGetLastError()  # a failed registration must not surface in MLX later
            return 0
        owned[buffer.ctypes.data] = raw
        return buffer.ctypes.data

    def free(pointer: int) -> None:
        if runtime.lib.cudaHostUnregister(pointer) != 0:
            runtime.lib.cudaGetLastError()  # must not surface in MLX later
            return  # still registered (or unknown): kept, never back to the heap
        owned.pop(pointer, None)

    return allocate, free
