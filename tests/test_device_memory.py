"""Host bytes onto the device (tqstore.device_memory) and the store block chosen per backend."""

import gc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import tqstore  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx

from tqstore import device_memory, generator, pinned_staging, unified_memory
from tqstore.metal import selfcheck
from tqstore.device_memory import host_to_device, prefetch_to_device, staging_empty
from tqstore.pinned_staging import PinnedStaging


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint8])
def test_host_to_device_gives_the_host_bytes_in_a_fresh_array(rng, dtype):
    """On CUDA through cudaMemcpy into a device-made buffer, elsewhere mx.array: the same
    array either way, bit for bit, and a later change to the host buffer does not reach it."""
    host = (rng.standard_normal((3, 5, 7, 16)) * 50).astype(dtype)
    out = host_to_device(host)
    assert out.dtype == mx.array(host[:0]).dtype and out.shape == host.shape
    assert np.array_equal(np.array(out).view(np.uint8), host.view(np.uint8))
    kept = host.copy()
    host[...] = 0
    assert np.array_equal(np.array(out), kept)
    strided = host_to_device(kept[:, ::2])  # a strided view is copied contiguous first
    assert np.array_equal(np.array(strided), kept[:, ::2])
    assert prefetch_to_device([out]) in (0, out.nbytes)  # a hint: nothing or all of it


def test_store_block_defaults_to_256_and_grows_on_cuda_while_a_block_fits_a_put(monkeypatch):
    def layout(layers, heads, dim):
        return {"num_layers": layers, "num_kv_heads": heads, "key_head_dim": dim,
                "value_head_dim": dim}

    llama8b, llama70b, smollm2 = layout(32, 8, 128), layout(80, 8, 128), layout(30, 3, 64)
    for backend in (None, "metal"):
        monkeypatch.setattr(generator, "gpu_backend", lambda b=backend: b)
        assert generator.default_store_block(llama8b) == generator.DEFAULT_STORE_BLOCK == 256
    monkeypatch.setattr(generator, "gpu_backend", lambda: "cuda")
    assert generator.default_store_block(smollm2) == 2048
    assert generator.default_store_block(llama8b) == 2048  # 131 KB per token: 256 MiB exactly
    assert generator.default_store_block(llama70b) == 512  # 328 KB per token
    # A block of 512 would pass 256 MiB too (a 13B model with 40 KV heads): the usual 256.
    assert generator.default_store_block(layout(40, 40, 128)) == 256


class _HostMemory:
    """Ordinary memory standing in for cudaHostAlloc, so the staging buffer's lending rules are
    tested on every machine (the GPU suite runs the real allocator: test_staging_on_cuda...)."""

    def __init__(self) -> None:
        self.live: dict[int, np.ndarray] = {}
        self.freed: list[int] = []

    def allocate(self, size: int) -> int:
        buf = np.zeros(size, np.uint8)
        self.live[buf.ctypes.data] = buf
        return buf.ctypes.data

    def free(self, address: int) -> None:
        self.freed.append(address)
        del self.live[address]


def test_the_staging_buffer_is_lent_to_one_holder_until_its_last_view_is_gone():
    memory = _HostMemory()
    staging = PinnedStaging(memory.allocate, memory.free)
    cap = 4 * PinnedStaging.GRANULE
    first = staging.lease(1000, cap)
    assert first is not None and first.nbytes == 1000 and staging.size == PinnedStaging.GRANULE
    address = first.ctypes.data
    assert staging.holds(address, 1000) and not staging.holds(address - 1, 10)
    assert staging.lease(10, cap) is None  # held: the caller takes ordinary memory
    keys = first[:512].view(np.float16).reshape(4, 64)[:, 3:]  # a view of a view
    del first
    gc.collect()
    assert staging.lease(10, cap) is None  # a view still reads the bytes: still held
    del keys
    gc.collect()
    again = staging.lease(2000, cap)
    assert again is not None and again.ctypes.data == address and memory.freed == []  # reused
    del again
    gc.collect()
    bigger = staging.lease(PinnedStaging.GRANULE + 1, cap)  # grows: the old buffer is freed
    assert bigger is not None and memory.freed == [address] and staging.size == 2 * PinnedStaging.GRANULE
    del bigger
    gc.collect()
    assert staging.lease(cap + 1, cap) is None and staging.lease(0, cap) is None
    assert len(memory.live) == 1  # never more than one buffer
    held = staging.lease(10, cap)
    assert not staging.close() and len(memory.live) == 1  # a holder's bytes are never freed
    del held
    gc.collect()
    assert staging.close() and memory.live == {} and staging.size == 0


