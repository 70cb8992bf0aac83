"""Build and launch the paged decode-attention kernels (single pass, split-K + merge).

The mlx-lm gated_delta pattern: `attention_kernel()` builds the custom kernel for the GPU
backend MLX has (CUDA or Metal) and returns None where there is none (the CPU); the caller
(tqstore.metal.dispatch) then runs the pure-MLX reference, which computes the same function.

Two kernel kinds compute the same function with the same outputs:
- "mma" (attention_mma.py): tensor-core tiles, CUDA only (sm_80+), 4-bit K/V, head dims
  multiple of 32 (K) / 64 (V), block_size multiple of 16, GQA group <= 8;
- "portable" (attention_source.py): the one-body Metal/CUDA kernel, every other shape and Metal.
`kernel_kind()` picks one per shape. Split-K: the portable kernel writes partials and a
separate merge pass combines them; the MMA kernel merges in the same launch by default (the
last threadgroup of each (sequence, kv head) does it, mma_merge.fused_merge), or like the
portable kernel with MmaGeometry.fused=False.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import mlx.core as mx

from tqstore.metal.attention_mma import (LUT_BYTES, STEP_ATTN_INPUTS, MmaGeometry,
                                         mma_attention_body, mma_header, mma_unsupported_reason)
from tqstore.metal.attention_source import (ATTN_INPUTS, MERGE_INPUTS, MERGE_MAX_SPLITS,
                                            MERGE_OUTPUTS,
                                            SINGLE_OUTPUTS, SPLIT_OUTPUTS, AttentionGeometry,
                                            attention_body, attention_header, merge_body)
from tqstore.metal.epilogue import out_define
from tqstore.metal.mma_epilogue import EPILOGUE_INPUTS, EPILOGUE_OUTPUTS
from tqstore.metal.mma_merge import FUSED_OUTPUTS, fused_layout
from tqstore.small_arrays import padded_array

# Launch policy. A decode step must fill the GPU with threadgroups even for one sequence:
# aim for TARGET_GROUPS threadgroups (several waves on a 132-SM H100 or a 40-core M-series
# GPU), but never give a split fewer than MIN_SPLIT_TOKENS tokens (the merge pass and the
# per-threadgroup fixed cost would dominate) nor more than MAX_SPLITS splits.
TARGET_GROUPS = 1024
MIN_SPLIT_TOKENS = 512
MAX_SPLITS = MERGE_MAX_SPLITS  # the merge pass stages (m, l) of up to this many splits
INT32_LIMIT = 2**31 - 1
# Tuning knobs measured fastest on an H100 (docs/fragments/kernels.md); shapes they do not fit
# fall back to AttentionGeometry's defaults.
DEFAULT_VARIANT: dict = dict(warps=2, unroll=4, lanes=8, head_split=1, prefetch=True,
                              table_in_shared=False)
# The MMA kernel's knobs (MmaGeometry): 8 warps, one tile in flight beyond the one in use
# (128 registers); two threadgroups (64 KB of tables each) share an H100 SM; split-K merged
# by the last threadgroup of each (sequence, kv head) in the same launch. Measured against
# 4 warps x 3 threadgroups per SM in five runs (docs/fragments/kernels.md).
DEFAULT_MMA_VARIANT: dict = dict(warps=8, depth=1, fused=True)
# MMA splits: at most one wave of resident threadgroups (MMA_SMS x mma_resident_groups):
# longer threadgroups amortize their start (tables, first loads) and the merge reads fewer
# partials. The SM count is not in MLX's device_info: an H100's, hard-coded.
MMA_SMS = 132
MMA_REGISTERS = {1: 128, 2: 168, 3: 255}  # registers per thread by depth (nvcc, sm_90)
SM_REGISTERS, SM_SHARED_BYTES, SM_THREADS = 65536, 227 * 1024, 2048


def mma_resident_groups(geo: MmaGeometry) -> int:
    """Threadgroups of `geo` that fit on one SM (registers, shared memory, threads)."""
    shared = LUT_BYTES + 4 * geo.warps * geo.group * (geo.value_dim + 2) + 64
    return max(1, min(SM_REGISTERS // (geo.threads * MMA_REGISTERS[geo.depth]),
                      SM_SHARED_BYTES // shared, SM_THREADS // geo.threads))


KERNEL_KINDS = ("mma", "portable")


def gpu_backend() -> str | None:
    """'cuda', 'metal' or None: None where this MLX build or machine has no GPU, and where the
    default device is the CPU (`mx.set_default_device(mx.cpu)` or inside `mx.stream(mx.cpu)`),
    since MLX runs the caller's ops there and a custom kernel only runs on a GPU stream."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    return next((name for name in ("cuda", "metal") if gpu_build(name)), None)


