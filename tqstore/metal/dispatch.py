"""The one place that picks how decode attention over TurboQuant pages runs.

Order: the fused GPU kernel of the backend MLX has (CUDA or Metal); on the CPU the C kernels
(tqstore.native, built at first use); else the kernel's pure-MLX reference (reference.py),
which computes the same function and is what every kernel is tested against. The paged cache
calls these functions for attention over pages; it never picks a kernel or a reference.
(Attention over the fp16 tail alone, before any page is committed, has no kernel: the cache
takes reference.merge_with_tail for it directly.)

On CUDA (sm_80+) shapes the tensor-core kernel covers (4-bit K/V, see attention_kernel.py) run
it, the rest the portable kernel. Every kernel passes a self-check against the reference the
first time it meets a shape (tqstore.metal.selfcheck); one that fails is disabled for the
process with one warning naming it, and the next in line serves (tensor-core -> portable ->
reference). The choice is reported: `active_backend()` names it (for `tqstore inspect` and
benchmarks), `kernel_report()` gives every kernel's verdict, and the first call of each
kernel kind logs it once on the "tqstore.metal" logger (`cuda-kernel-mma`, `cuda-kernel`,
`metal-kernel`, `cpu-kernel`, ...).
"""

from __future__ import annotations

import logging
from typing import Callable

import mlx.core as mx

from tqstore.codec.turboquant import QuantizedVectors, TurboQuantCodec
from tqstore.metal import selfcheck
from tqstore.metal.attention_kernel import (LaunchPlan, gpu_backend, launch_plan, mma_capable,
                                            run_plan)
from tqstore.metal.batch_step import kernel_batched_epilogue, kernel_rotate_queries, rotate_fits
from tqstore.metal.epilogue import epilogue_fits, kernel_decode_epilogue
from tqstore.metal.multi_token import cpu_multi_token_attention, mask_kind
from tqstore.metal.quantize import kernel_quantize, kernel_quantize_rows, quantize_kernel_fits
from tqstore.metal.quantize_checks import check_quantize, check_quantize_rows
from tqstore.metal.reference import (batched_epilogue_reference, decode_epilogue_reference,
                                     paged_decode_attention_reference, rotate_queries_reference,
                                     unpack_pages)
from tqstore.native import cpu_kernels
from tqstore.native.build import load as load_native, unavailable_reason as native_unavailable

log = logging.getLogger("tqstore.metal")

_forced: str | None = None  # "kernel" | "reference" | None (automatic); tests and benches only
_logged: set[tuple[str, str]] = set()
_REFERENCE = "reference:tqstore.metal"
CPU_KERNEL = "cpu-kernel"
CPU_QUANTIZE = "cpu-kernel-quantize"
CPU_STEP = "cpu-kernel-step"
CPU_SOFTMAX = "cpu-kernel-softmax"
CPU_DEQUANTIZE = "cpu-kernel-dequantize"


def _kernel_name(gpu: str, kind: str) -> str:
    return f"{gpu}-kernel-mma" if kind == "mma" else f"{gpu}-kernel"


def _cpu_native() -> bool:
    """Whether the CPU kernels are built (disabled with the reason, once, if not)."""
    if load_native() is None:
        selfcheck.disable(CPU_KERNEL, native_unavailable() or "unavailable")
        return False
    return True


def active_backend() -> str:
    """What serves decode attention over pages now: 'cuda-kernel-mma' (tensor-core kernel
    where a shape fits it, the portable kernel for the others), 'cuda-kernel' (GPU older than
    sm_80, or the tensor-core kernel disabled by its self-check), 'metal-kernel', 'cpu-kernel'
    or 'reference:tqstore.metal'; a kernel disabled by its self-check is named after it."""
    disabled = {k: v for k, v in selfcheck.kernel_report().items() if v.startswith("disabled")}
    note = "".join(f" ({name} {why})" for name, why in disabled.items())
    gpu = gpu_backend()
    if _forced == "reference":
        return _REFERENCE
    if gpu is not None:
        names = [_kernel_name(gpu, "mma")] if gpu == "cuda" and mma_capable() else []
        names.append(_kernel_name(gpu, "portable"))
    else:
        names = [CPU_KERNEL] if _cpu_native() else []
    for name in names:
        if name not in disabled:
            return name + note
    return _REFERENCE + note


