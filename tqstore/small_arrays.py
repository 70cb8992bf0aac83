"""Small host-made arrays that GPU kernels read: keep them out of MLX's CUDA small pool.

MLX's CUDA allocator serves every buffer of 8 bytes or less from one managed-memory pool
advised read-mostly (mlx/backend/cuda/allocator.cpp, SmallSizePool). The GPU reads a
duplicate of that pool, and any CPU write into it, such as the scalar MLX makes for a kernel's
`init_value`, or any Python scalar in an op, drops the duplicate: the next GPU read of
any small array faults. Measured on an H100 (docs/fragments/kernels.md): the attention
kernel's first read of its 8-byte `params` and 4-byte `seq_lens` took ~10 us of every call,
0.5 us once they were 16-byte buffers.

So the decode path's small integer inputs (launch params, sequence lengths, the tail's [n,
n_old]) are made here: the values are padded to at least MIN_BYTES, and the caller gets a
prefix view of that buffer (a view, not a copy: no kernel, same buffer). Such a buffer is
ordinary managed memory: nothing but its own writes invalidates the GPU's access to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

MIN_BYTES = 16  # MLX's small pool takes <= 8 bytes; the next size class is 16


def padded_array(values: Sequence[int | float], dtype: mx.Dtype = mx.int32) -> mx.array:
    """A 1-D array of `values` whose buffer holds at least MIN_BYTES (never the small pool)."""
    n = len(values)
    if n == 0:
        return mx.array(np.zeros(0, dtype=_NUMPY[dtype]))  # no element for a kernel to read
    width = np.dtype(_NUMPY[dtype]).itemsize
    host = np.zeros(max(n, -(-MIN_BYTES // width)), dtype=_NUMPY[dtype])
    host[:n] = values
    full = mx.array(host)
    return full if full.shape[0] == n else full[:n]


def padded_rows(rows: Sequence[Sequence[int]], dtype: mx.Dtype = mx.int32) -> mx.array:
    """A 2-D (len(rows), len(rows[0])) array built like padded_array (rows of equal length)."""
    width = len(rows[0]) if rows else 0
    if width == 0 or any(len(r) != width for r in rows):
        raise ValueError("padded_rows needs equal, non-empty rows")
    flat = padded_array([v for r in rows for v in r], dtype)
    return flat.reshape(len(rows), width)


_NUMPY = {mx.int32: np.int32, mx.uint32: np.uint32, mx.float32: np.float32,
          mx.int64: np.int64, mx.float16: np.float16}
