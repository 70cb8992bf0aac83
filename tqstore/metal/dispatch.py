"""The one place that picks how decode attention over TurboQuant pages runs.

Order: the fused GPU kernel of the backend MLX has (CUDA or Metal), else the paged cache's
reference (tqstore.paged.attention.paged_decode_attention_reference, when that module is
present), else this package's own pure-MLX reference. Both references compute the same
function; the kernels are tested against them.

The choice is reported: `active_backend()` names it (for `tqstore inspect` and benchmarks) and
the first call logs it once on the "tqstore.metal" logger.
"""

from __future__ import annotations

import logging
from typing import Callable

import mlx.core as mx

from tqstore.codec.turboquant import QuantizedVectors, TurboQuantCodec
from tqstore.metal.attention_kernel import gpu_backend, kernel_paged_decode_attention
from tqstore.metal.quantize import kernel_quantize

log = logging.getLogger("tqstore.metal")

_forced: str | None = None  # "kernel" | "reference" | None (automatic); tests and benches only
_logged: set[str] = set()


def _paged_reference() -> tuple[str, Callable]:
    # Imported here, not at the top: tqstore.paged imports this module (arena writes).
    from tqstore.paged.attention import paged_decode_attention_reference

    return "reference:tqstore.paged", paged_decode_attention_reference


def active_backend() -> str:
    """'cuda-kernel', 'metal-kernel' or 'reference:tqstore.paged'."""
    gpu = gpu_backend()
    if gpu is not None and _forced != "reference":
        return f"{gpu}-kernel"
    return _paged_reference()[0]


def force_backend(mode: str | None) -> None:
    """Override the automatic choice: 'kernel', 'reference' or None to restore it."""
    global _forced
    if mode not in (None, "kernel", "reference"):
        raise ValueError(f"unknown backend mode {mode!r}")
    _forced = mode


def _announce(name: str) -> None:
    if name not in _logged:
        _logged.add(name)
        log.info("decode attention over TurboQuant pages runs on: %s", name)


def paged_decode_attention(queries: mx.array, key_codes: mx.array, key_scales: mx.array,
                           value_codes: mx.array, value_scales: mx.array,
                           block_tables: mx.array, seq_lens: mx.array,
                           key_codebook: mx.array, value_codebook: mx.array,
                           key_bits: int, value_bits: int) -> mx.array:
    """Decode attention of one query token per sequence over compressed pages.

    queries (B, Hq, Dk) float32: scale * q, rotated by its kv head's key rotation. Pages:
    key_codes uint8 (num_blocks, Hkv, block_size, Dk*kbits/8), key_scales float16
    (num_blocks, Hkv, block_size), likewise for values; block_tables int32 (B, max_blocks),
    seq_lens int32 (B,). Returns (B, Hq, Dv) float32 in the value-rotated space.
    """
    name = active_backend()
    if name.endswith("-kernel"):
        if _forced == "reference":
            raise AssertionError("unreachable")
        out = kernel_paged_decode_attention(
            queries, key_codes, key_scales, value_codes, value_scales, block_tables, seq_lens,
            key_codebook, value_codebook, key_bits, value_bits)
        if out is not None:
            _announce(name)
            return out
        name = _paged_reference()[0]
    elif _forced == "kernel":
        raise RuntimeError("decode-attention kernel forced but no GPU kernel backend is present")
    _announce(name)
    return _paged_reference()[1](queries, key_codes, key_scales, value_codes, value_scales,
                                 block_tables, seq_lens, key_codebook, value_codebook,
                                 key_bits, value_bits)


def quantize(codec: TurboQuantCodec, x: mx.array) -> QuantizedVectors:
    """codec.quantize(x), on the quantize kernel where one fits (byte-identical by design and
    checked on the GPU by tools/bench_attention.py), else on the codec's own MLX ops."""
    if _forced != "reference":
        out = kernel_quantize(codec, x)
        if out is not None:
            return out
    return codec.quantize(x)