def kernel_report() -> dict[str, str]:
    """Every kernel met so far in this process and its self-check verdict."""
    return selfcheck.kernel_report()


def force_backend(mode: str | None) -> None:
    """Override the automatic choice: 'kernel', 'reference' or None to restore it."""
    global _forced
    if mode not in (None, "kernel", "reference"):
        raise ValueError(f"unknown backend mode {mode!r}")
    _forced = mode


def announce(name: str, what: str = "decode attention over TurboQuant pages") -> None:
    if (what, name) not in _logged:
        _logged.add((what, name))
        log.info("%s runs on: %s", what, name)


def attention_shape(queries: mx.array, key_codes: mx.array, value_codes: mx.array,
                    key_bits: int, value_bits: int) -> tuple:
    """What a self-check's verdict is per: (Hq, Hkv, Dk, Dv, key_bits, value_bits, block_size)."""
    return (queries.shape[1], key_codes.shape[1], queries.shape[2],
            value_codes.shape[-1] * 8 // value_bits, key_bits, value_bits, key_codes.shape[2])


def _gpu_attention(gpu: str, queries, key_codes, key_scales, value_codes, value_scales,
                   block_tables, seq_lens, key_codebook, value_codebook, key_bits, value_bits,
                   packed: bool = False):
    """(out, lse) on the first GPU kernel kind that passes its self-check, else None."""
    plan = gpu_attention_plan(gpu, queries, key_codes, value_codes, block_tables, key_bits,
                              value_bits)
    if plan is None:
        return None
    return run_plan(plan, queries, key_codes, key_scales, value_codes, value_scales,
                    block_tables, seq_lens, key_codebook, value_codebook, True, packed)


def gpu_attention_plan(gpu: str, queries, key_codes, value_codes, block_tables, key_bits: int,
                       value_bits: int) -> LaunchPlan | None:
    """The launch plan of the first GPU attention kernel kind that passes its self-check for
    these shapes (tensor-core, then portable), or None (the reference serves)."""
    plan = launch_plan(queries, key_codes, value_codes, block_tables, key_bits, value_bits,
                       backend=gpu)
    kinds = [plan.kind] + (["portable"] if plan.kind != "portable" else [])
    shape = attention_shape(queries, key_codes, value_codes, key_bits, value_bits)
    for kind in kinds:
        name = _kernel_name(gpu, kind)
        variant = None if kind == plan.kind else {"kernel": kind}

        def run(pages: dict, splits: int, kind: str = kind) -> tuple[mx.array, mx.array]:
            p = launch_plan(pages["queries"], pages["key_codes"], pages["value_codes"],
                            pages["block_tables"], key_bits, value_bits, num_splits=splits,
                            backend=gpu, variant={"kernel": kind})
            return run_plan(p, *(pages[k] for k in PAGE_KEYS), return_lse=True)

        def check(kind: str = kind, run=run) -> str | None:
            return check_both_launches(
                lambda splits: selfcheck.check_attention(shape, kind, lambda x: run(x, splits)))

        if selfcheck.usable(name, shape, check):
            if variant is not None:
                plan = launch_plan(queries, key_codes, value_codes, block_tables, key_bits,
                                   value_bits, backend=gpu, variant=variant)
            announce(name)
            return plan
    return None


def check_both_launches(check: Callable[[int], str | None]) -> str | None:
    """A split-K attention kernel's self-check: ``check(splits)`` for the one-pass and the
    split launch, which are different kernels; the first problem, naming the launch."""
    for splits in (1, 2):
        problem = check(splits)
        if problem:
            return f"{problem} ({splits} split{'s' if splits > 1 else ''})"
    return None


PAGE_KEYS = ("queries", "key_codes", "key_scales", "value_codes", "value_scales",
              "block_tables", "seq_lens", "key_codebook", "value_codebook")


def _cpu_attention(*args):
    """(out, lse) on the C kernel if it is built and passes its self-check, else None."""
    if not _cpu_native():
        return None
    queries, key_codes, value_codes, key_bits, value_bits = (args[0], args[1], args[3],
                                                             args[9], args[10])
    shape = attention_shape(queries, key_codes, value_codes, key_bits, value_bits)

    def check() -> str | None:
        def run(pages: dict):
            got = cpu_kernels.decode_attention(*(pages[k] for k in PAGE_KEYS), key_bits,
                                               value_bits)
            if got is None:
                raise RuntimeError("the C kernel declined a shape it was chosen for")
            return got
        return selfcheck.check_attention(shape, "cpu", run)

    if not selfcheck.usable(CPU_KERNEL, shape, check):
        return None
    result = cpu_kernels.decode_attention(*args)
    if result is not None:
        announce(CPU_KERNEL)
    return result


def paged_decode_attention(queries: mx.array, key_codes: mx.array, key_scales: mx.array,
                           value_codes: mx.array, value_scales: mx.array,
                           block_tables: mx.array, seq_lens: mx.array,
                           key_codebook: mx.array, value_codebook: mx.array,
                           key_bits: int, value_bits: int, return_lse: bool = False,
                           packed: bool = False):
    """Decode attention of one query token per sequence over compressed pages.

    queries (B, Hq, Dk) float32: scale * q, rotated by its kv head's key rotation. Pages:
    key_codes uint8 (num_blocks, Hkv, block_size, Dk*kbits/8), key_scales float16
    (num_blocks, Hkv, block_size), likewise for values; block_tables int32 (B, max_blocks),
    seq_lens int32 (B,). Returns (B, Hq, Dv) float32 in the value-rotated space; with
    return_lse also the log-sum-exp of the scores (B, Hq) float32, natural log (-inf where a
    sequence has no token), so a caller can merge this softmax with another piece. With
    ``packed`` (and return_lse) a GPU's split launch may answer (work buffer, None) instead:
    its output's B rows followed by the log-sum-exp, as the batched epilogue reads them
    (reference.unpack_pages cuts them apart); saves the ops that would cut it here.
    """
    args = (queries, key_codes, key_scales, value_codes, value_scales, block_tables, seq_lens,
            key_codebook, value_codebook, key_bits, value_bits)
    if _forced != "reference":
        gpu = gpu_backend()
        result = (_gpu_attention(gpu, *args, packed=packed and return_lse) if gpu is not None
                  else _cpu_attention(*args))
        if result is not None:
            return result if return_lse else result[0]
        if _forced == "kernel":
            raise RuntimeError("decode-attention kernel forced but no kernel serves: "
                               f"{selfcheck.kernel_report() or 'no kernel backend is present'}")
    announce(_REFERENCE)
    return paged_decode_attention_reference(*args, return_lse=return_lse)


def gpu_kernels_possible() -> bool:
    """Whether decode attention runs on a GPU here (not forced onto the reference): where a
    batch's rows may share one kernel launch (tqstore.paged.batch.gpu_batch_step)."""
    return _forced != "reference" and gpu_backend() is not None


def fused_decode_step_possible() -> bool:
    """Whether fused_decode_step may serve here (the CPU with its C kernels built)."""
    return _forced != "reference" and gpu_backend() is None and _cpu_native()


def fused_decode_step(queries: mx.array, scale: float, query_rotation: mx.array,
                      key_codes: mx.array, key_scales: mx.array, value_codes: mx.array,
                      value_scales: mx.array, block_tables: mx.array, seq_lens: mx.array,
                      key_codebook: mx.array, value_codebook: mx.array,
                      tail_keys: mx.array | None, tail_values: mx.array | None,
                      key_center: mx.array, output_rotation: mx.array, key_bits: int,
                      value_bits: int) -> mx.array | None:
    """A layer's whole decode attention in one call where a kernel does it (the CPU's C step
    kernel: query rotation, pages, un-rotation, merge with the fp16 tail), else None and the
    caller composes paged_decode_attention and decode_epilogue. queries (B, Hq, Dk) unscaled;
    returns (B, Hq, Dv) float32."""
    if not _step_usable(queries, key_codes, value_codes, key_bits, value_bits):
        return None
    out = cpu_kernels.decode_step(queries, scale, query_rotation, key_codes, key_scales,
                                  value_codes, value_scales, block_tables, seq_lens,
                                  key_codebook, value_codebook, tail_keys, tail_values,
                                  key_center, output_rotation, key_bits, value_bits)
    if out is not None:
        announce(CPU_STEP, "a decode step's attention (rotations, pages, fp16 tail)")
    return out


def fused_decode_step_rows(queries: mx.array, scale: float, query_rotation: mx.array,
                           key_codes: mx.array, key_scales: mx.array, value_codes: mx.array,
                           value_scales: mx.array, rows: list, key_codebook: mx.array,
                           value_codebook: mx.array, key_center: mx.array,
                           output_rotation: mx.array, key_bits: int,
                           value_bits: int) -> mx.array | None:
    """fused_decode_step for B sequences of a batch in one call: queries (B, Hq, Dk), rows[b] =
    (block table, seq_lens, tail keys, tail values) of row b (cpu_kernels.decode_step_rows).
    Row b's bits equal fused_decode_step on that row alone; None where it does not run."""
    if not _step_usable(queries, key_codes, value_codes, key_bits, value_bits):
        return None
    out = cpu_kernels.decode_step_rows(queries, scale, query_rotation, key_codes, key_scales,
                                       value_codes, value_scales, rows, key_codebook,
                                       value_codebook, key_center, output_rotation, key_bits,
                                       value_bits)
    if out is not None:
        announce(CPU_STEP, "a decode step's attention (rotations, pages, fp16 tail)")
    return out


def _step_usable(queries: mx.array, key_codes: mx.array, value_codes: mx.array, key_bits: int,
                 value_bits: int) -> bool:
    """Whether the C step kernel may serve this shape: built, and its first-use self-check
    passed (a per-row verdict: the batched call runs the same code on each row)."""
    if not fused_decode_step_possible():
        return False
    shape = attention_shape(queries, key_codes, value_codes, key_bits, value_bits)

    def run(x: dict) -> mx.array | None:
        return cpu_kernels.decode_step(
            x["queries"], x["scale"], x["query_rotation"], x["key_codes"], x["key_scales"],
            x["value_codes"], x["value_scales"], x["block_tables"], x["seq_lens"],
            x["key_codebook"], x["value_codebook"], x["tail_keys"], x["tail_values"],
            x["key_center"], x["output_rotation"], key_bits, value_bits)

    return selfcheck.usable(CPU_STEP, shape, lambda: selfcheck.check_decode_step(shape, run))


def dequantize_residual(codec: TurboQuantCodec, q: QuantizedVectors,
                        unrotation: mx.array) -> mx.array:
    """codec.dequantize_residual(q) in float32. On the CPU with the C kernels built: the
    codebook lookup in C (bit for bit the codec's, checked byte for byte at first use per
    (bits, head_dim); MLX's take and unpacking ran 20x slower there), then one matmul with
    `unrotation` (each head's dense R, (Hkv, D, D)) instead of the codec's fast Walsh-Hadamard
    transform, whose elementwise passes took 5.5x the matmul's time there: equal within
    float32 rounding. Elsewhere the codec's own ops, unchanged."""
    if _forced != "reference" and gpu_backend() is None and _cpu_native():
        shape = (codec.bits, codec.head_dim)

        def check() -> str | None:
            return selfcheck.check_dequantize(codec, cpu_kernels.dequantize_rotated)

        if selfcheck.usable(CPU_DEQUANTIZE, shape, check):
            rotated = cpu_kernels.dequantize_rotated(codec, q)
            if rotated is not None:
                return mx.matmul(rotated, unrotation)
    return codec.dequantize_residual(q)


def multi_token_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                          mask=None) -> mx.array | None:
    """Dense attention of a multi-token step ((1, Hq, L, D) over (1, Hkv, T, D)) where a CPU
    path beats MLX's own (tqstore.metal.multi_token: the C softmax between MLX's matmuls),
    checked once per shape against MLX's scaled_dot_product_attention; else None and the
    caller runs MLX's."""
    if _forced == "reference" or gpu_backend() is not None or not _cpu_native():
        return None
    kind = mask_kind(mask)
    if kind is None:
        return None
    shape = (queries.shape[1], keys.shape[1], keys.shape[-1], values.shape[-1], kind)
    if not selfcheck.usable(CPU_SOFTMAX, shape, lambda: selfcheck.check_multi_token(
            shape, cpu_multi_token_attention)):
        return None
    out = cpu_multi_token_attention(queries, keys, values, scale, mask)
    if out is not None:
        announce(CPU_SOFTMAX, "multi-token attention (prefill chunks)")
    return out


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
        name = f"{gpu}-kernel-epilogue"
        _, hq, dk = queries.shape
        hkv, dv = output_rotation.shape[0], output_rotation.shape[-1]
        shape = (dk, dv, hq, hkv, block_size, out_dtype)
        fits = epilogue_fits(dk, dv, hq, hkv, block_size, out_dtype)

        def run(x: dict, n_old: int, bs: int, dtype: mx.Dtype):
            info = mx.array([n_old + 1, n_old], dtype=mx.int32)
            return kernel_decode_epilogue(gpu, **x, tail_info=info, block_size=bs,
                                          out_dtype=dtype)

        if fits and selfcheck.usable(name, shape,
                                     lambda: selfcheck.check_epilogue(shape, run)):
            out = kernel_decode_epilogue(gpu, pages_out, pages_lse, queries, tail_keys,
                                         tail_values, new_keys, new_values, tail_info,
                                         key_center, output_rotation, block_size, out_dtype)
            if out is not None:
                announce(name, "the decode epilogue (un-rotation, merge with the fp16 tail)")
                return out
    return decode_epilogue_reference(pages_out, pages_lse, queries, tail_keys, tail_values,
                                     new_keys, new_values, key_center, output_rotation,
                                     out_dtype)


