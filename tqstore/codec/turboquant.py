"""TurboQuant MSE codec for KV vectors, pure MLX ops (CPU, Metal and CUDA alike).

Per (token, head) vector x of dimension D:
  scale = |x| (or |x| / |c[idx]| with norm correction), stored as float16,
  y = R (x / |x|), idx_j = #{midpoints < y_j}, indices packed to D * bits / 8 bytes.
Reconstruction: x^ = scale * R^T c[idx].

Invariant: quantize() is a fixed sequence of elementwise float32 operations and fixed-order
tree sums over the last axis, so the codes of a vector never depend on how many other vectors
were quantized with it (tested byte-for-byte: all at once, one at a time, random splits,
another process).

Centering (calibrated key means, tqstore.codec.profile): a codec may carry a per-head center c
(float32 (H, D), exactly the profile's fp16 values). quantize(x) then codes x - c, computed by
one float32 subtraction before anything else (still a fixed per-vector op sequence), and
dequantize() adds c back. ``residual_codec`` is the same codec without the center: the arena
hands it the already-centered input so the GPU quantize kernel (which knows nothing of centers)
gives the same bytes. Decode attention scores the residual only: q . c is the same for every
token of a head, so softmax ignores it.

Decode-time attention (tqstore.paged) uses rotate() on the query, the codebook and
unpack_indices() to score and accumulate in rotated space without dequantizing.
"""

from __future__ import annotations

from tqstore.errors import InvalidArgument

import math
from dataclasses import dataclass

import mlx.core as mx

from tqstore.codec.codebook import SUPPORTED_BITS, codebook_midpoints, lloyd_max_codebook
from tqstore.codec.config import CodecConfig
from tqstore.codec.packing import pack_indices, packed_bytes, unpack_indices
from tqstore.codec.rotation import HeadRotations

FP16_MAX = 65504.0


def tree_sum_last(x: mx.array) -> mx.array:
    """Sum over the last axis by halving, in a fixed order independent of other axes."""
    while x.shape[-1] > 1:
        n = x.shape[-1]
        half = n // 2
        s = x[..., :half] + x[..., half : 2 * half]
        if n % 2:
            s = mx.concatenate([s, x[..., 2 * half :]], axis=-1)
        x = s
    return x[..., 0]


@dataclass(frozen=True)
class QuantizedVectors:
    """Codes of vectors shaped (..., H, N, D).

    codes: uint8 (..., H, N, D*bits/8); scales: float16 (..., H, N);
    qjl_signs: uint8 (..., H, N, D/8) sign bits of the residual sketch, or None;
    qjl_scales: float16 (..., H, N) |x| * |residual| * sqrt(pi/2) / sqrt(D), or None.
    """

    codes: mx.array
    scales: mx.array
    qjl_signs: mx.array | None = None
    qjl_scales: mx.array | None = None

    @property
    def num_tokens(self) -> int:
        return self.scales.shape[-1]

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.codes, self.scales, self.qjl_signs, self.qjl_scales) if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


