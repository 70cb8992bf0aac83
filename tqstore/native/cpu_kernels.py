"""The CPU kernels (tq_attention.c, tq_quantize.c) as functions over MLX arrays.

Each call evaluates its inputs (a sync per layer: on the CPU it costs graph-building overlap
only; `tqstore bench decode`'s figures include it), reads
them in place through the buffer protocol (no copy), runs the C function and wraps the
result as a new MLX array. They return None where the C build does not take a shape or is
unavailable, and the caller (tqstore.metal.dispatch) runs the pure-MLX reference.

Work splitting: a decode call is cut into (sequence, kv head, split) units, with splits
chosen from the shapes only (never from the thread count), so the result's bits do not depend
on how many threads ran it.
"""

from __future__ import annotations

import ctypes
import math
import os

import mlx.core as mx
import numpy as np

from tqstore.codec.turboquant import QuantizedVectors, TurboQuantCodec
from tqstore.native.build import load

# Units a decode call aims for: enough to keep a few cores busy at batch 1 with few kv heads,
# few enough that each unit scores whole blocks.
TARGET_UNITS = 16
# Threads for calls that are not large (decode_threads): 1 unless TQSTORE_CPU_THREADS says more.
# On the 2-core VM, while building this (a ctypes timing loop, not a recorded benchmark), a
# second thread made a SmolLM2-shaped one-sequence call slower at every length (thread
# start-up ~0.1 ms per call, and the two vCPUs gave 1.4x at best on a pure compute loop). The
# result's bits never depend on it (see the module doc).
THREADS = max(1, int(os.environ.get("TQSTORE_CPU_THREADS", "1") or 1))
# A decode call over at least this many (row, kv head, token) triples runs on every core (at
# most 8): about 2 ms of one thread's work, where a thread's start-up is paid back. A batched
# step of 8 SmolLM2 rows over 2.2k tokens (53k) went from 245 to 182-206 ms with it and the
# register accumulation (tools/batch_step_bench.py, docs/BENCHMARKS.md); one row (6.6k) stays
# on one thread.
PARALLEL_TOKEN_HEADS = 32768


def decode_threads(token_heads: int) -> int:
    """Threads for a decode call over `token_heads` (row, kv head, token) triples:
    TQSTORE_CPU_THREADS if set, else every core (at most 8) for large calls, else 1."""
    if os.environ.get("TQSTORE_CPU_THREADS"):
        return THREADS
    return min(8, os.cpu_count() or 1) if token_heads >= PARALLEL_TOKEN_HEADS else 1


def _view(x: mx.array, dtype: type) -> np.ndarray:
    """A C-contiguous numpy view of an evaluated array (a copy only if it is strided)."""
    arr = np.asarray(memoryview(x))
    if arr.dtype.itemsize != np.dtype(dtype).itemsize:
        raise TypeError(f"array of {arr.dtype} read as {np.dtype(dtype)}")
    return np.ascontiguousarray(arr).view(dtype)


def _ptr(arr: np.ndarray) -> int:
    return arr.ctypes.data


def _layout(queries: mx.array, key_codes: mx.array, value_codes: mx.array,
            value_bits: int) -> tuple[int, int, int, int, int, int]:
    """(B, Hq, Dk, Hkv, block_size, Dv) of a decode call."""
    B, Hq, Dk = queries.shape
    _, Hkv, block_size, _ = key_codes.shape
    return B, Hq, Dk, Hkv, block_size, value_codes.shape[-1] * 8 // value_bits


