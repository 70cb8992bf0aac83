"""The kernels of a batched decode step over shared tails (tqstore.paged.shared_tail): the step's
attention in three launches per layer, whatever the batch size, and no other op.

Why: on an H100 a decode step of Llama-3-8B shape is bound by the host, not the GPU. The trace
of B=8 at 8k and 32k (tools/batch_decode_gpu.py --diagnose, docs/BENCHMARKS.md) showed the GPU
busy 8-11 ms of a 32-37 ms step, and wall time following the number of ops MLX evaluates (each
costs host time to build and to launch, a view or a cast as much as a kernel). Around the
attention kernel the step had about a dozen small ops per layer: the tokens' cast to fp16, the
queries' cast, scale, rotation matmul and reshapes, the slices that cut the attention kernel's
work buffer into output and log-sum-exp, the output's reshape. Here they are folded into:

1. ``kernel_rotate_queries``: queries (B, Hq, 1, Dk) in the model's dtype -> q~ = (scale * q)
   rotated per kv head, (B, Hq, Dk) float32 (the attention kernel's input).
2. the attention kernel over the pages (tqstore.metal.attention_kernel), whose output may stay
   packed: its split launch's work buffer holds the output's B rows, then the log-sum-exp.
3. ``kernel_batched_epilogue``, the per-row form of tqstore.metal.epilogue. Inputs:
     pages_out    float32 (B, HQ, DV), or the packed work buffer (pages_lse is then the same)
     pages_lse    float32 (B, HQ) (natural log; -inf: no page token)
     queries      (B, HQ, 1, DK) the model's dtype, unscaled, unrotated
     scale        float32 (>= 1,) the attention scale (scale * q is computed in float32)
     tail_keys    float16 (B, HKV, block_size, DK): row b valid in [0, n_old_b)
     tail_values  float16 (B, HKV, block_size, DV)
     new_keys     (B, HKV, 1, DK) the model's dtype: this step's token, converted to fp16 as
                  MLX's astype does (round to nearest even), then appended
     new_values   (B, HKV, 1, DV)
     tail_info    int32 (B, 2) = [n_b, n_old_b], n_b == n_old_b + 1 <= block_size
     key_center   float32 (HKV, DK), output_rotation float32 (HKV, DV, DV)
   Outputs: out (B, HQ, 1, DV) in the queries' dtype; the next tails (B, HKV, block_size, D)
   fp16: row b's n_b tokens, then zeros (every byte written: the same input gives the same
   bytes out). The math per row is the one-length epilogue's.

The pure-MLX references (tqstore.metal.reference.batched_epilogue_reference and
rotate_queries_reference) are the contract and the fallback; each kernel passes a self-check
against them at first use (tqstore.metal.dispatch).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import mlx.core as mx

from tqstore.metal.dialect import activations_header, body_prologue
from tqstore.metal.epilogue import (DIMS_PER_GROUP, EPILOGUE_OUTPUTS, THREADS, out_dtype_name,
                                    epilogue_body, epilogue_header,
                                    epilogue_unsupported_reason)
from tqstore.small_arrays import padded_array

ROW_INPUTS = ("pages_out", "pages_lse", "queries", "scale", "tail_keys", "tail_values",
              "new_keys", "new_values", "tail_info", "key_center", "output_rotation")
ROTATE_INPUTS = ("queries", "rotation", "scale")
MAX_ROTATE_DIM = 1024  # one thread per output dimension of a head


@lru_cache(maxsize=64)
def scale_array(scale: float) -> mx.array:
    """The attention scale as the kernels read it: float32, out of MLX's small pool."""
    return padded_array([scale], mx.float32)


@lru_cache(maxsize=32)
def row_epilogue_kernel(backend: str, key_dim: int, value_dim: int, num_q_heads: int,
                        num_kv_heads: int, block_size: int, out_dtype: str, packed: bool):
    builder = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    return builder(
        name=(f"tq_decode_epilogue_rows{'_packed' if packed else ''}_k{key_dim}_v{value_dim}"
              f"_h{num_q_heads}x{num_kv_heads}_bs{block_size}_{out_dtype}"),
        input_names=list(ROW_INPUTS), output_names=list(EPILOGUE_OUTPUTS),
        source=epilogue_body(backend, key_dim, value_dim, num_q_heads, num_kv_heads, block_size,
                             per_row=True, packed=packed),
        header=epilogue_header(backend, out_dtype, activations=True), ensure_row_contiguous=True)