class TurboQuantCodec:
    """One codec for one layer's K or V heads at one bit width."""

    def __init__(self, head_dim: int, bits: int, rotation: HeadRotations, *,
                 norm_correction: bool = True, qjl_rotation: HeadRotations | None = None,
                 center: mx.array | None = None) -> None:
        if bits not in SUPPORTED_BITS:
            raise InvalidArgument(f"unsupported bits {bits}: choose one of {SUPPORTED_BITS}")
        if head_dim % 8 or head_dim < 8:
            raise InvalidArgument(f"unsupported head_dim {head_dim}: must be a multiple of 8")
        if rotation.head_dim != head_dim:
            raise InvalidArgument("rotation head_dim does not match the codec's")
        if qjl_rotation is not None and norm_correction:
            raise InvalidArgument("QJL and norm correction are exclusive")
        if center is not None:
            if tuple(center.shape) != (rotation.num_heads, head_dim):
                raise InvalidArgument(f"center shape {tuple(center.shape)} is not "
                                      f"({rotation.num_heads}, {head_dim})")
            if qjl_rotation is not None:
                raise InvalidArgument("centered codecs store MSE codes only")
            center = center.astype(mx.float32)[:, None, :]  # (H, 1, D): broadcasts over tokens
        self.center = center
        self.head_dim = head_dim
        self.bits = bits
        self.rotation = rotation
        self.num_heads = rotation.num_heads
        self.norm_correction = norm_correction
        self.qjl_rotation = qjl_rotation
        self.codebook = mx.array(lloyd_max_codebook(head_dim, bits))
        self.midpoints = mx.array(codebook_midpoints(lloyd_max_codebook(head_dim, bits)))
        self._qjl_gain = mx.array(math.sqrt(math.pi / 2.0) / math.sqrt(head_dim), dtype=mx.float32)

    # -- sizes ---------------------------------------------------------------------------
    @property
    def code_bytes(self) -> int:
        return packed_bytes(self.head_dim, self.bits)

    @property
    def bytes_per_vector(self) -> int:
        """Stored bytes per (token, head): codes + fp16 scale (+ QJL bits and fp16 scale)."""
        extra = self.head_dim // 8 + 2 if self.qjl_rotation is not None else 0
        return self.code_bytes + 2 + extra

    # -- the pieces decode attention needs ---------------------------------------------
    def rotate(self, x: mx.array) -> mx.array:
        return self.rotation.forward(x)

    def unrotate(self, y: mx.array) -> mx.array:
        return self.rotation.inverse(y)

    def unpack(self, codes: mx.array) -> mx.array:
        return unpack_indices(codes, self.bits, self.head_dim)

    def _indices(self, y: mx.array) -> mx.array:
        """Number of midpoints strictly below y, by a fixed-depth binary search (no
        (..., D, 2^bits) temporaries)."""
        idx = mx.zeros(y.shape, dtype=mx.uint32)
        for level in reversed(range(self.bits)):
            candidate = idx + (1 << level)
            above = y > mx.take(self.midpoints, (candidate - 1).astype(mx.uint32))
            idx = mx.where(above, candidate, idx)
        return idx.astype(mx.uint8)

    # -- centering -------------------------------------------------------------------------
    @property
    def residual_codec(self) -> "TurboQuantCodec":
        """This codec without its center (itself when it has none): quantizes inputs that were
        already centered by ``centered``. Shares rotation and codebook."""
        if self.center is None:
            return self
        if getattr(self, "_residual", None) is None:
            plain = object.__new__(TurboQuantCodec)
            plain.__dict__.update(self.__dict__)
            plain.center = None
            self._residual = plain
        return self._residual

    def centered(self, x: mx.array) -> mx.array:
        """x - center in float32 (x itself, as float32, without a center)."""
        self.check_input(x)
        xf = x.astype(mx.float32)
        return xf if self.center is None else xf - self.center

    def check_input(self, x: mx.array) -> None:
        """InvalidArgument unless x is floating and shaped (..., heads, tokens, head_dim)."""
        if x.ndim < 3 or x.shape[-1] != self.head_dim or x.shape[-3] != self.num_heads:
            raise InvalidArgument(f"expected (..., {self.num_heads} heads, tokens, {self.head_dim}),"
                             f" got {tuple(x.shape)}")
        if not mx.issubdtype(x.dtype, mx.floating):
            raise InvalidArgument(f"expected a floating dtype, got {x.dtype}")

    # -- quantize / dequantize -------------------------------------------------------------
    def quantize(self, x: mx.array) -> QuantizedVectors:
        xf = self.centered(x)
        norm = mx.sqrt(tree_sum_last(xf * xf))
        safe = mx.where(norm > 0, norm, 1.0)
        y = self.rotation.forward(xf / safe[..., None])
        idx = self._indices(y)
        centroids = mx.take(self.codebook, idx.astype(mx.uint32))
        scale = norm
        if self.norm_correction:
            scale = norm / mx.sqrt(tree_sum_last(centroids * centroids))
        codes = pack_indices(idx, self.bits)
        scales = mx.minimum(scale, FP16_MAX).astype(mx.float16)
        if self.qjl_rotation is None:
            return QuantizedVectors(codes, scales)
        residual = y - centroids
        sketch = self.qjl_rotation.forward(residual)
        signs = pack_indices((sketch > 0).astype(mx.uint8), 1)
        rnorm = mx.sqrt(tree_sum_last(residual * residual))
        qjl_scales = mx.minimum(norm * rnorm * self._qjl_gain, FP16_MAX).astype(mx.float16)
        return QuantizedVectors(codes, scales, signs, qjl_scales)

    def dequantize_rotated(self, q: QuantizedVectors) -> mx.array:
        """scale * c[idx] (+ QJL term), still in rotated space: float32 (..., H, N, D)."""
        idx = self.unpack(q.codes).astype(mx.uint32)
        out = mx.take(self.codebook, idx) * q.scales.astype(mx.float32)[..., None]
        if q.qjl_signs is not None:
            bits = unpack_indices(q.qjl_signs, 1, self.head_dim).astype(mx.float32)
            sketch = self.qjl_rotation.inverse(bits * 2.0 - 1.0)
            out = out + sketch * q.qjl_scales.astype(mx.float32)[..., None]
        return out

    def dequantize(self, q: QuantizedVectors, dtype: mx.Dtype = mx.float32) -> mx.array:
        """The reconstruction of x (center added back)."""
        x = self.dequantize_residual(q)
        return (x if self.center is None else x + self.center).astype(dtype)

    def dequantize_residual(self, q: QuantizedVectors, dtype: mx.Dtype = mx.float32) -> mx.array:
        """The reconstruction of x - center: softmax-equivalent keys for attention."""
        return self.rotation.inverse(self.dequantize_rotated(q)).astype(dtype)


def layer_codecs(config: CodecConfig, layer: int, num_kv_heads: int, key_head_dim: int,
                 value_head_dim: int | None = None) -> tuple[TurboQuantCodec, TurboQuantCodec]:
    """(key codec, value codec) for one layer. Values may have their own head_dim (the anchors
    built the value codec from the keys' shape)."""
    value_head_dim = key_head_dim if value_head_dim is None else value_head_dim
    key_bits, value_bits = config.layer_bits(layer)
    center = None
    if config.profile is not None:
        config.profile.check_layout(config.profile.num_layers, num_kv_heads, key_head_dim)
        mean = config.profile.key_mean(layer)
        center = None if mean is None else mx.array(mean)
    k_rot = HeadRotations.for_layer(config.seed, layer, num_kv_heads, key_head_dim, "K")
    v_rot = HeadRotations.for_layer(config.seed, layer, num_kv_heads, value_head_dim, "V")
    qjl = (HeadRotations.for_layer(config.seed, layer, num_kv_heads, key_head_dim, "QJL")
           if config.key_qjl else None)
    keys = TurboQuantCodec(key_head_dim, key_bits, k_rot,
                           norm_correction=config.norm_correction, qjl_rotation=qjl, center=center)
    values = TurboQuantCodec(value_head_dim, value_bits, v_rot,
                             norm_correction=config.norm_correction)
    return keys, values
