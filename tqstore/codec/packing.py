"""Bit packing of codebook indices: 8 indices of b bits fill exactly b bytes, LSB first.

Layout (what kernels read): index j of a vector lives in group j // 8, at bit offset
(j % 8) * b of that group's little-endian b-byte word. For b = 4 that is the usual nibble
order (index 2i in the low nibble of byte i). Integer ops only: exact on every backend.
"""

from __future__ import annotations

from tqstore.errors import InvalidArgument

import mlx.core as mx


def packed_bytes(head_dim: int, bits: int) -> int:
    return head_dim * bits // 8


def pack_indices(idx: mx.array, bits: int) -> mx.array:
    """uint8 indices (..., D) with D % 8 == 0 -> uint8 codes (..., D * bits / 8)."""
    d = idx.shape[-1]
    if bits == 8:
        return idx.astype(mx.uint8)
    lead = idx.shape[:-1]
    groups = idx.astype(mx.uint64).reshape(*lead, d // 8, 8)
    shifts = (mx.arange(8, dtype=mx.uint64) * bits)
    word = mx.sum(groups << shifts, axis=-1)  # disjoint bit fields: the sum is an OR
    byte_shifts = mx.arange(bits, dtype=mx.uint64) * 8
    out = (word[..., None] >> byte_shifts) & 0xFF
    return out.astype(mx.uint8).reshape(*lead, d * bits // 8)


def unpack_indices(codes: mx.array, bits: int, head_dim: int) -> mx.array:
    """uint8 codes (..., D * bits / 8) -> uint8 indices (..., D)."""
    if codes.shape[-1] != packed_bytes(head_dim, bits):
        raise InvalidArgument(f"codes last dim {codes.shape[-1]} != {packed_bytes(head_dim, bits)}"
                         f" for head_dim {head_dim} at {bits} bits")
    if bits == 8:
        return codes.astype(mx.uint8)
    lead = codes.shape[:-1]
    groups = codes.astype(mx.uint64).reshape(*lead, head_dim // 8, bits)
    word = mx.sum(groups << (mx.arange(bits, dtype=mx.uint64) * 8), axis=-1)
    shifts = mx.arange(8, dtype=mx.uint64) * bits
    idx = (word[..., None] >> shifts) & ((1 << bits) - 1)
    return idx.astype(mx.uint8).reshape(*lead, head_dim)
