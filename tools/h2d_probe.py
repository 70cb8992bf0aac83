"""How fast host bytes reach MLX's CUDA device: the restore step of a hit (issue 16).

MLX's CUDA backend allocates every buffer as managed memory (cudaMallocManaged). An array made
from host bytes is written by the CPU, so its pages sit in host memory and the GPU's first read
migrates them by page faults. This measures, for a buffer of --mib MiB:
- copy: mx.array(numpy) (a host memcpy into a managed buffer);
- fault: the device's first read of it (a sum), pages migrating on demand;
- prefetch: the same after cudaMemPrefetchAsync of the buffer to the device (libcudart through
  ctypes), then the first read;
- device copy: tqstore.device_memory.host_to_device (cudaMemcpy into a buffer made on the
  device), then the first read;
- resident: a second read (pages already on the device), the floor.

    python3 tools/h2d_probe.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tqstore  # noqa: E402,F401  (OpenBLAS before MLX, as in every entry point)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    args = ap.parse_args()

    import mlx.core as mx
    import numpy as np

    from tqstore.device_memory import host_to_device, prefetch_to_device

    n = args.mib << 19  # float16 elements
    host = np.random.default_rng(0).standard_normal(n).astype(np.float16)
    gb = host.nbytes / 1e9

    def first_read(prefetch: bool) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        arr = mx.array(host)
        mx.eval(arr)
        t1 = time.perf_counter()
        moved = prefetch_to_device([arr]) if prefetch else 0
        t2 = time.perf_counter()
        mx.eval(mx.sum(arr.astype(mx.float32)))
        t3 = time.perf_counter()
        mx.eval(mx.sum(arr.astype(mx.float32)))
        t4 = time.perf_counter()
        if prefetch and not moved:
            print("prefetch: not available on this backend")
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3

    from concurrent.futures import ThreadPoolExecutor

    from tqstore.device_memory import _cudart

    runtime = _cudart()

    def threaded(threads: int) -> None:
        """cudaMemcpyAsync of 1/threads of the buffer per thread, each on its own stream."""
        out = mx.zeros(host.shape, dtype=mx.float16)
        mx.eval(out)
        dst = np.array(out, copy=False).__array_interface__["data"][0]
        step = -(-host.nbytes // threads)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            codes = list(pool.map(lambda i: runtime.copy_on_thread_stream(
                dst + i * step, host.ctypes.data + i * step,
                max(0, min(step, host.nbytes - i * step))), range(threads)))
        t1 = time.perf_counter()
        same = bool(mx.array_equal(out, mx.array(host)).item())
        print(f"{threads} threads, own streams: {gb / (t1 - t0):6.2f} GB/s (status {set(codes)}, "
              f"equal {same})")

    def registered() -> None:
        out = mx.zeros(host.shape, dtype=mx.float16)
        mx.eval(out)
        dst = np.array(out, copy=False).__array_interface__["data"][0]
        t0 = time.perf_counter()
        status = runtime.lib.cudaHostRegister(host.ctypes.data, host.nbytes, 0)
        t1 = time.perf_counter()
        runtime.copy(dst, host.ctypes.data, host.nbytes)
        t2 = time.perf_counter()
        runtime.lib.cudaHostUnregister(host.ctypes.data)
        print(f"registered (status {status}): register {gb / (t1 - t0):6.2f} GB/s, copy "
              f"{gb / (t2 - t1):6.2f} GB/s")

    if runtime is not None:
        for threads in (1, 4, 8, 16):
            threaded(threads)
        registered()
        registered()
    first_read(False)  # warm-up: kernels, pools
    for prefetch in (False, True, False, True):
        copy, pre, read, again = first_read(prefetch)
        t0 = time.perf_counter()
        arr = host_to_device(host)
        t1 = time.perf_counter()
        mx.eval(mx.sum(arr.astype(mx.float32)))
        t2 = time.perf_counter()
        del arr
        print(f"device copy: {gb / (t1 - t0):6.2f} GB/s, first read {gb / (t2 - t1):6.2f} GB/s, "
              f"together {gb / (t2 - t0):6.2f} GB/s")
        print(f"{'prefetch' if prefetch else 'fault   '}: copy {gb / copy:6.2f} GB/s, "
              f"prefetch {gb / pre if pre > 1e-6 else 0:6.2f} GB/s, first read "
              f"{gb / read:6.2f} GB/s, copy+prefetch+read {gb / (copy + pre + read):6.2f} GB/s, "
              f"resident read {gb / again:6.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
