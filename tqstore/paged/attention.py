"""Decode attention straight from compressed pages, and the one dispatch point to kernels.

Math (per query head h, kv head g = h // (Hq // Hkv), valid tokens t < seq_len):
  q~  = R_K,g (scale * q_h)                        rotated once by the caller
  s_t = key_scale_t * sum_j q~_j c_K[kidx_tj]      (keys never leave rotated space)
  p   = softmax(s) over valid tokens               (online: running max / sum per chunk)
  o~  = sum_t p_t * value_scale_t * c_V[vidx_t]    (accumulated in the VALUE rotated space)
The caller un-rotates once: o = R_V,g^T o~. This equals dequantize-then-SDPA because
R^T is orthogonal and the scales factor out (tested to 1e-5 relative in fp32).

``paged_decode_attention_reference`` is pure MLX ops (runs on CPU, Metal and CUDA) and is the
test oracle of the fused kernels. ``decode_attention`` is the single entry point the cache calls;
the kernels issue slots its dispatcher in there and nowhere else.
Keys quantized around a per-(layer, head) mean m (k = m + residual, tqstore.codec.profile) are
scored on the residual only: q~ . R_K m is the same for every token of a head, and softmax
ignores it. With ``return_lse`` the log-sum-exp comes back too, so the fp16 tail
(tqstore.paged.tail) merges with the pages' softmax exactly.
"""

from __future__ import annotations

import mlx.core as mx

from tqstore.codec import unpack_indices
from tqstore.errors import InvalidArgument

# Blocks scored per online-softmax step in the reference: bounds temporaries to
# B * Hkv * chunk * block_size * D floats, whatever the context length.
REFERENCE_CHUNK_TOKENS = 2048


def _pages(arr: mx.array, ids: mx.array) -> mx.array:
    """arena (num_blocks, H, bs, ...) gathered at ids (B, nb) -> (B, H, nb * bs, ...)."""
    pages = arr[ids]  # (B, nb, H, bs, ...)
    B, nb, H, bs = pages.shape[:4]
    pages = mx.swapaxes(pages, 1, 2)
    return pages.reshape(B, H, nb * bs, *pages.shape[4:])


def paged_decode_attention_reference(
    queries: mx.array,
    key_codes: mx.array,
    key_scales: mx.array,
    value_codes: mx.array,
    value_scales: mx.array,
    block_tables: mx.array,
    seq_lens: mx.array,
    key_codebook: mx.array,
    value_codebook: mx.array,
    key_bits: int,
    value_bits: int,
    return_lse: bool = False,
) -> mx.array | tuple[mx.array, mx.array]:
    """(B, Hq, Dk) rotated, pre-scaled queries -> (B, Hq, Dv) float32 in value-rotated space,
    and with ``return_lse`` also the log-sum-exp (B, Hq) of the scores (natural log), which
    lets a caller merge this softmax with another piece (tqstore.paged.tail).

    Entries of block_tables beyond a sequence's length are ignored (may be 0, the null block).
    Every seq_len must be >= 1 (a row with no valid token would divide 0 by 0).
    """
    B, Hq, Dk = queries.shape
    Hkv, block_size = key_codes.shape[1], key_codes.shape[2]
    if Hq % Hkv:
        raise InvalidArgument(f"query heads {Hq} not a multiple of kv heads {Hkv}")
    if key_codes.shape[-1] * 8 != Dk * key_bits:
        raise InvalidArgument(f"key codes of {key_codes.shape[-1]} bytes do not hold {Dk} x {key_bits} bits")
    Dv = value_codes.shape[-1] * 8 // value_bits
    G = Hq // Hkv
    q = queries.astype(mx.float32).reshape(B, Hkv, G, Dk)
    lens = seq_lens.astype(mx.int32)
    # The table's width bounds the work; no .item() on seq_lens: a host sync per layer per
    # step would serialize the whole decode graph.
    num_blocks = block_tables.shape[1]
    chunk_blocks = max(1, REFERENCE_CHUNK_TOKENS // block_size)

    m = mx.full((B, Hkv, G, 1), -mx.inf, dtype=mx.float32)
    l = mx.zeros((B, Hkv, G, 1), dtype=mx.float32)
    acc = mx.zeros((B, Hkv, G, Dv), dtype=mx.float32)
    for start in range(0, num_blocks, chunk_blocks):
        ids = block_tables[:, start : min(num_blocks, start + chunk_blocks)].astype(mx.int32)
        kidx = unpack_indices(_pages(key_codes, ids), key_bits, Dk).astype(mx.uint32)
        kvec = mx.take(key_codebook, kidx)  # (B, Hkv, T, Dk) codebook entries, rotated space
        ks = _pages(key_scales, ids).astype(mx.float32)[:, :, None, :]  # (B, Hkv, 1, T)
        s = (q @ mx.swapaxes(kvec, -1, -2)) * ks  # (B, Hkv, G, T)
        T = s.shape[-1]
        pos = start * block_size + mx.arange(T, dtype=mx.int32)
        valid = (pos[None, :] < lens[:, None])[:, None, None, :]
        s = mx.where(valid, s, -mx.inf)
        m_new = mx.maximum(m, mx.max(s, axis=-1, keepdims=True))
        m_safe = mx.where(mx.isinf(m_new), 0.0, m_new)  # a chunk with no valid token
        p = mx.exp(s - m_safe)
        corr = mx.exp(m - m_safe)
        l = l * corr + mx.sum(p, axis=-1, keepdims=True)
        vidx = unpack_indices(_pages(value_codes, ids), value_bits, Dv).astype(mx.uint32)
        vvec = mx.take(value_codebook, vidx) * _pages(value_scales, ids).astype(mx.float32)[..., None]
        acc = acc * corr + p @ vvec
        m = m_new
    out = (acc / l).reshape(B, Hq, Dv)
    if return_lse:
        return out, (m + mx.log(l)).reshape(B, Hq)
    return out


def decode_attention(
    queries: mx.array,
    key_codes: mx.array,
    key_scales: mx.array,
    value_codes: mx.array,
    value_scales: mx.array,
    block_tables: mx.array,
    seq_lens: mx.array,
    key_codebook: mx.array,
    value_codebook: mx.array,
    key_bits: int,
    value_bits: int,
    return_lse: bool = False,
) -> mx.array | tuple[mx.array, mx.array]:
    """THE dispatch point for paged decode attention (same contract as the reference):
    tqstore.metal.dispatch runs the fused Metal/CUDA kernel where MLX has that backend, else
    paged_decode_attention_reference. The choice is logged once and shown by `tqstore inspect`.
    """
    from tqstore.metal.dispatch import paged_decode_attention

    return paged_decode_attention(
        queries, key_codes, key_scales, value_codes, value_scales, block_tables, seq_lens,
        key_codebook, value_codebook, key_bits, value_bits, return_lse=return_lse)
