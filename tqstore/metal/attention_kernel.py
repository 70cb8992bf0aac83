"""Build and launch the paged decode-attention kernels (single pass, split-K + merge).

The mlx-lm gated_delta pattern: `attention_kernel()` builds the custom kernel for the GPU
backend MLX has (CUDA or Metal) and returns None where there is none (the CPU); the caller
(tqstore.metal.dispatch) then runs the pure-MLX reference, which computes the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import mlx.core as mx

from tqstore.metal.attention_source import (ATTN_INPUTS, MERGE_INPUTS, MERGE_OUTPUTS,
                                            SINGLE_OUTPUTS, SPLIT_OUTPUTS, AttentionGeometry,
                                            attention_body, attention_header, merge_body)

# Launch policy. A decode step must fill the GPU with threadgroups even for one sequence:
# aim for TARGET_GROUPS threadgroups (several waves on a 132-SM H100 or a 40-core M-series
# GPU), but never give a split fewer than MIN_SPLIT_TOKENS tokens (the merge pass and the
# per-threadgroup fixed cost would dominate) nor more than MAX_SPLITS splits.
TARGET_GROUPS = 1024
MIN_SPLIT_TOKENS = 512
MAX_SPLITS = 256
INT32_LIMIT = 2**31 - 1
# Tuning knobs measured fastest on an H100 (docs/fragments/kernels.md); shapes they do not fit
# fall back to AttentionGeometry's defaults.
DEFAULT_VARIANT: dict = dict(warps=2, unroll=4, lanes=8, head_split=1, prefetch=True,
                              table_in_shared=False)


def gpu_backend() -> str | None:
    """'cuda', 'metal' or None (no GPU kernel backend in this MLX build / machine)."""
    try:
        if mx.cuda.is_available():
            return "cuda"
    except AttributeError:
        pass
    try:
        if mx.metal.is_available():
            return "metal"
    except AttributeError:
        pass
    return None


def _builder(backend: str) -> Callable:
    return mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel


@lru_cache(maxsize=64)
def attention_kernel(geo: AttentionGeometry, split: bool, backend: str | None = None):
    """The custom kernel for `geo`, or None when no GPU backend is present."""
    backend = backend or gpu_backend()
    if backend is None:
        return None
    name = f"tq_attn_{'split' if split else 'single'}_{geo.tag()}"
    return _builder(backend)(
        name=name, input_names=list(ATTN_INPUTS),
        output_names=list(SPLIT_OUTPUTS if split else SINGLE_OUTPUTS),
        source=attention_body(geo, backend, split), header=attention_header(backend),
        ensure_row_contiguous=True)


@lru_cache(maxsize=16)
def merge_kernel(value_dim: int, num_q_heads: int, backend: str | None = None):
    backend = backend or gpu_backend()
    if backend is None:
        return None
    return _builder(backend)(
        name=f"tq_attn_merge_d{value_dim}_h{num_q_heads}", input_names=list(MERGE_INPUTS),
        output_names=list(MERGE_OUTPUTS), source=merge_body(value_dim, num_q_heads, backend),
        header=attention_header(backend), ensure_row_contiguous=True)


def choose_num_splits(batch: int, num_kv_heads: int, max_tokens: int) -> int:
    """Token splits per (sequence, kv head): 1 means the single-pass kernel, no merge."""
    by_occupancy = -(-TARGET_GROUPS // max(1, batch * num_kv_heads))
    by_length = max(1, max_tokens // MIN_SPLIT_TOKENS)
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


def geometry_for(queries: mx.array, key_codes: mx.array, value_codes: mx.array,
                 key_bits: int, value_bits: int, variant: dict | None = None) -> AttentionGeometry:
    """The kernel constants for these inputs; `variant` overrides the tuning knobs (warps,
    unroll, lanes, head_split), else DEFAULT_VARIANT where it fits."""
    _, hq, dk = queries.shape
    _, hkv, bs, vbytes = value_codes.shape
    if key_codes.shape[-1] * 8 != dk * key_bits:
        raise ValueError(f"key codes of {key_codes.shape[-1]} bytes do not hold head_dim {dk}"
                         f" at {key_bits} bits")
    dims = dict(key_dim=dk, value_dim=vbytes * 8 // value_bits, key_bits=key_bits,
                value_bits=value_bits, block_size=bs, num_q_heads=hq, num_kv_heads=hkv)
    if variant is not None:
        return AttentionGeometry(**dims, **variant)
    try:
        return AttentionGeometry(**dims, **DEFAULT_VARIANT)
    except ValueError:  # the tuned knobs do not fit this shape: the safe defaults always do
        return AttentionGeometry(**dims)


@dataclass(frozen=True)
class _Plan:
    """Everything about one launch that depends only on shapes, built once per shape: the
    per-call host work (Python, small uploads) otherwise adds directly to every decode step."""

    single: object | None
    split: object | None
    merge: object | None
    params: mx.array
    grid: tuple[int, int, int]
    group: tuple[int, int, int]
    nsplit: int
    batch: int
    num_q_heads: int
    value_dim: int


_PLANS: dict[tuple, _Plan] = {}


def _plan(queries: mx.array, key_codes: mx.array, value_codes: mx.array,
          block_tables: mx.array, key_bits: int, value_bits: int, num_splits: int | None,
          backend: str, variant: dict | None) -> _Plan:
    key = (queries.shape, key_codes.shape, value_codes.shape, block_tables.shape, key_bits,
           value_bits, num_splits, backend, None if variant is None else tuple(sorted(variant.items())))
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    geo = geometry_for(queries, key_codes, value_codes, key_bits, value_bits, variant)
    if max(key_codes.size, value_codes.size) > INT32_LIMIT:
        raise ValueError("page arenas over 2**31 bytes need 64-bit offsets in the kernel")
    bsz, hq, _ = queries.shape
    max_blocks = block_tables.shape[1]
    nsplit = num_splits or choose_num_splits(bsz, geo.num_kv_heads, max_blocks * geo.block_size)
    params = mx.array([max_blocks, nsplit], dtype=mx.int32)
    plan = _Plan(single=attention_kernel(geo, False, backend) if nsplit == 1 else None,
                 split=attention_kernel(geo, True, backend) if nsplit > 1 else None,
                 merge=merge_kernel(geo.value_dim, hq, backend) if nsplit > 1 else None,
                 params=params, grid=(geo.threads * nsplit * geo.head_split, geo.num_kv_heads, bsz),
                 group=(geo.threads, 1, 1), nsplit=nsplit, batch=bsz, num_q_heads=hq,
                 value_dim=geo.value_dim)
    if len(_PLANS) > 4096:  # a long-running server sees many block-table widths
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _as(x: mx.array, dtype: mx.Dtype) -> mx.array:
    return x if x.dtype == dtype else x.astype(dtype)


def kernel_paged_decode_attention(queries: mx.array, key_codes: mx.array, key_scales: mx.array,
                                  value_codes: mx.array, value_scales: mx.array,
                                  block_tables: mx.array, seq_lens: mx.array,
                                  key_codebook: mx.array, value_codebook: mx.array,
                                  key_bits: int, value_bits: int, *,
                                  num_splits: int | None = None,
                                  backend: str | None = None,
                                  variant: dict | None = None) -> mx.array | None:
    """The contract's function on the GPU kernels; None where no kernel backend exists."""
    backend = backend or gpu_backend()
    if backend is None:
        return None
    p = _plan(queries, key_codes, value_codes, block_tables, key_bits, value_bits, num_splits,
              backend, variant)
    inputs = [_as(queries, mx.float32), key_codes, _as(key_scales, mx.float16), value_codes,
              _as(value_scales, mx.float16), _as(block_tables, mx.int32), _as(seq_lens, mx.int32),
              _as(key_codebook, mx.float32), _as(value_codebook, mx.float32), p.params]
    bsz, hq, dv = p.batch, p.num_q_heads, p.value_dim
    if p.nsplit == 1:
        (out,) = p.single(inputs=inputs, output_shapes=[(bsz, hq, dv)],
                          output_dtypes=[mx.float32], grid=p.grid, threadgroup=p.group)
        return out
    part, pm, pl = p.split(
        inputs=inputs,
        output_shapes=[(bsz, hq, p.nsplit, dv), (bsz, hq, p.nsplit), (bsz, hq, p.nsplit)],
        output_dtypes=[mx.float32] * 3, grid=p.grid, threadgroup=p.group)
    (out,) = p.merge(inputs=[part, pm, pl, p.params], output_shapes=[(bsz, hq, dv)],
                     output_dtypes=[mx.float32], grid=(dv, hq, bsz), threadgroup=(dv, 1, 1))
    return out