def row_epilogue_launch(backend: str, queries_shape: tuple, dtype: mx.Dtype,
                        tail_shape: tuple, rotation_shape: tuple, block_size: int, packed: bool
                        ) -> "KernelLaunch | None":
    """Launch 3 of the module doc resolved for these shapes (queries (B, Hq, 1, Dk), tails
    (B, Hkv, block_size, Dk), output_rotation (Hkv, Dv, Dv)); None where the kernel does not
    cover them."""
    bsz, hq, _, dk = queries_shape
    hkv, dv = rotation_shape[0], rotation_shape[-1]
    name = out_dtype_name(dtype)
    if (name is None or tail_shape[2] != block_size
            or epilogue_unsupported_reason(dk, dv, hq, hkv, block_size, name)):
        return None
    return KernelLaunch(
        row_epilogue_kernel(backend, dk, dv, hq, hkv, block_size, name, packed),
        [(bsz, hq, 1, dv), (bsz, hkv, block_size, dk), (bsz, hkv, block_size, dv)],
        [dtype, mx.float16, mx.float16], (THREADS * (dv // DIMS_PER_GROUP), hkv, bsz),
        (THREADS, 1, 1))


def kernel_batched_epilogue(backend: str, pages_out: mx.array, pages_lse: mx.array | None,
                            queries: mx.array, scale: float, tail_keys: mx.array,
                            tail_values: mx.array, new_keys: mx.array, new_values: mx.array,
                            tail_info: mx.array, key_center: mx.array,
                            output_rotation: mx.array, block_size: int
                            ) -> tuple[mx.array, mx.array, mx.array] | None:
    """Launch 3 of the module doc (pages_lse None: packed after pages_out's B rows); None where
    the kernel does not cover the shape."""
    if new_keys.shape[2] != 1:
        return None
    packed = pages_lse is None
    launch = row_epilogue_launch(backend, queries.shape, queries.dtype, tail_keys.shape,
                                 output_rotation.shape, block_size, packed)
    if launch is None:
        return None
    return tuple(launch([pages_out, pages_out if packed else pages_lse, queries,
                         scale_array(scale), tail_keys, tail_values, new_keys, new_values,
                         tail_info, key_center, output_rotation]))


def rotate_body(dialect: str, key_dim: int, num_q_heads: int, num_kv_heads: int) -> str:
    """One threadgroup per (query head, row), one thread per output dimension: q~_j =
    sum_i (scale * q_i) R[g][i][j], the scaled query staged in threadgroup memory."""
    return body_prologue(dialect) + f"""
  constexpr int DK = {key_dim}, HQ = {num_q_heads}, G = HQ / {num_kv_heads};
  const int j = tq_tid, h = tq_gx, b = tq_gy, g = h / G;
  TQ_SHARED float qs[DK];
  qs[j] = TQ_TO_FLOAT(queries[(b * HQ + h) * DK + j]) * scale[0];
  TQ_BARRIER();
  float acc = 0.0f;
  for (int i = 0; i < DK; ++i) acc += qs[i] * rotation[(g * DK + i) * DK + j];
  rotated[(b * HQ + h) * DK + j] = acc;
"""


@lru_cache(maxsize=16)
def rotate_kernel(backend: str, key_dim: int, num_q_heads: int, num_kv_heads: int):
    builder = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    return builder(
        name=f"tq_rotate_queries_k{key_dim}_h{num_q_heads}x{num_kv_heads}",
        input_names=list(ROTATE_INPUTS), output_names=["rotated"],
        source=rotate_body(backend, key_dim, num_q_heads, num_kv_heads),
        header=activations_header(backend), ensure_row_contiguous=True)


def rotate_fits(queries_shape: tuple, dtype: mx.Dtype, rotation_shape: tuple) -> bool:
    """Whether launch 1 of the module doc covers (B, Hq, 1, Dk) queries of this dtype."""
    _, hq, length, dk = queries_shape
    return (length == 1 and dk <= MAX_ROTATE_DIM and hq % rotation_shape[0] == 0
            and out_dtype_name(dtype) is not None and tuple(rotation_shape[1:]) == (dk, dk))


def rotate_launch(backend: str, queries_shape: tuple, dtype: mx.Dtype,
                  rotation_shape: tuple) -> "KernelLaunch | None":
    """Launch 1 of the module doc resolved for these shapes: (B, Hq, 1, Dk) queries ->
    (B, Hq, Dk) float32; None where the kernel does not cover them."""
    if not rotate_fits(queries_shape, dtype, rotation_shape):
        return None
    bsz, hq, _, dk = queries_shape
    hkv = rotation_shape[0]
    return KernelLaunch(rotate_kernel(backend, dk, hq, hkv), [(bsz, hq, dk)], [mx.float32],
                        (dk * hq, bsz, 1), (dk, 1, 1))


def kernel_rotate_queries(backend: str, queries: mx.array, rotation: mx.array,
                          scale: float) -> mx.array | None:
    """Launch 1 of the module doc; None where the kernel does not cover the shape."""
    launch = rotate_launch(backend, queries.shape, queries.dtype, rotation.shape)
    if launch is None:
        return None
    return launch([queries, rotation, scale_array(scale)])[0]


class KernelLaunch:
    """One custom kernel with everything about its launch that depends only on shapes: a
    call passes the inputs alone (the step's host time is per op: tools/step_host_cost.py)."""

    __slots__ = ("kernel", "output_shapes", "output_dtypes", "grid", "threadgroup")

    def __init__(self, kernel: Callable[..., list[mx.array]], output_shapes: list,
                 output_dtypes: list, grid: tuple[int, int, int],
                 threadgroup: tuple[int, int, int]) -> None:
        self.kernel, self.output_shapes, self.output_dtypes = kernel, output_shapes, output_dtypes
        self.grid, self.threadgroup = grid, threadgroup

    def __call__(self, inputs: list[mx.array]) -> list[mx.array]:
        return self.kernel(inputs=inputs, output_shapes=self.output_shapes,
                           output_dtypes=self.output_dtypes, grid=self.grid,
                           threadgroup=self.threadgroup)
