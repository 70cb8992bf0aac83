"""Seeded orthogonal rotations, one per (layer, kv_head, K|V), reproducible bit-for-bit.

R = (Q ⊗ H_p / sqrt(p)) · diag(s) for head_dim D = p · m with p a power of two and m odd:
- s: random signs, H_p: the Walsh-Hadamard matrix (a randomized Hadamard transform),
- Q: a seeded m x m orthogonal matrix mixing the m Hadamard blocks (absent when m == 1, i.e.
  power-of-two head_dim is the plain randomized Hadamard transform).
Every output coordinate depends on every input coordinate, so coordinates of a rotated vector
follow the Beta-type density the codebook is built for.

Why not a dense Haar matrix and a matmul: a matmul's summation order depends on the batch shape
(BLAS switches gemv/gemm kernels with M), which breaks "quantizing N tokens at once equals one at
a time" (the anchors shipped that bug). Here the transform is a fixed sequence of elementwise
butterflies and multiply-adds: the same float32 operations in the same order whatever the
number of tokens, so codes are byte-identical across batch shapes.

Seeds: SHA-256 of (namespace seed, layer, kv_head, kind) feeds SHAKE-256, from which signs and
Q's entries are read as integers; Q is orthonormalised by Gram-Schmidt in Python floats using
only correctly rounded operations. No NumPy RNG, no LAPACK, no MLX RNG: identical everywhere.
"""

from __future__ import annotations

from tqstore.errors import InvalidArgument

import hashlib
import math
import struct
from functools import lru_cache
from typing import Sequence

import mlx.core as mx
import numpy as np

KINDS = ("K", "V", "QJL")


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """head_dim = p * m with p a power of two and m odd."""
    p = head_dim & -head_dim
    return p, head_dim // p


def rotation_seed(namespace_seed: int, layer: int, kv_head: int, kind: str) -> bytes:
    if kind not in KINDS:
        raise InvalidArgument(f"rotation kind must be one of {KINDS}, got {kind!r}")
    material = struct.pack("<qii", int(namespace_seed), int(layer), int(kv_head)) + kind.encode()
    return hashlib.sha256(b"tqstore/rotation/v1\0" + material).digest()


@lru_cache(maxsize=4096)
def _head_factors(seed: bytes, head_dim: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(signs (m, p) float32, Q (m, m) float32 or None) for one head."""
    p, m = split_head_dim(head_dim)
    stream = hashlib.shake_256(seed).digest(head_dim // 8 + 1 + 8 * m * m)
    bits = np.unpackbits(np.frombuffer(stream[: head_dim // 8 + 1], dtype=np.uint8))[:head_dim]
    signs = np.where(bits == 1, -1.0, 1.0).astype(np.float32).reshape(m, p)
    if m == 1:
        return signs, None
    words = struct.unpack(f"<{m * m}Q", stream[head_dim // 8 + 1 :])
    rows = [[((w >> 11) / float(1 << 53)) * 2.0 - 1.0 for w in words[i * m : (i + 1) * m]]
            for i in range(m)]
    basis: list[list[float]] = []
    for row in rows:  # modified Gram-Schmidt, fixed order, IEEE-exact operations only
        v = list(row)
        for b in basis:
            dot = 0.0
            for vi, bi in zip(v, b):
                dot += vi * bi
            v = [vi - dot * bi for vi, bi in zip(v, b)]
        norm = math.sqrt(sum_sequential(vi * vi for vi in v))
        basis.append([vi / norm for vi in v])
    return signs, np.asarray(basis, dtype=np.float32)


def sum_sequential(values) -> float:
    total = 0.0
    for v in values:
        total += v
    return total


def _fwht_last_axis(z: mx.array) -> mx.array:
    """Unnormalized Walsh-Hadamard transform over the last axis by butterflies."""
    p = z.shape[-1]
    lead = z.shape[:-1]
    h = 1
    while h < p:
        z = z.reshape(*lead, p // (2 * h), 2, h)
        a, b = z[..., 0, :], z[..., 1, :]
        z = mx.stack([a + b, a - b], axis=-2)
        h *= 2
    return z.reshape(*lead, p)


class HeadRotations:
    """The rotations of one layer's KV heads for one kind; applies to arrays shaped
    (..., num_heads, tokens, head_dim) with the head axis third from last."""

    def __init__(self, head_dim: int, seeds: Sequence[bytes]) -> None:
        if head_dim < 8 or head_dim % 8:
            raise InvalidArgument(f"unsupported head_dim {head_dim}: must be a multiple of 8")
        self.head_dim = head_dim
        self.num_heads = len(seeds)
        self.p, self.m = split_head_dim(head_dim)
        factors = [_head_factors(bytes(s), head_dim) for s in seeds]
        # signs: (H, 1, m, p) to broadcast over tokens; mix: (H, 1, m, m) or None.
        self.signs = mx.array(np.stack([f[0] for f in factors])[:, None])
        self.mix = None if self.m == 1 else mx.array(np.stack([f[1] for f in factors])[:, None])
        self._norm = mx.array(1.0 / math.sqrt(self.p), dtype=mx.float32)

    @classmethod
    def for_layer(cls, namespace_seed: int, layer: int, num_heads: int, head_dim: int,
                  kind: str) -> "HeadRotations":
        return cls(head_dim, [rotation_seed(namespace_seed, layer, h, kind) for h in range(num_heads)])

    def _check(self, x: mx.array) -> None:
        if x.ndim < 3 or x.shape[-1] != self.head_dim or x.shape[-3] != self.num_heads:
            raise InvalidArgument(
                f"expected (..., {self.num_heads} heads, tokens, {self.head_dim}), got {x.shape}")

    def _mix(self, z: mx.array, transpose: bool) -> mx.array:
        # out[a] = sum_b Q[a, b] z[b] (or Q[b, a] for the transpose), accumulated in fixed order.
        out = None
        for b in range(self.m):
            coef = self.mix[..., :, b] if not transpose else self.mix[..., b, :]
            term = coef[..., None] * z[..., b : b + 1, :]
            out = term if out is None else out + term
        return out

    def forward(self, x: mx.array) -> mx.array:
        """y = R x for every vector (float32 in, float32 out)."""
        self._check(x)
        lead = x.shape[:-1]
        z = x.astype(mx.float32).reshape(*lead, self.m, self.p) * self.signs
        z = _fwht_last_axis(z) * self._norm
        if self.mix is not None:
            z = self._mix(z, transpose=False)
        return z.reshape(*lead, self.head_dim)

    def inverse(self, y: mx.array) -> mx.array:
        """x = R^T y."""
        self._check(y)
        lead = y.shape[:-1]
        z = y.astype(mx.float32).reshape(*lead, self.m, self.p)
        if self.mix is not None:
            z = self._mix(z, transpose=True)
        z = _fwht_last_axis(z) * self._norm * self.signs
        return z.reshape(*lead, self.head_dim)

    def matrices(self) -> mx.array:
        """Dense R per head, (num_heads, D, D) with y = R @ x; for references and kernels."""
        eye = mx.broadcast_to(mx.eye(self.head_dim, dtype=mx.float32),
                              (self.num_heads, self.head_dim, self.head_dim))
        return self.forward(eye).swapaxes(-1, -2)
