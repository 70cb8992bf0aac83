"""The one place that picks how decode attention over TurboQuant pages runs.

Order: the fused GPU kernel of the backend MLX has (CUDA or Metal), else the kernel's pure-MLX
reference (reference.py), which computes the same function and is what the kernels are tested
against. The paged cache calls these functions for attention over pages; it never picks a kernel
or a reference. (Attention over the fp16 tail alone, before any page is committed, has no kernel:
the cache takes reference.merge_with_tail for it directly.)

On CUDA (sm_80+) shapes the tensor-core kernel covers (4-bit K/V, see attention_kernel.py) run
it, the rest the portable kernel. The choice is reported: `active_backend()` names it (for
`tqstore inspect` and benchmarks) and the first call of each kernel kind logs it once on the
"tqstore.metal" logger (`cuda-kernel-mma`, `cuda-kernel`, `metal-kernel`, ...).
"""

from __future__ import annotations

import logging

import mlx.core as mx

from tqstore.codec.turboquant import QuantizedVectors, TurboQuantCodec
from tqstore.metal.attention_kernel import gpu_backend, launch_plan, mma_capable, run_plan
from tqstore.metal.epilogue import kernel_decode_epilogue
from tqstore.metal.quantize import kernel_quantize
from tqstore.metal.reference import decode_epilogue_reference, paged_decode_attention_reference

log = logging.getLogger("tqstore.metal")

_forced: str | None = None  # "kernel" | "reference" | None (automatic); tests and benches only
_logged: set[tuple[str, str]] = set()
_REFERENCE = "reference:tqstore.metal"


def _kernel_name(gpu: str, kind: str) -> str:
    return f"{gpu}-kernel-mma" if kind == "mma" else f"{gpu}-kernel"


def active_backend() -> str:
    """'cuda-kernel-mma' (tensor-core kernel where a shape fits it, the portable kernel for
    the others), 'cuda-kernel' (GPU older than sm_80), 'metal-kernel' or
    'reference:tqstore.metal'. The log line names the kernel each shape actually runs."""
    gpu = gpu_backend()
    if gpu is not None and _forced != "reference":
        return _kernel_name(gpu, "mma" if gpu == "cuda" and mma_capable() else "portable")
    return _REFERENCE


def force_backend(mode: str | None) -> None:
    """Override the automatic choice: 'kernel', 'reference' or None to restore it."""
    global _forced
    if mode not in (None, "kernel", "reference"):
        raise ValueError(f"unknown backend mode {mode!r}")
    _forced = mode


def _announce(name: str, what: str = "decode attention over TurboQuant pages") -> None:
    if (what, name) not in _logged:
        _logged.add((what, name))
        log.info("%s runs on: %s", what, name)


def paged_decode_attention(queries: mx.array, key_codes: mx.array, key_scales: mx.array,
                           value_codes: mx.array, value_scales: mx.array,
                           block_tables: mx.array, seq_lens: mx.array,
                           key_codebook: mx.array, value_codebook: mx.array,
                           key_bits: int, value_bits: int, return_lse: bool = False):
    """Decode attention of one query token per sequence over compressed pages.

    queries (B, Hq, Dk) float32: scale * q, rotated by its kv head's key rotation. Pages:
    key_codes uint8 (num_blocks, Hkv, block_size, Dk*kbits/8), key_scales float16
    (num_blocks, Hkv, block_size), likewise for values; block_tables int32 (B, max_blocks),
    seq_lens int32 (B,). Returns (B, Hq, Dv) float32 in the value-rotated space; with
    return_lse also the log-sum-exp of the scores (B, Hq) float32, natural log (-inf where a
    sequence has no token), so a caller can merge this softmax with another piece.
    """
    gpu = gpu_backend()
    if gpu is not None and _forced != "reference":
        plan = launch_plan(queries, key_codes, value_codes, block_tables, key_bits, value_bits,
                           backend=gpu)
        _announce(_kernel_name(gpu, plan.kind))
        return run_plan(plan, queries, key_codes, key_scales, value_codes, value_scales,
                        block_tables, seq_lens, key_codebook, value_codebook, return_lse)
    if _forced == "kernel":
        raise RuntimeError("decode-attention kernel forced but no GPU kernel backend is present")
    _announce(_REFERENCE)
    return paged_decode_attention_reference(queries, key_codes, key_scales, value_codes,
                                            value_scales, block_tables, seq_lens, key_codebook,
                                            value_codebook, key_bits, value_bits,
                                            return_lse=return_lse)


def decode_epilogue(pages_out: mx.array, pages_lse: mx.array, queries: mx.array,
                    tail_keys: mx.array, tail_values: mx.array, new_keys: mx.array | None,
                    new_values: mx.array | None, tail_info: mx.array, key_center: mx.array,
                    output_rotation: mx.array, block_size: int, out_dtype: mx.Dtype
                    ) -> tuple[mx.array, mx.array, mx.array]:
    """Un-rotate the pages' output, merge it with the fp16 tail (plus this step's new token),
    cast: one kernel where the backend has one (tqstore.metal.epilogue), else the pure-MLX
    reference.decode_epilogue_reference. tail_info int32 [n, n_old] feeds the kernel
    (one array per step, shared by the layers). Returns (out (B, Hq, Dv), next tail K, V)."""
    gpu = gpu_backend()
    if gpu is not None and _forced != "reference":
        out = kernel_decode_epilogue(gpu, pages_out, pages_lse, queries, tail_keys, tail_values,
                                     new_keys, new_values, tail_info, key_center,
                                     output_rotation, block_size, out_dtype)
        if out is not None:
            _announce(f"{gpu}-kernel", "the decode epilogue (un-rotation, merge with the fp16 tail)")
            return out
    return decode_epilogue_reference(pages_out, pages_lse, queries, tail_keys, tail_values,
                                     new_keys, new_values, key_center, output_rotation,
                                     out_dtype)


def quantize(codec: TurboQuantCodec, x: mx.array) -> QuantizedVectors:
    """codec.quantize(x), on the quantize kernel where one fits (byte-identical by design and
    checked on the GPU by tools/bench_attention.py), else on the codec's own MLX ops."""
    if _forced != "reference":
        out = kernel_quantize(codec, x)
        if out is not None:
            return out
    return codec.quantize(x)
