"""Pure-MLX paged decode attention over TurboQuant pages: the oracle the kernels are tested
against and the path every backend without a kernel (the CPU) runs.

It computes exactly the contract's function: gather the sequence's pages through its block
table, dequantize in rotated space (codebook[unpack(codes)] * scale), fp32 attention with a
softmax over the seq_len valid tokens. A sequence of length 0 yields zeros.
"""

from __future__ import annotations

import mlx.core as mx

from tqstore.codec.packing import unpack_indices


def _gather_dequant(codes: mx.array, scales: mx.array, block_tables: mx.array,
                    codebook: mx.array, bits: int) -> mx.array:
    """(B, Hkv, max_blocks * block_size, D) float32, rotated space."""
    nbytes = codes.shape[-1]
    dim = nbytes * 8 // bits
    g_codes = codes[block_tables]  # (B, MB, Hkv, BS, nbytes)
    g_scales = scales[block_tables].astype(mx.float32)  # (B, MB, Hkv, BS)
    b, mb, hkv, bs, _ = g_codes.shape
    g_codes = g_codes.transpose(0, 2, 1, 3, 4).reshape(b, hkv, mb * bs, nbytes)
    g_scales = g_scales.transpose(0, 2, 1, 3).reshape(b, hkv, mb * bs)
    idx = unpack_indices(g_codes, bits, dim).astype(mx.uint32)
    return mx.take(codebook.astype(mx.float32), idx) * g_scales[..., None]


def paged_decode_attention_oracle(queries: mx.array, key_codes: mx.array, key_scales: mx.array,
                                  value_codes: mx.array, value_scales: mx.array,
                                  block_tables: mx.array, seq_lens: mx.array,
                                  key_codebook: mx.array, value_codebook: mx.array,
                                  key_bits: int, value_bits: int, return_lse: bool = False):
    """(B, Hq, Dk) float32 queries (scaled, key-rotated) -> (B, Hq, Dv) float32, value-rotated;
    with return_lse also the scores' log-sum-exp (B, Hq), natural log, -inf without tokens."""
    bsz, hq, dk = queries.shape
    hkv = key_codes.shape[1]
    group = hq // hkv
    keys = _gather_dequant(key_codes, key_scales, block_tables, key_codebook, key_bits)
    values = _gather_dequant(value_codes, value_scales, block_tables, value_codebook, value_bits)
    tokens = keys.shape[2]
    q = queries.astype(mx.float32).reshape(bsz, hkv, group, dk)
    scores = q @ keys.swapaxes(-1, -2)  # (B, Hkv, G, T)
    valid = mx.arange(tokens)[None, :] < seq_lens.astype(mx.int32)[:, None]  # (B, T)
    valid = valid[:, None, None, :]
    scores = mx.where(valid, scores, -mx.inf)
    m = mx.max(scores, axis=-1, keepdims=True)
    m = mx.where(mx.isfinite(m), m, 0.0)
    e = mx.where(valid, mx.exp(scores - m), 0.0)
    denom = mx.sum(e, axis=-1, keepdims=True)
    p = e / mx.where(denom > 0, denom, 1.0)
    out = p @ values  # (B, Hkv, G, Dv)
    out = out.reshape(bsz, hq, values.shape[-1])
    if return_lse:
        lse = mx.where(denom > 0, m + mx.log(mx.where(denom > 0, denom, 1.0)), -mx.inf)
        return out, lse.reshape(bsz, hq)
    return out