def batched_decode_epilogue(pages_out: mx.array, pages_lse: mx.array | None, queries: mx.array,
                            scale: float, tail_keys: mx.array, tail_values: mx.array,
                            new_keys: mx.array, new_values: mx.array, tail_info: mx.array,
                            key_center: mx.array, output_rotation: mx.array,
                            block_size: int) -> tuple[mx.array, mx.array, mx.array]:
    """The decode epilogue of a batch whose fp16 tails differ in length, in one launch (the
    contract: tqstore.metal.batch_step): queries (B, Hq, 1, Dk) and new tokens (B, Hkv, 1, D)
    in the model's dtype, tails in block-sized buffers (B, Hkv, block_size, D), tail_info int32
    [n_old + 1, n_old] per row, pages_lse None where the attention's output is packed. Returns
    (out (B, Hq, 1, Dv) in the queries' dtype, next tails)."""
    gpu = gpu_backend()
    if (gpu is not None and _forced != "reference"
            and batched_epilogue_usable(gpu, queries, output_rotation, block_size,
                                        pages_lse is None)):
        out = kernel_batched_epilogue(gpu, pages_out, pages_lse, queries, scale, tail_keys,
                                      tail_values, new_keys, new_values, tail_info,
                                      key_center, output_rotation, block_size)
        if out is not None:
            announce(f"{gpu}-kernel-epilogue-rows",
                     "the batched decode epilogue (one launch for a batch's tails)")
            return out
    return batched_epilogue_reference(pages_out, pages_lse, queries, scale, tail_keys,
                                      tail_values, new_keys, new_values, tail_info,
                                      key_center, output_rotation)


