"""The pure-MLX reference of each kernel in this package: what the kernel computes, the path
every backend without a kernel (the CPU) runs through tqstore.metal.dispatch, and what the
kernels are tested against. One reference per kernel; the quantize kernel's is the codec itself.

Decode attention over TurboQuant pages (attention_kernel.py), per query head h, kv head
g = h // (Hq // Hkv), valid tokens t < seq_len:
  q~  = R_K,g (scale * q_h)                        rotated once by the caller
  s_t = key_scale_t * sum_j q~_j c_K[kidx_tj]      (keys never leave rotated space)
  p   = softmax(s) over valid tokens               (online: running max / sum per chunk)
  o~  = sum_t p_t * value_scale_t * c_V[vidx_t]    (accumulated in the VALUE rotated space)
The caller un-rotates once: o = R_V,g^T o~. This equals dequantize-then-SDPA because R^T is
orthogonal and the scales factor out (tests/metal/test_reference.py checks it against float64
numpy attention over the codec's dequantized K/V). Keys quantized around a per-(layer, head) mean
m (k = m + residual, tqstore.codec.profile) are scored on the residual only: q~ . R_K m is the
same for every token of a head, and softmax ignores it. With ``return_lse`` the log-sum-exp
comes back too, so the fp16 tail merges with the pages' softmax exactly.

The decode epilogue (epilogue.py): un-rotate the pages' output, merge its softmax with the fp16
tail's (the rule of tqstore.paged.tail), cast.
"""

from __future__ import annotations

import mlx.core as mx

from tqstore.codec.packing import unpack_indices
from tqstore.errors import InvalidArgument

# Blocks scored per online-softmax step: bounds temporaries to
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
    lets a caller merge this softmax with another piece (the fp16 tail).

    Entries of block_tables beyond a sequence's length are ignored (may be 0, the null block).
    A sequence of length 0 yields zeros and an lse of -inf, as the kernels do.
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
    # l > 0 for every sequence with a token (its max term contributes exp(0) = 1); an empty
    # one has acc = l = 0 and gets 0, not 0/0. Bits of the others are unchanged by the where.
    out = (acc / mx.where(l > 0, l, 1.0)).reshape(B, Hq, Dv)
    if return_lse:
        return out, (m + mx.log(l)).reshape(B, Hq)  # -inf + log 0 = -inf when empty
    return out


def merge_with_tail(pages_out: mx.array | None, pages_lse: mx.array | None, queries: mx.array,
                    tail_keys: mx.array, tail_values: mx.array) -> mx.array:
    """Decode attention = softmax over (page scores, tail scores), from its two pieces.

    pages_out (Hkv, G, Dv) float32 normalized output over the pages, pages_lse (Hkv, G, 1) its
    log-sum-exp (None when no token is committed); queries (Hkv, G, Dk) float32, pre-scaled, in
    the keys' space; tail_keys (Hkv, n, Dk) float32 in the same space as the page scores (the
    residual k - mean where keys are centered); tail_values (Hkv, n, Dv) float32.
    Returns (Hkv, G, Dv) float32. Compiled: one fused graph per tail length instead of ~13 ops
    per layer and step (decode's cost on a GPU is mostly per-op overhead).
    """
    if pages_out is None:
        return _tail_only(queries, tail_keys, tail_values)
    return _tail_and_pages(pages_out, pages_lse, queries, tail_keys, tail_values)


@mx.compile
def _tail_only(queries: mx.array, tail_keys: mx.array, tail_values: mx.array) -> mx.array:
    scores = queries @ mx.swapaxes(tail_keys, -1, -2)  # (Hkv, G, n)
    p = mx.exp(scores - mx.max(scores, axis=-1, keepdims=True))
    return (p @ tail_values) / mx.sum(p, axis=-1, keepdims=True)


@mx.compile
def _tail_and_pages(pages_out: mx.array, pages_lse: mx.array, queries: mx.array,
                    tail_keys: mx.array, tail_values: mx.array) -> mx.array:
    scores = queries @ mx.swapaxes(tail_keys, -1, -2)  # (Hkv, G, n)
    m = mx.maximum(mx.max(scores, axis=-1, keepdims=True), pages_lse)
    p = mx.exp(scores - m)
    w = mx.exp(pages_lse - m)  # = sum of the page weights, rescaled to m
    return (w * pages_out + p @ tail_values) / (w + mx.sum(p, axis=-1, keepdims=True))