def test_staging_arrays_are_c_contiguous_and_separate(monkeypatch):
    monkeypatch.setattr(device_memory, "gpu_build", lambda name: name == "cuda")  # CUDA's branch
    memory = _HostMemory()
    monkeypatch.setattr(device_memory, "staging", PinnedStaging(memory.allocate, memory.free))
    keys, values = staging_empty([(2, 3, 5, 7), (2, 3, 5, 7)], np.float16, 1 << 30)
    assert keys.flags.c_contiguous and values.flags.c_contiguous and keys.dtype == np.float16
    assert values.ctypes.data - keys.ctypes.data == 512  # 420 bytes, rounded to 256s
    keys[...] = 1
    values[...] = 2
    assert (keys == 1).all() and (values == 2).all()  # they do not overlap
    assert device_memory.staging.holds(keys.ctypes.data, keys.nbytes + values.nbytes)
    # Held by these two: the next prefix gets ordinary memory, still right.
    other, = staging_empty([(4, 4)], np.float16, 1 << 30)
    assert not device_memory.staging.holds(other.ctypes.data, other.nbytes)
    # Off (cap 0) or over the cap: ordinary memory.
    del keys, values
    gc.collect()
    plain, = staging_empty([(4, 4)], np.float16, 0)
    assert not device_memory.staging.holds(plain.ctypes.data, plain.nbytes)


def test_staging_on_cuda_is_pinned_and_copies_to_the_device_exactly(rng):
    """The real allocator and the copy kernel where there is CUDA (the GPU suite); ordinary
    memory and mx.array elsewhere. Sizes that are no multiple of the kernel's 16-byte words
    test its tail."""
    on_cuda = device_memory._cudart() is not None
    for shape in ((2, 4, 300, 64), (3, 7, 5)):
        host = (rng.standard_normal(shape) * 10).astype(np.float16)
        keys, values = staging_empty([host.shape, host.shape], np.float16, 1 << 30)
        keys[...] = host
        values[...] = -host
        assert device_memory.staging.holds(keys.ctypes.data, keys.nbytes) == on_cuda
        assert not on_cuda or values.ctypes.data % 256 == 0  # aligned after K, whatever its size
        times: dict[str, float] = {}
        assert np.array_equal(np.array(host_to_device(keys, times)), host)
        assert np.array_equal(np.array(host_to_device(values, times)), -host)
        assert times.get("staged", 0) == (2 if on_cuda else 0)  # the kernel served, no fallback
        assert times.get("in_place", 0) == (0 if on_cuda else 2)  # MLX's own arrays elsewhere
        del keys, values
        gc.collect()
    odd, = staging_empty([(1001,)], np.uint8, 1 << 30)
    odd[...] = rng.integers(0, 256, 1001, dtype=np.uint8)
    assert np.array_equal(np.array(host_to_device(odd)), odd)


def test_warm_up_compiles_the_copy_kernel_where_there_is_cuda(monkeypatch):
    memory = _HostMemory()
    monkeypatch.setattr(device_memory, "staging", PinnedStaging(memory.allocate, memory.free))
    device_memory.warm_up(0)  # staging off: nothing pinned, nothing compiled for it
    assert device_memory.staging.size == 0 and memory.live == {}
    monkeypatch.setattr(device_memory, "staging", PinnedStaging())
    device_memory.warm_up(1 << 30)
    on_cuda = device_memory._cudart() is not None
    assert (device_memory._copy_kernel is not None) == on_cuda
    verdict = selfcheck.kernel_report().get("staging_copy", "")
    assert not verdict.startswith("disabled") and verdict.startswith("ok") == on_cuda
    assert (device_memory.staging.size >= PinnedStaging.GRANULE) == on_cuda
    pinned = dict(pinned_staging._pinned)
    assert device_memory.staging.close() and device_memory.staging.size == 0
    # unregistered and gone (a buffer dropped still registered broke MLX's managed memory)
    assert len(pinned_staging._pinned) == len(pinned) - on_cuda


def test_a_copy_kernel_that_gives_other_bytes_is_disabled_by_its_self_check(monkeypatch):
    """The copy kernel goes through the kernels' shared self-check: planted wrong, it is refused
    (the caller then copies by cudaMemcpy) and reported; right, it serves. Runs everywhere: the
    kernel's launch is what is planted."""
    host = (np.arange(700) % 97).astype(np.float16)  # 1,400 bytes: the check copies 1,000
    try:
        selfcheck.reset()
        monkeypatch.setattr(device_memory, "_run_copy_kernel",
                            lambda runtime, h, dtype: mx.array(h) + 1)
        assert device_memory._copy_from_staging(None, host, mx.float16) is None
        assert selfcheck.kernel_report()["staging_copy"].startswith("disabled")
        selfcheck.reset()
        monkeypatch.setattr(device_memory, "_run_copy_kernel",
                            lambda runtime, h, dtype: mx.array(h))
        got = device_memory._copy_from_staging(None, host, mx.float16)
        assert got is not None and np.array_equal(np.array(got), host)
        assert selfcheck.kernel_report()["staging_copy"].startswith("ok")
    finally:
        selfcheck.reset()  # every kernel is checked again at its next use