def batched_epilogue_usable(gpu: str, queries: mx.array, output_rotation: mx.array,
                            block_size: int, packed: bool) -> bool:
    """Whether the per-row epilogue kernel covers this shape and passed its self-check."""
    name = f"{gpu}-kernel-epilogue-rows"
    _, hq, _, dk = queries.shape
    hkv, dv = output_rotation.shape[0], output_rotation.shape[-1]
    shape = (dk, dv, hq, hkv, block_size, queries.dtype, packed)

    def run(x: dict):
        return kernel_batched_epilogue(gpu, **x, block_size=block_size)

    return (epilogue_fits(dk, dv, hq, hkv, block_size, queries.dtype)
            and selfcheck.usable(name, shape,
                                 lambda: selfcheck.check_batched_epilogue(shape, run)))


def rotate_queries(queries: mx.array, rotation: mx.array, scale: float) -> mx.array:
    """(B, Hq, 1, Dk) queries in the model's dtype -> (scale * q) rotated per kv head, (B, Hq,
    Dk) float32 (the attention kernel's queries): one kernel on a GPU (tqstore.metal.
    batch_step), else rotate_queries_reference."""
    gpu = gpu_backend()
    if gpu is not None and _forced != "reference" and rotate_usable(gpu, queries, rotation):
        out = kernel_rotate_queries(gpu, queries, rotation, scale)
        if out is not None:
            announce(f"{gpu}-kernel-rotate-queries", "the queries' scale and rotation")
            return out
    return rotate_queries_reference(queries, rotation, scale)