def decode_epilogue_reference(pages_out: mx.array, pages_lse: mx.array, queries: mx.array,
                              tail_keys: mx.array, tail_values: mx.array,
                              new_keys: mx.array | None, new_values: mx.array | None,
                              key_center: mx.array,
                              output_rotation: mx.array, out_dtype: mx.Dtype
                              ) -> tuple[mx.array, mx.array, mx.array]:
    """The decode step's epilogue in MLX ops: the contract of tqstore.metal.epilogue (which
    runs it as one kernel) and its oracle. pages_out (B, Hq, Dv) float32 value-rotated,
    pages_lse (B, Hq), queries (B, Hq, Dk) float32 scaled and unrotated; tail_keys/values
    (B, Hkv, n_old, D) and new_keys/values (B, Hkv, m, D) fp16 (None: no new token); key_center
    (Hkv, Dk) float32; output_rotation (Hkv, Dv, Dv). Returns (out (B, Hq, Dv) out_dtype, the
    next tail's keys, values (B, Hkv, n, D) fp16)."""
    B, Hq, Dk = queries.shape
    Hkv, Dv = output_rotation.shape[0], output_rotation.shape[-1]
    G = Hq // Hkv
    if new_keys is None:
        next_keys, next_values = tail_keys, tail_values
    else:
        next_keys = mx.concatenate([tail_keys, new_keys], axis=2)
        next_values = mx.concatenate([tail_values, new_values], axis=2)
    out = mx.matmul(pages_out.reshape(B, Hkv, G, Dv), output_rotation)
    keys = next_keys.astype(mx.float32) - key_center[:, None, :]
    out = merge_with_tail(out, pages_lse.reshape(B, Hkv, G, 1), queries.reshape(B, Hkv, G, Dk),
                          keys, next_values.astype(mx.float32))
    return out.reshape(B, Hq, Dv).astype(out_dtype), next_keys, next_values


def unpack_pages(pages_out: mx.array, pages_lse: mx.array | None,
                 batch: int, num_q_heads: int) -> tuple[mx.array, mx.array]:
    """(out (B, Hq, Dv), lse (B, Hq)) from the attention's output, or from its packed work
    buffer (pages_lse None: the log-sum-exp follows the B rows of output)."""
    if pages_lse is not None:
        return pages_out, pages_lse
    lse = pages_out[batch:].reshape(-1)[:batch * num_q_heads].reshape(batch, num_q_heads)
    return pages_out[:batch], lse


def batched_epilogue_reference(pages_out: mx.array, pages_lse: mx.array | None,
                               queries: mx.array, scale: float, tail_keys: mx.array,
                               tail_values: mx.array, new_keys: mx.array, new_values: mx.array,
                               tail_info: mx.array, key_center: mx.array,
                               output_rotation: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """The batched decode epilogue (tqstore.metal.batch_step, its contract) in MLX ops, row by
    row through decode_epilogue_reference: queries (B, Hq, 1, Dk) and new tokens (B, Hkv, 1, D)
    in the model's dtype, tails in block-sized fp16 buffers (B, Hkv, cap, D) whose row b holds
    n_old_b tokens, tail_info int32 [n_b, n_old_b] per row (read here as the kernel reads it,
    so a wrong one fails wherever this runs). Returns (out (B, Hq, 1, Dv) in the queries'
    dtype, the next tails (B, Hkv, cap, D): row b's old tokens, its new one, then zeros)."""
    B, Hq, _, Dk = queries.shape
    cap = tail_keys.shape[2]
    info = tail_info.reshape(-1).tolist()
    if len(info) < 2 * B or any(info[2 * b] != info[2 * b + 1] + 1 for b in range(B)):
        raise InvalidArgument(f"tail_info {info[:2 * B]} is not [n_old + 1, n_old] per row")
    old_lengths = info[1:2 * B:2]
    pages_out, pages_lse = unpack_pages(pages_out, pages_lse, B, Hq)
    q = queries[:, :, 0, :].astype(mx.float32) * scale
    new_keys, new_values = new_keys.astype(mx.float16), new_values.astype(mx.float16)
    outs, next_keys, next_values = [], [], []
    for b, n_old in enumerate(old_lengths):
        if not 0 <= n_old < cap:
            raise InvalidArgument(f"row {b} holds {n_old} tail tokens; its buffer {cap}")
        out, keys, values = decode_epilogue_reference(
            pages_out[b:b + 1], pages_lse[b:b + 1], q[b:b + 1],
            tail_keys[b:b + 1, :, :n_old], tail_values[b:b + 1, :, :n_old],
            new_keys[b:b + 1], new_values[b:b + 1], key_center, output_rotation, queries.dtype)
        pad = [(0, 0), (0, 0), (0, cap - n_old - 1), (0, 0)]
        outs.append(out)
        next_keys.append(mx.pad(keys, pad))
        next_values.append(mx.pad(values, pad))
    out = mx.concatenate(outs)
    return (out.reshape(B, Hq, 1, out.shape[-1]), mx.concatenate(next_keys),
            mx.concatenate(next_values))


def rotate_queries_reference(queries: mx.array, rotation: mx.array, scale: float) -> mx.array:
    """(B, Hq, 1, Dk) queries in the model's dtype -> (scale * q) @ R_K per kv head, (B, Hq, Dk)
    float32: the attention kernel's queries (the contract of batch_step's rotation kernel)."""
    B, Hq, _, Dk = queries.shape
    Hkv = rotation.shape[0]
    q = queries[:, :, 0, :].astype(mx.float32) * scale
    return mx.matmul(q.reshape(B, Hkv, Hq // Hkv, Dk), rotation).reshape(B, Hq, Dk)
