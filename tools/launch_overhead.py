#!/usr/bin/env python3
"""What one op costs MLX's GPU backend when the work itself is negligible: wall time per op of
chains of N dependent ops on a small array, evaluated once. Rows: a builtin elementwise op, a
trivial custom kernel, the same with init_value (MLX fills the output first), and tqstore's
decode epilogue kernel at the Llama-3-8B shape. Tells launch-bound decode steps apart from
GPU-bound ones (tools/profile_decode.py shows the GPU side).

    PYTHONUNBUFFERED=1 python3 tools/launch_overhead.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402


def per_op_us(step, x0, n: int = 512, reps: int = 7) -> float:
    samples = []
    for r in range(reps + 2):
        t0 = time.perf_counter()
        x = x0
        for _ in range(n):
            x = step(x)
        t1 = time.perf_counter()
        mx.eval(x)
        t2 = time.perf_counter()
        if r >= 2:
            samples.append((t2 - t0) / n * 1e6)
    return statistics.median(samples)


def main() -> int:
    from tqstore.metal.attention_kernel import gpu_backend
    from tqstore.metal.epilogue import kernel_decode_epilogue
    from tqstore.small_arrays import padded_array

    backend = gpu_backend()
    if backend is None:
        print("no GPU backend", file=sys.stderr)
        return 2
    builder = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    tid = "threadIdx.x + blockIdx.x * blockDim.x" if backend == "cuda" else "thread_position_in_grid.x"
    copy = builder(name="tq_overhead_copy", input_names=["x"], output_names=["y"],
                   source=f"const int i = {tid}; if (i < 4096) y[i] = x[i] + 1.0f;")
    x0 = mx.zeros((4096,), dtype=mx.float32)
    mx.eval(x0)
    launch = dict(grid=(4096, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(4096,)],
                  output_dtypes=[mx.float32])
    rows = {
        "builtin add": per_op_us(lambda x: x + 1.0, x0),
        "custom kernel": per_op_us(lambda x: copy(inputs=[x], **launch)[0], x0),
        "custom kernel + init_value": per_op_us(
            lambda x: copy(inputs=[x], init_value=0.0, **launch)[0], x0),
    }
    hq, hkv, d = 32, 8, 128
    rot = mx.random.normal((hkv, d, d))
    tail_k = mx.random.normal((1, hkv, 5, d)).astype(mx.float16)
    info = padded_array([5, 5])  # as the cache makes it (tqstore.small_arrays)
    center = mx.random.normal((hkv, d))  # real buffers: a broadcast mx.zeros would be copied
    lse = mx.random.normal((1, hq))
    q = mx.random.normal((1, hq, d))
    mx.eval(rot, tail_k, info, center, lse, q)

    def epilogue(x):
        out = kernel_decode_epilogue(backend, x.reshape(1, hq, d), lse, q, tail_k, tail_k, None,
                                     None, info, center, rot, 16, mx.float32)[0]
        return out.reshape(-1)

    rows["tqstore decode epilogue"] = per_op_us(epilogue, mx.zeros((hq * d,)))
    print(f"mlx {mx.__version__} {mx.default_device()}: wall us per op, 512 dependent ops per eval")
    for name, us in rows.items():
        print(f"  {name:30s} {us:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