def test_the_staging_buffer_grows_by_doubling_and_survives_a_failed_growth():
    memory = _HostMemory()
    calls: list[int] = []

    def allocate(size: int) -> int:
        calls.append(size)
        return 0 if size > 3 * PinnedStaging.GRANULE else memory.allocate(size)

    staging = PinnedStaging(allocate, memory.free)
    granule, cap = PinnedStaging.GRANULE, 64 * PinnedStaging.GRANULE
    assert staging.lease(1000, cap) is not None and staging.size == granule
    gc.collect()
    assert staging.lease(granule + 1, cap) is not None and staging.size == 2 * granule
    gc.collect()
    address = next(iter(memory.live))
    # 3 granules are needed, 4 (double) asked for: refused; the old buffer stays and serves.
    assert staging.lease(2 * granule + 1, cap) is None and calls[-1] == 4 * granule
    assert staging.size == 2 * granule and list(memory.live) == [address]
    assert staging.lease(2 * granule + 1, cap) is None and len(calls) == 3  # not retried
    small = staging.lease(100, cap)
    assert small is not None and small.ctypes.data == address
    del small
    gc.collect()
    # Another fetch holding the lock (growing the buffer): no waiting, ordinary memory.
    with staging._lock:
        assert staging.lease(100, cap) is None


def test_on_unified_memory_a_fetch_reads_into_mlx_arrays_that_a_restore_takes_without_a_copy(
        rng, monkeypatch):
    """Off CUDA staging_empty gives numpy views of arrays MLX allocated, and host_to_device
    hands back MLX arrays of that very memory (the leading slice a shorter hit covers): the
    fetch's read is the restore's only copy. Anything else, including views at an offset or strided, is
    copied as before."""
    for module in (device_memory, unified_memory):  # a CPU-only build
        monkeypatch.setattr(module, "gpu_build", lambda name: False)
    shape = (3, 2, 40, 16)
    keys, values = staging_empty([shape, shape], np.float16, 1 << 30)
    host = (rng.standard_normal(shape) * 10).astype(np.float16)
    keys[...] = host  # what the fetch's reads do
    values[...] = -host
    times: dict[str, float] = {}
    out_k, out_v = host_to_device(keys, times), host_to_device(values, times)
    assert times["in_place"] == 2 and times["copy"] == 0.0
    assert staging_empty([(3,)], np.float64, 1 << 30)[0].dtype == np.float64  # as asked
    # The same memory, not a copy of it.
    assert np.array(out_k, copy=False).ctypes.data == keys.ctypes.data
    assert np.array_equal(np.array(out_k), host) and np.array_equal(np.array(out_v), -host)
    # An in-place update of the result is MLX's own business: the fetched bytes stay as read
    # (the result is a handle of its own, so MLX cannot reuse the buffer the views see).
    out_k[0] = 7
    mx.eval(out_k)
    assert np.array_equal(keys, host) and float(out_k[0, 0, 0, 0]) == 7
    # A shorter hit (PrefixKV.head: fewer tokens) is the leading slice of the same array,
    # evaluated where it was asked for: here on a worker thread, then used on this one.
    with ThreadPoolExecutor(1) as worker:
        short = worker.submit(host_to_device, values[:, :, :25]).result()
    assert short.shape == (3, 2, 25, 16) and np.array_equal(np.array(short), -host[:, :, :25])
    # Not at the start, strided, along another axis, or another dtype of the same bytes.
    for other in (keys[:, :, 5:], keys[:, :, ::2], keys[1:], keys.view(np.int16)):
        assert unified_memory.mlx_owner(other) is None
        times = {}
        copied = host_to_device(other, times)
        assert "in_place" not in times and np.array_equal(np.array(copied), other)
    # MLX evaluates the allocation on whichever thread fetches (the serving engine's worker).
    with ThreadPoolExecutor(1) as worker:
        far, = worker.submit(staging_empty, [(4, 8)], np.float16, 1 << 30).result()
    far[...] = 3
    assert unified_memory.mlx_owner(far) is not None
    assert np.array_equal(np.array(host_to_device(far) + 1), np.full((4, 8), 4, np.float16))