def gpu_build(name: str) -> bool:
    """Whether this MLX build and machine have that GPU backend ('cuda' or 'metal'), whatever
    the default device is at the moment (one setting for the whole process, which another
    thread may switch for a while)."""
    try:
        return bool(getattr(mx, name).is_available())
    except AttributeError:
        return False


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


def mma_kernel_interface(geo: MmaGeometry, split: bool
                         ) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(input names, output names, header) of the tensor-core kernel for `geo`: what MLX
    builds its signature from (the tools that instrument or compile the kernel take it from
    here too)."""
    outputs = (FUSED_OUTPUTS if geo.fused else SPLIT_OUTPUTS) if split else SINGLE_OUTPUTS
    inputs = STEP_ATTN_INPUTS if geo.step else ATTN_INPUTS
    header = mma_header((geo.threads, mma_resident_groups(geo)), activations=geo.step)
    if geo.epilogue is not None:  # the folded epilogue (tqstore.metal.mma_epilogue)
        inputs, outputs = inputs + EPILOGUE_INPUTS, outputs + EPILOGUE_OUTPUTS
        header += out_define("cuda", geo.epilogue)
    return inputs, outputs, header


@lru_cache(maxsize=64)
def mma_attention_kernel(geo: MmaGeometry, split: bool, backend: str | None = None):
    """The tensor-core kernel for `geo` (CUDA only), or None without a CUDA backend."""
    backend = backend or gpu_backend()
    if backend != "cuda":
        return None
    name = f"tq_attn_mma_{'split' if split else 'single'}_{geo.tag()}"
    inputs, outputs, header = mma_kernel_interface(geo, split)
    return mx.fast.cuda_kernel(
        name=name, input_names=list(inputs), output_names=list(outputs),
        source=mma_attention_body(geo, split), header=header, ensure_row_contiguous=True,
        shared_memory=LUT_BYTES)


@lru_cache(maxsize=1)
def mma_capable() -> bool:
    """Whether the CUDA device runs mma.sync.m16n8k16 / movmatrix (sm_80+). MLX's device_info
    is read where it names the architecture; without that, assume a current GPU."""
    try:
        info = mx.device_info()
    except Exception:  # noqa: BLE001  (informative only)
        return True
    for key, value in info.items():
        if "capab" in key or "arch" in key:
            digits = "".join(ch for ch in str(value) if ch.isdigit())
            if len(digits) >= 2:
                return int(digits[:2]) >= 80
    return True


def kernel_kind(queries: mx.array, key_codes: mx.array, value_codes: mx.array, key_bits: int,
                value_bits: int, backend: str | None, requested: str | None = None) -> str:
    """'mma' where the tensor-core kernel covers the shape on this backend, else 'portable';
    `requested` forces one ('mma' raises when it does not fit)."""
    if requested not in (None, *KERNEL_KINDS):
        raise ValueError(f"unknown kernel kind {requested!r}: choose one of {KERNEL_KINDS}")
    if requested == "portable":
        return "portable"
    _, hq, dk = queries.shape
    _, hkv, bs, vbytes = value_codes.shape
    why = mma_unsupported_reason(dk, vbytes * 8 // value_bits, key_bits, value_bits, bs, hq, hkv)
    if backend != "cuda":
        why = why or f"backend {backend}: the MMA kernel is CUDA only"
    elif why is None and not mma_capable():
        why = "GPU older than sm_80"
    if why is None:
        return "mma"
    if requested == "mma":
        raise ValueError(f"the MMA kernel does not fit: {why}")
    return "portable"


@lru_cache(maxsize=16)
def merge_kernel(value_dim: int, num_q_heads: int, backend: str | None = None):
    backend = backend or gpu_backend()
    if backend is None:
        return None
    return _builder(backend)(
        name=f"tq_attn_merge_d{value_dim}_h{num_q_heads}", input_names=list(MERGE_INPUTS),
        output_names=list(MERGE_OUTPUTS), source=merge_body(value_dim, num_q_heads, backend),
        header=attention_header(backend), ensure_row_contiguous=True)


def choose_num_splits(batch: int, num_kv_heads: int, max_tokens: int,
                      target_groups: int = TARGET_GROUPS, round_up: bool = True) -> int:
    """Token splits per (sequence, kv head): 1 means the single-pass kernel, no merge.
    round_up=False never exceeds target_groups threadgroups (whole waves of resident ones)."""
    pairs = max(1, batch * num_kv_heads)
    by_occupancy = -(-target_groups // pairs) if round_up else target_groups // pairs
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
class LaunchPlan:
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
    kind: str = "portable"
    fused_rows: int = 0  # > 0: split-K merged in the split launch, work buffer (rows, HQ, DV)


_PLANS: dict[tuple, LaunchPlan] = {}


def _plan(queries: mx.array, key_codes: mx.array, value_codes: mx.array,
          block_tables: mx.array, key_bits: int, value_bits: int, num_splits: int | None,
          backend: str, variant: dict | None) -> LaunchPlan:
    key = (queries.shape, key_codes.shape, value_codes.shape, block_tables.shape, key_bits,
           value_bits, num_splits, backend, None if variant is None else tuple(sorted(variant.items())))
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    knobs = dict(variant or {})
    kind = kernel_kind(queries, key_codes, value_codes, key_bits, value_bits, backend,
                       knobs.pop("kernel", None))
    if max(key_codes.size, value_codes.size) > INT32_LIMIT:
        raise ValueError("page arenas over 2**31 bytes need 64-bit offsets in the kernel")
    bsz, hq, dk = queries.shape
    _, hkv, bs, vbytes = value_codes.shape
    max_blocks = block_tables.shape[1]
    dv = vbytes * 8 // value_bits
    if kind == "mma":
        geo = MmaGeometry(dk, dv, bs, hq, hkv, **(knobs or DEFAULT_MMA_VARIANT))
        nsplit = num_splits or choose_num_splits(bsz, hkv, max_blocks * bs,
                                                 MMA_SMS * mma_resident_groups(geo),
                                                 round_up=False)
    else:
        nsplit = num_splits or choose_num_splits(bsz, hkv, max_blocks * bs)
    if not 1 <= nsplit <= MAX_SPLITS:
        raise ValueError(f"num_splits {nsplit} outside 1..{MAX_SPLITS}")
    if kind == "mma":
        build = lambda split: mma_attention_kernel(geo, split, backend)  # noqa: E731
        group_threads, groups_x = geo.threads, nsplit
        fused = geo.fused and nsplit > 1
    else:
        pgeo = geometry_for(queries, key_codes, value_codes, key_bits, value_bits,
                            knobs or None)
        build = lambda split: attention_kernel(pgeo, split, backend)  # noqa: E731
        group_threads, groups_x = pgeo.threads, nsplit * pgeo.head_split
        fused = False
    params = padded_array([max_blocks, nsplit])  # 8 bytes would land in MLX's small pool
    plan = LaunchPlan(single=build(False) if nsplit == 1 else None,
                      split=build(True) if nsplit > 1 else None,
                      merge=merge_kernel(dv, hq, backend) if nsplit > 1 and not fused else None,
                      params=params, grid=(group_threads * groups_x, hkv, bsz),
                      group=(group_threads, 1, 1),
                      nsplit=nsplit, batch=bsz, num_q_heads=hq, value_dim=dv, kind=kind,
                      fused_rows=-(-fused_layout(bsz, hq, hkv, dv, nsplit)[2] // (hq * dv))
                      if fused else 0)
    if len(_PLANS) > 4096:  # a long-running server sees many block-table widths
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def as_dtype(x: mx.array, dtype: mx.Dtype) -> mx.array:
    """x in dtype: itself where it is already (no op), else a cast."""
    return x if x.dtype == dtype else x.astype(dtype)


def launch_plan(queries: mx.array, key_codes: mx.array, value_codes: mx.array,
                block_tables: mx.array, key_bits: int, value_bits: int, *,
                num_splits: int | None = None, backend: str | None = None,
                variant: dict | None = None) -> LaunchPlan | None:
    """The (cached) launch plan for these shapes, None without a GPU backend. `variant`:
    {"kernel": "mma" | "portable", **that kernel's knobs}; None = automatic."""
    backend = backend or gpu_backend()
    if backend is None:
        return None
    return _plan(queries, key_codes, value_codes, block_tables, key_bits, value_bits, num_splits,
                 backend, variant)


def run_plan(p: LaunchPlan, queries: mx.array, key_codes: mx.array, key_scales: mx.array,
             value_codes: mx.array, value_scales: mx.array, block_tables: mx.array,
             seq_lens: mx.array, key_codebook: mx.array, value_codebook: mx.array,
             return_lse: bool = False, packed: bool = False
             ) -> mx.array | tuple[mx.array, mx.array | None]:
    """(B, Hq, Dv) float32, and with return_lse the log-sum-exp of the scores (B, Hq) (natural
    log, -inf for an empty sequence): every launch writes both. ``packed`` (with return_lse):
    a fused split launch answers (its work buffer, None), the output's B rows then the lse."""
    inputs = [as_dtype(queries, mx.float32), key_codes, as_dtype(key_scales, mx.float16),
              value_codes, as_dtype(value_scales, mx.float16), as_dtype(block_tables, mx.int32),
              as_dtype(seq_lens, mx.int32), as_dtype(key_codebook, mx.float32),
              as_dtype(value_codebook, mx.float32), p.params]
    bsz, hq, dv = p.batch, p.num_q_heads, p.value_dim
    outs = [(bsz, hq, dv), (bsz, hq)]
    if p.nsplit == 1:
        out, lse = p.single(inputs=inputs, output_shapes=outs, output_dtypes=[mx.float32] * 2,
                            grid=p.grid, threadgroup=p.group)
    elif p.fused_rows:
        # One launch: MLX zero-fills the work buffer (the arrival counters) before the kernel.
        # Shaped (rows, HQ, DV) so that `out` is one slice of it (fewer graph ops per call).
        (work,) = p.split(inputs=inputs, output_shapes=[(p.fused_rows, hq, dv)],
                          output_dtypes=[mx.float32], grid=p.grid, threadgroup=p.group,
                          init_value=0.0)
        if return_lse and packed:
            return work, None
        out = work[:bsz]
        if return_lse:
            lse = work[bsz:].reshape(-1)[:bsz * hq].reshape(outs[1])
        return (out, lse) if return_lse else out
    else:
        part, pm, pl = p.split(
            inputs=inputs,
            output_shapes=[(bsz, hq, p.nsplit, dv), (bsz, hq, p.nsplit), (bsz, hq, p.nsplit)],
            output_dtypes=[mx.float32] * 3, grid=p.grid, threadgroup=p.group)
        out, lse = p.merge(inputs=[part, pm, pl, p.params], output_shapes=outs,
                           output_dtypes=[mx.float32] * 2, grid=(dv, hq, bsz),
                           threadgroup=(dv, 1, 1))
    return (out, lse) if return_lse else out


# The MMA kernel's step form (MmaGeometry.step), with the default knobs.
STEP_VARIANT: dict = dict(kernel="mma", **DEFAULT_MMA_VARIANT, step=True)


def run_step_plan(p: LaunchPlan, queries: mx.array, rotation: mx.array, scale: mx.array,
                  key_codes: mx.array, key_scales: mx.array, value_codes: mx.array,
                  value_scales: mx.array, block_tables: mx.array, seq_lens: mx.array,
                  key_codebook: mx.array, value_codebook: mx.array, arrivals: mx.array,
                  after: mx.array) -> tuple[mx.array, mx.array | None]:
    """A plan of the step form (STEP_VARIANT; inputs at attention_mma.STEP_ATTN_INPUTS): the
    model's queries (B, Hq, 1, Dk), the rotation, scale (1,) float32, the pages, and the
    caller's arrival counters (B * Hkv int32, zero; zero again after) and ``after`` (never
    read: an array made after the previous launch on these counters, its data edge; see
    attention_mma.STEP_ATTN_INPUTS). Returns (work buffer, None) for a split launch (out,
    then lse: run_plan's packed form; not zero-filled) or (out, lse) for a single pass."""
    return launch_step_plan(p, step_inputs(
        p, queries, rotation, scale, key_codes, key_scales, value_codes, value_scales,
        block_tables, seq_lens, key_codebook, value_codebook, arrivals, after))


def step_inputs(p: LaunchPlan, queries: mx.array, rotation: mx.array, scale: mx.array,
                key_codes: mx.array, key_scales: mx.array, value_codes: mx.array,
                value_scales: mx.array, block_tables: mx.array, seq_lens: mx.array,
                key_codebook: mx.array, value_codebook: mx.array, arrivals: mx.array,
                after: mx.array) -> list[mx.array]:
    """The step form's inputs in STEP_INPUT_DTYPES (cast where they are not)."""
    return [queries, as_dtype(rotation, mx.float32), as_dtype(scale, mx.float32), key_codes,
            as_dtype(key_scales, mx.float16), value_codes, as_dtype(value_scales, mx.float16),
            as_dtype(block_tables, mx.int32), as_dtype(seq_lens, mx.int32),
            as_dtype(key_codebook, mx.float32), as_dtype(value_codebook, mx.float32), p.params,
            arrivals, after]


# The dtypes run_step_plan casts the step form's inputs to, by position (None: as they come).
STEP_INPUT_DTYPES = (None, mx.float32, mx.float32, None, mx.float16, None, mx.float16,
                     mx.int32, mx.int32, mx.float32, mx.float32, None, mx.int32, None)


def launch_step_plan(p: LaunchPlan, inputs: list[mx.array]) -> tuple[mx.array, mx.array | None]:
    """run_step_plan's launch, for inputs already in STEP_INPUT_DTYPES (a caller that checked
    them once per shape: tqstore.metal.step_launch)."""
    outs = _launch_step(p, inputs, [], [])
    return (outs[0], None) if p.nsplit > 1 else (outs[0], outs[1])


def step_epilogue_variant(out_dtype: str) -> dict:
    """The step form with the per-row epilogue folded in (tqstore.metal.mma_epilogue), for a
    model whose output dtype is named `out_dtype` (epilogue.OUT_DTYPES)."""
    return dict(STEP_VARIANT, epilogue=out_dtype)


def launch_step_epilogue(p: LaunchPlan, inputs: list[mx.array], dtype: mx.Dtype,
                         tail_shape: tuple[int, int, int, int]) -> list[mx.array]:
    """A plan of step_epilogue_variant: one launch for a layer's step. ``inputs``: the step
    form's (in STEP_INPUT_DTYPES) then mma_epilogue.EPILOGUE_INPUTS; ``tail_shape`` (B, Hkv,
    block_size, Dk). Returns [out (B, Hq, 1, Dv) in ``dtype``, the next tail keys, values,
    then the attention's own: its work buffer (split-K) or out and lse (scratch, for the
    self-check; launch_step_plan's forms)]."""
    bsz, hkv, bs, dk = tail_shape
    hq, dv = p.num_q_heads, p.value_dim
    outs = _launch_step(p, inputs, [(bsz, hq, 1, dv), tail_shape, (bsz, hkv, bs, dv)],
                        [dtype, mx.float16, mx.float16])
    return outs[-3:] + outs[:-3]


def _launch_step(p: LaunchPlan, inputs: list[mx.array], extra_shapes: list,
                 extra_dtypes: list) -> list[mx.array]:
    """The step form's launch: its own outputs (the work buffer of a split launch, else out
    and lse), then ``extra_shapes`` (the folded epilogue's outputs)."""
    bsz, hq, dv = p.batch, p.num_q_heads, p.value_dim
    arrivals = inputs[12]
    if arrivals.size < bsz * p.grid[1] or arrivals.dtype != mx.int32:
        # Out-of-bounds atomics otherwise: one int32 counter per (sequence, kv head).
        raise ValueError(f"arrival counters {arrivals.shape} {arrivals.dtype}: need "
                         f"{bsz * p.grid[1]} int32")
    if p.nsplit == 1:
        kernel, shapes, dtypes = p.single, [(bsz, hq, dv), (bsz, hq)], [mx.float32] * 2
    else:
        kernel, shapes, dtypes = p.split, [(p.fused_rows, hq, dv)], [mx.float32]
    return kernel(inputs=inputs, output_shapes=shapes + extra_shapes,
                  output_dtypes=dtypes + extra_dtypes, grid=p.grid, threadgroup=p.group)


def kernel_paged_decode_attention(queries: mx.array, key_codes: mx.array, key_scales: mx.array,
                                  value_codes: mx.array, value_scales: mx.array,
                                  block_tables: mx.array, seq_lens: mx.array,
                                  key_codebook: mx.array, value_codebook: mx.array,
                                  key_bits: int, value_bits: int, *,
                                  num_splits: int | None = None,
                                  backend: str | None = None,
                                  variant: dict | None = None,
                                  return_lse: bool = False):
    """The contract's function on the GPU kernels (with return_lse also the (B, Hq) natural
    log-sum-exp of the scores); None where no kernel backend exists."""
    p = launch_plan(queries, key_codes, value_codes, block_tables, key_bits, value_bits,
                    num_splits=num_splits, backend=backend, variant=variant)
    if p is None:
        return None
    return run_plan(p, queries, key_codes, key_scales, value_codes, value_scales, block_tables,
                    seq_lens, key_codebook, value_codebook, return_lse)
