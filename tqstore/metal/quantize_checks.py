"""The quantize kernels' self-checks (tqstore.metal.selfcheck runs them at first use per
shape): a quantizer must give the codec's very bytes, codes and fp16 scales, or it is
disabled. Apart from selfcheck.py for its size; the same seeded inputs (selfcheck._rng)."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from tqstore.metal.selfcheck import _rng  # noqa: PLC2701  (one seeding rule for every check)


def check_quantize(codec, run: Callable) -> str | None:
    """`run(codec, x)` must give codec.quantize(x)'s bytes: codes and fp16 scales, including
    a zero vector and magnitudes from 1e-3 to 3e3."""
    rng = _rng(("quantize", codec.head_dim, codec.bits, codec.num_heads))
    x = rng.standard_normal((codec.num_heads, 19, codec.head_dim))
    x *= rng.choice([1e-3, 1.0, 40.0, 3e3], size=(codec.num_heads, 19, 1))
    x[:, 0] = 0.0
    x = mx.array(x.astype(np.float16))
    return _byte_diff(run(codec, x), codec.quantize(x))


def _byte_diff(got, want) -> str | None:
    """Why quantized vectors `got` are not `want`'s very bytes (None: they are)."""
    if got is None:
        return "the kernel declined a shape it was chosen for"
    if got.codes.shape != want.codes.shape or got.scales.shape != want.scales.shape:
        return (f"shapes {got.codes.shape}, {got.scales.shape}: "
                f"want {want.codes.shape}, {want.scales.shape}")
    codes = int(mx.sum(got.codes != want.codes).item())
    scales = int(mx.sum(got.scales.view(mx.uint16) != want.scales.view(mx.uint16)).item())
    if codes or scales:
        return f"not byte-identical to the codec: {codes} code bytes and {scales} scales differ"
    return None


def check_quantize_rows(codec, run: Callable) -> str | None:
    """`run(codec, buffer, where)` must give codec.quantize(buffer[where])'s bytes for fp16
    buffers (3, heads, 5, D), rows picked out of order, centered codecs included."""
    rng = _rng(("quantize-rows", codec.head_dim, codec.bits, codec.num_heads))
    x = rng.standard_normal((3, codec.num_heads, 5, codec.head_dim))
    x *= rng.choice([1e-3, 1.0, 40.0, 3e3], size=(3, codec.num_heads, 5, 1))
    x[1, :, 0] = 0.0
    buffer = mx.array(x.astype(np.float16))
    where = mx.array(np.array([2, 0, 1], dtype=np.int32))
    return _byte_diff(run(codec, buffer, where), codec.quantize(buffer[where]))