def rotate_usable(gpu: str, queries: mx.array, rotation: mx.array) -> bool:
    """Whether the query-rotation kernel covers this shape and passed its self-check (a shape
    it does not cover is never checked: a decline would disable it for every shape)."""
    if not rotate_fits(queries.shape, queries.dtype, rotation.shape):
        return False
    shape = (queries.shape[-1], queries.shape[1], rotation.shape[0], queries.dtype)
    return selfcheck.usable(f"{gpu}-kernel-rotate-queries", shape,
                            lambda: selfcheck.check_rotate_queries(
                                shape, lambda q, r, s: kernel_rotate_queries(gpu, q, r, s)))


def forced_mode() -> str | None:
    """The override force_backend set ('kernel', 'reference' or None)."""
    return _forced


def quantize(codec: TurboQuantCodec, x: mx.array) -> QuantizedVectors:
    """codec.quantize(x), on the quantize kernel where one fits (byte-identical by design,
    checked byte for byte at first use per shape), else on the codec's own MLX ops."""
    if _forced != "reference":
        if codec.center is not None:
            # The kernels know nothing of centers: the codec's own float32 subtraction first,
            # then its center-free twin (the same bytes as codec.quantize(x)).
            x, codec = codec.centered(x), codec.residual_codec
        gpu = gpu_backend()
        if gpu is not None and quantize_kernel_fits(codec):
            name, run = f"{gpu}-kernel-quantize", kernel_quantize
        elif gpu is None and cpu_kernels.quantize_fits(codec) and _cpu_native():
            name, run = CPU_QUANTIZE, cpu_kernels.quantize
        else:
            name = run = None
        shape = (codec.head_dim, codec.bits, codec.norm_correction, codec.num_heads)
        if run is not None and selfcheck.usable(name, shape,
                                                lambda: check_quantize(codec, run)):
            out = run(codec, x)
            if out is not None:
                announce(name, "TurboQuant quantization")
                return out
    return codec.quantize(x)


def quantize_rows(codec: TurboQuantCodec, buffer: mx.array, where: mx.array) -> QuantizedVectors:
    """codec.quantize(buffer[where]) for fp16 tail buffers (B, heads, tokens, D) and int32 rows
    (R,): the pages' layout (R, heads, tokens, ...). On a GPU one launch (the gather and the
    centering inside the quantize kernel, checked byte for byte at first use per shape), else
    the gather, then quantize()."""
    gpu = gpu_backend()
    if _forced != "reference" and gpu is not None and quantize_kernel_fits(codec):
        name = f"{gpu}-kernel-quantize-rows"
        shape = (codec.head_dim, codec.bits, codec.norm_correction, codec.num_heads,
                 codec.center is not None)
        if selfcheck.usable(name, shape, lambda: check_quantize_rows(
                codec, kernel_quantize_rows)):
            out = kernel_quantize_rows(codec, buffer, where)
            if out is not None:
                announce(name, "TurboQuant quantization of full tail blocks")
                return out
    return quantize(codec, buffer[where])
