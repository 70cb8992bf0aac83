"""The kernels' reference, decode attention over compressed pages (tqstore.metal.reference), ==
dequantize-then-SDPA in float64, to 1e-5 relative on the CPU (TF32 on a GPU: tests/tolerance.py);
and so is the dispatch's path."""

import numpy as np
import pytest

import tqstore  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx
from tqstore.codec import CodecConfig, QuantizedVectors, layer_codecs
from tqstore.metal.dispatch import paged_decode_attention
from tqstore.metal.reference import paged_decode_attention_reference

from tests.tolerance import ATTENTION_TF32, rtol


def random_arena(rng, num_blocks, hkv, bs, dk, dv, kbits, vbits):
    kc = rng.integers(0, 256, (num_blocks, hkv, bs, dk * kbits // 8), dtype=np.uint8)
    vc = rng.integers(0, 256, (num_blocks, hkv, bs, dv * vbits // 8), dtype=np.uint8)
    ks = rng.uniform(0.2, 3.0, (num_blocks, hkv, bs)).astype(np.float16)
    vs = rng.uniform(0.2, 3.0, (num_blocks, hkv, bs)).astype(np.float16)
    return [mx.array(a) for a in (kc, ks, vc, vs)]


def oracle(queries, arena, table, seq_len, kcodec, vcodec, scale):
    """Dequantize the sequence's tokens with the codec, then softmax attention in float64."""
    kc, ks, vc, vs = arena
    ids = mx.array(table)
    def gather(a):
        pages = mx.swapaxes(a[ids], 0, 1)
        return pages.reshape(pages.shape[0], -1, *pages.shape[3:])[:, :seq_len]
    k = np.array(kcodec.dequantize(QuantizedVectors(gather(kc), gather(ks))), dtype=np.float64)
    v = np.array(vcodec.dequantize(QuantizedVectors(gather(vc), gather(vs))), dtype=np.float64)
    q = np.array(queries, dtype=np.float64)  # (Hq, Dk), unrotated
    hq, hkv = q.shape[0], k.shape[0]
    out = []
    for h in range(hq):
        g = h // (hq // hkv)
        s = scale * (k[g] @ q[h])
        p = np.exp(s - s.max())
        out.append((p / p.sum()) @ v[g])
    return np.stack(out)


@pytest.mark.parametrize("bs,hq,hkv,dk,dv,kbits,vbits", [
    (4, 6, 2, 16, 16, 4, 4),
    (16, 9, 3, 64, 64, 4, 4),
    (16, 8, 2, 32, 48, 8, 3),
    (32, 4, 4, 64, 64, 3, 2),
    (1, 4, 1, 24, 24, 4, 8),
])
def test_reference_equals_dequantize_then_sdpa(rng, device, bs, hq, hkv, dk, dv, kbits, vbits):
    kcodec, vcodec = layer_codecs(CodecConfig(kbits, vbits, seed=int(rng.integers(1 << 30))),
                                  int(rng.integers(30)), hkv, dk, dv)
    num_blocks = 96
    arena = random_arena(rng, num_blocks, hkv, bs, dk, dv, kbits, vbits)
    B = 4
    # Ragged lengths, shared prefix: every sequence starts with the same 2 physical blocks.
    lens = [int(rng.integers(1, 20 * bs)) for _ in range(B)]
    lens[0] = 1
    lens[1] = 2 * bs + 1
    max_blocks = max(-(-n // bs) for n in lens) + 1
    free = list(rng.permutation(np.arange(3, num_blocks)))
    tables = np.zeros((B, max_blocks), dtype=np.int32)
    for b, n in enumerate(lens):
        nb = -(-n // bs)
        own = [1, 2][:nb] + [int(free.pop()) for _ in range(max(0, nb - 2))]
        tables[b, :nb] = own  # entries beyond a sequence's length stay 0 (the null block)
    scale = dk ** -0.5
    q = mx.array(rng.standard_normal((B, hq, dk)).astype(np.float32) * 2)
    qr = kcodec.rotate((q * scale).reshape(B, hkv, hq // hkv, dk)).reshape(B, hq, dk)
    out = paged_decode_attention_reference(
        qr, *arena, mx.array(tables), mx.array(lens, dtype=mx.int32),
        kcodec.codebook, vcodec.codebook, kbits, vbits)
    assert out.shape == (B, hq, dv) and out.dtype == mx.float32
    out = vcodec.unrotate(out.reshape(B, hkv, hq // hkv, dv)).reshape(B, hq, dv)
    for b in range(B):
        want = oracle(q[b], arena, tables[b, : -(-lens[b] // bs)], lens[b], kcodec, vcodec, scale)
        got = np.array(out[b], dtype=np.float64)
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel < rtol(1e-5, ATTENTION_TF32), (b, lens[b], rel)


def test_long_context_crosses_online_softmax_chunks(rng):
    """More tokens than one reference chunk: the running max/sum merge must be exact."""
    bs, hkv, hq, d = 16, 2, 4, 32
    kcodec, vcodec = layer_codecs(CodecConfig(4, 4), 3, hkv, d)
    arena = random_arena(rng, 400, hkv, bs, d, d, 4, 4)
    n = 5000
    table = np.array([rng.permutation(np.arange(1, 400))[: -(-n // bs)]], dtype=np.int32)
    q = mx.array(rng.standard_normal((1, hq, d)).astype(np.float32) * 3)
    qr = kcodec.rotate((q * d ** -0.5).reshape(1, hkv, 2, d)).reshape(1, hq, d)
    out = paged_decode_attention(qr, *arena, mx.array(table), mx.array([n], dtype=mx.int32),
                                 kcodec.codebook, vcodec.codebook, 4, 4)
    out = vcodec.unrotate(out.reshape(1, hkv, 2, d)).reshape(hq, d)
    want = oracle(q[0], arena, table[0], n, kcodec, vcodec, d ** -0.5)
    assert np.abs(np.array(out) - want).max() / np.abs(want).max() < 1e-5


def test_entries_beyond_length_are_ignored(rng):
    kcodec, vcodec = layer_codecs(CodecConfig(4, 4), 0, 1, 16)
    arena = random_arena(rng, 8, 1, 4, 16, 16, 4, 4)
    q = mx.array(rng.standard_normal((1, 2, 16)).astype(np.float32))
    args = (kcodec.codebook, vcodec.codebook, 4, 4)
    a = paged_decode_attention(q, *arena, mx.array([[3, 5, 0, 0]]), mx.array([6]), *args)
    b = paged_decode_attention(q, *arena, mx.array([[3, 5, 7, 2]]), mx.array([6]), *args)
    c = paged_decode_attention(q, *arena, mx.array([[3, 6, 0, 0]]), mx.array([6]), *args)
    assert np.array_equal(np.array(a), np.array(b))
    assert not np.allclose(np.array(a), np.array(c))