def decode_splits(batch: int, kv_heads: int, num_blocks: int) -> int:
    """Splits per (sequence, kv head): a function of the shapes only."""
    return max(1, min(num_blocks, -(-TARGET_UNITS // max(1, batch * kv_heads))))


def decode_attention(queries: mx.array, key_codes: mx.array, key_scales: mx.array,
                     value_codes: mx.array, value_scales: mx.array, block_tables: mx.array,
                     seq_lens: mx.array, key_codebook: mx.array, value_codebook: mx.array,
                     key_bits: int, value_bits: int) -> tuple[mx.array, mx.array] | None:
    """tqstore.metal.reference.paged_decode_attention_reference on the C kernel: (out (B, Hq,
    Dv) float32, lse (B, Hq) float32), or None where the kernel does not run."""
    lib = load()
    if lib is None:
        return None
    B, Hq, Dk, Hkv, block_size, Dv = _layout(queries, key_codes, value_codes, value_bits)
    inputs = [queries.astype(mx.float32), key_codes, key_scales, value_codes, value_scales,
              block_tables.astype(mx.int32), seq_lens.astype(mx.int32),
              key_codebook.astype(mx.float32), value_codebook.astype(mx.float32)]
    mx.eval(inputs)
    kinds = [np.float32, np.uint8, np.uint16, np.uint8, np.uint16, np.int32, np.int32,
             np.float32, np.float32]
    views = [_view(x, kind) for x, kind in zip(inputs, kinds)]
    max_blocks = block_tables.shape[1]
    out = np.empty((B, Hq, Dv), dtype=np.float32)
    lse = np.empty((B, Hq), dtype=np.float32)
    rc = lib.tq_decode_attention(*[_ptr(v) for v in views], B, Hq, Hkv, Dk, Dv, block_size,
                                 max_blocks, key_bits, value_bits,
                                 decode_splits(B, Hkv, max_blocks),
                                 decode_threads(B * Hkv * max_blocks * block_size),
                                 _ptr(out), _ptr(lse))
    if rc != 0:
        return None
    return mx.array(out), mx.array(lse)


def decode_step(queries: mx.array, scale: float, query_rotation: mx.array, key_codes: mx.array,
                key_scales: mx.array, value_codes: mx.array, value_scales: mx.array,
                block_tables: mx.array, seq_lens: mx.array, key_codebook: mx.array,
                value_codebook: mx.array, tail_keys: mx.array | None,
                tail_values: mx.array | None, key_center: mx.array, output_rotation: mx.array,
                key_bits: int, value_bits: int) -> mx.array | None:
    """One layer's whole decode attention (tq_decode_step_rows): queries (B, Hq, Dk) unscaled and
    unrotated, the pages, the fp16 tail (B, Hkv, n, D) or None -> (B, Hq, Dv) float32. Row b
    is decode_step_rows' row of (block_tables[b], seq_lens[b], its tail)."""
    rows = [(block_tables[b:b + 1], seq_lens[b:b + 1],
             None if tail_keys is None else tail_keys[b:b + 1],
             None if tail_values is None else tail_values[b:b + 1])
            for b in range(queries.shape[0])]
    return decode_step_rows(queries, scale, query_rotation, key_codes, key_scales, value_codes,
                            value_scales, rows, key_codebook, value_codebook, key_center,
                            output_rotation, key_bits, value_bits)


def decode_step_rows(queries: mx.array, scale: float, query_rotation: mx.array,
                     key_codes: mx.array, key_scales: mx.array, value_codes: mx.array,
                     value_scales: mx.array, rows: list[tuple[mx.array, mx.array,
                                                               mx.array | None, mx.array | None]],
                     key_codebook: mx.array, value_codebook: mx.array, key_center: mx.array,
                     output_rotation: mx.array, key_bits: int, value_bits: int) -> mx.array | None:
    """A layer's decode step for B sequences in one call (tq_decode_step_rows): queries
    (B, Hq, Dk); rows[b] = (block table (1, n_b), seq_lens (1,), tail keys and values
    (1, Hkv, t_b, D) or None) of row b. Each row computes what it would alone, so its bits do not
    depend on the other rows."""
    lib = load()
    if lib is None:
        return None
    B, Hq, Dk, Hkv, block_size, Dv = _layout(queries, key_codes, value_codes, value_bits)
    shared = [queries.astype(mx.float32), query_rotation.astype(mx.float32), key_codes,
              key_scales, value_codes, value_scales, key_codebook.astype(mx.float32),
              value_codebook.astype(mx.float32), key_center.astype(mx.float32),
              output_rotation.astype(mx.float32)]
    per_row = [(table.astype(mx.int32), lens.astype(mx.int32),
                None if tk is None else tk.astype(mx.float16),
                None if tv is None else tv.astype(mx.float16)) for table, lens, tk, tv in rows]
    mx.eval(shared, [[a for a in row if a is not None] for row in per_row])
    kinds = [np.float32, np.float32, np.uint8, np.uint16, np.uint8, np.uint16, np.float32,
             np.float32, np.float32, np.float32]
    v = [_view(x, kind) for x, kind in zip(shared, kinds)]
    tables = [_view(t, np.int32) for t, _, _, _ in per_row]
    tails = [(None, None) if tk is None else (_view(tk, np.uint16), _view(tv, np.uint16))
             for _, _, tk, tv in per_row]  # kept alive until the call returns
    pointers = ctypes.c_void_p * B
    num_blocks = np.array([t.shape[-1] for t in tables], dtype=np.int32)
    lens = np.array([int(_view(n, np.int32)[0]) for _, n, _, _ in per_row], dtype=np.int32)
    tail_lens = np.array([0 if k is None else k.shape[2] for k, _ in tails], dtype=np.int32)
    splits = np.array([decode_splits(1, Hkv, int(n)) for n in num_blocks], dtype=np.int32)
    out = np.empty((B, Hq, Dv), dtype=np.float32)
    rc = lib.tq_decode_step_rows(
        _ptr(v[0]), ctypes.c_float(scale), _ptr(v[1]), *[_ptr(x) for x in v[2:6]],
        pointers(*[_ptr(t) for t in tables]), _ptr(num_blocks), _ptr(lens), _ptr(v[6]),
        _ptr(v[7]), pointers(*[None if k is None else _ptr(k) for k, _ in tails]),
        pointers(*[None if w is None else _ptr(w) for _, w in tails]), _ptr(tail_lens),
        _ptr(splits), _ptr(v[8]), _ptr(v[9]), B, Hq, Hkv, Dk, Dv, block_size, key_bits,
        value_bits, decode_threads(Hkv * int(lens.sum() + tail_lens.sum())), _ptr(out))
    return mx.array(out) if rc == 0 else None


def dequantize_rotated(codec: TurboQuantCodec, q: QuantizedVectors) -> mx.array | None:
    """codec.dequantize_rotated(q) for MSE codes, bit for bit (tq_dequantize_rows): float32
    (..., H, N, D); None where the kernel does not run (QJL codes, no build)."""
    lib = load()
    if lib is None or q.qjl_signs is not None:
        return None
    codes, scales = q.codes.astype(mx.uint8), q.scales.astype(mx.float16)
    book = codec.codebook.astype(mx.float32)
    mx.eval(codes, scales, book)
    rows, d = scales.size, codec.head_dim
    out = np.empty((rows, d), dtype=np.float32)
    if rows:
        # Held in names until the call returns: gathered pages are strided, so these are
        # contiguous copies, which a bare _ptr(_view(...)) argument would free before C reads.
        views = (_view(codes, np.uint8), _view(scales, np.uint16), _view(book, np.float32))
        rc = lib.tq_dequantize_rows(*[_ptr(v) for v in views], codec.bits, d, rows, _ptr(out))
        if rc != 0:
            return None
    return mx.array(out).reshape(*scales.shape, d)


def softmax_threads(elements: int) -> int:
    """Threads for a softmax call: TQSTORE_CPU_THREADS if set, else one per core (at most 8)
    for calls of a million elements or more, where a thread's start-up (~0.1 ms) is paid back.
    The result's bits never depend on it (one thread computes each row)."""
    if os.environ.get("TQSTORE_CPU_THREADS"):
        return THREADS
    return min(8, os.cpu_count() or 1) if elements >= 1 << 20 else 1


def softmax_rows(scores: mx.array, queries_per_row_block: int, causal: bool) -> mx.array | None:
    """Softmax over the last axis of float32 scores (..., T), in place on the evaluated buffer
    (tq_softmax_rows). Rows are (head, query) pairs with queries fastest, a step of L =
    queries_per_row_block queries ending at key T - 1: causal limits row r to keys
    [0, T - L + r % L]. Masked (-inf) entries and those past the limit become 0. None where
    the kernel does not run."""
    lib = load()
    if lib is None or scores.dtype != mx.float32:
        return None
    T = scores.shape[-1]
    rows = scores.size // T if T else 0
    mx.eval(scores)
    buffer = np.asarray(memoryview(scores))
    if not (buffer.flags.c_contiguous and buffer.flags.writeable):
        # Not the array's own dense buffer: work on a copy and wrap that.
        buffer = np.ascontiguousarray(buffer)
        scores = None
    rc = lib.tq_softmax_rows(_ptr(buffer), rows, queries_per_row_block, T, int(causal),
                             softmax_threads(rows * T))
    if rc != 0:
        return None
    # In place: the evaluated array now holds the weights (MLX never recomputes an evaluated
    # array, and nothing else refers to this fresh matmul output).
    return scores if scores is not None else mx.array(buffer)


# A quantize call of at least this many rows runs on several cores (at most 8, and at least
# 1,024 rows a thread: the C kernel's unit): ~1.1-1.3 ms of one thread's work on the 2-core VM,
# where a thread's start-up is paid back. A decode step's block write (256 tokens x a few
# heads) stays on one thread; a hit's restored prefix (quantized before its first token: 4k
# tokens of SmolLM2 are 60 calls of 11.5k rows, 0.56 s of a 0.74 s hit on one thread) and
# prefill chunks use every core.
PARALLEL_QUANTIZE_ROWS = 4096
QUANTIZE_UNIT_ROWS = 1024  # TQ_QUANTIZE_UNIT_ROWS in tq_quantize.c


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one: a container's
    CPU set, taskset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS has no affinity call
        return os.cpu_count() or 1


def quantize_threads(rows: int) -> int:
    """Threads for a quantize call over `rows` vectors: TQSTORE_CPU_THREADS if set, else every
    usable core (at most 8) for large calls, else 1; never more than one per 1,024 rows.
    Codes never depend on it."""
    units = max(1, -(-rows // QUANTIZE_UNIT_ROWS))
    if os.environ.get("TQSTORE_CPU_THREADS"):
        return min(THREADS, units)
    return min(8, usable_cores(), units) if rows >= PARALLEL_QUANTIZE_ROWS else 1


def quantize_fits(codec: TurboQuantCodec) -> bool:
    d = codec.head_dim
    return codec.qjl_rotation is None and codec.rotation.m == 1 and d & (d - 1) == 0 and d <= 256


def quantize(codec: TurboQuantCodec, x: mx.array) -> QuantizedVectors | None:
    """codec.quantize(x), byte for byte, on the C kernel; None where it does not run."""
    lib = load()
    if lib is None or not quantize_fits(codec):
        return None
    # fp16 input is read as it is (the widening is exact); anything else, and any centered
    # codec, goes through the codec's own float32 conversion and subtraction.
    half = x.dtype == mx.float16 and codec.center is None
    xf = x if half else codec.centered(x)
    codec.check_input(xf)
    lead = xf.shape[:-1]
    tokens, heads, d = xf.shape[-2], xf.shape[-3], codec.head_dim
    rows = xf.size // d
    signs = codec.rotation.signs.reshape(heads, d)
    mx.eval(xf, signs, codec.codebook, codec.midpoints)
    codes = np.empty((rows, codec.code_bytes), dtype=np.uint8)
    scales = np.empty((rows,), dtype=np.uint16)
    if rows:
        x_np, signs_np = _view(xf, np.uint16 if half else np.float32), _view(signs, np.float32)
        book, mids = _view(codec.codebook, np.float32), _view(codec.midpoints, np.float32)
        # The rotation's 1/sqrt(p) rounded to float32 as the codec's scalar is (one rounding
        # of the double, as mx.array(..., float32) does).
        rot_norm = float(np.float32(1.0 / math.sqrt(codec.rotation.p)))
        rc = lib.tq_quantize(_ptr(x_np), int(half), rows, tokens, heads, d, codec.bits,
                             int(codec.norm_correction), _ptr(signs_np), _ptr(book), _ptr(mids),
                             ctypes.c_float(rot_norm), _ptr(codes), _ptr(scales),
                             quantize_threads(rows))
        if rc != 0:
            return None
    return QuantizedVectors(mx.array(codes).reshape(*lead, codec.code_bytes),
                            mx.array(scales.view(np.float16)).reshape(lead))
