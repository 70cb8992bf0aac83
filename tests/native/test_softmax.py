"""The C row softmax of multi-token attention steps (tqstore/native/tq_softmax.c) and the CPU
path built on it (tqstore.metal.multi_token): equal to MLX's softmax and
scaled_dot_product_attention within float32 rounding for every mask kind, causal limits
honoured without reading past them, bits independent of the thread count, and the first-use
self-check catching a broken kernel."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from tqstore.metal import dispatch, selfcheck
from tqstore.metal.multi_token import cpu_multi_token_attention
from tqstore.native import build, cpu_kernels

pytestmark = pytest.mark.skipif(build.load() is None, reason="no C compiler on this machine")


@pytest.fixture(autouse=True)
def on_the_cpu():
    """These paths serve on the CPU only (dispatch declines where a GPU is the default
    device); on the GPU machine and on Macs the tests still run them, on the CPU stream."""
    with mx.stream(mx.cpu):
        yield

# Softmax weights: the kernel's exp is a polynomial good to 3e-7 relative, MLX's CPU exp is an
# approximation of its own, the sums run in other orders and the kernel multiplies by 1/sum:
# up to 2.5e-6 relative was seen (40 seeded 132 x 300 cases and the suite's seeds); 1e-5 is
# 4x that. A weight off by one term's share (1/T) is far outside it.
WEIGHT_RTOL = 1e-5
# Attention outputs are weighted means of unit-normal values: the weights' error times |v|
# (a few units), plus the matmuls' float32 rounding; 1e-5 absolute, as the self-check uses.
OUT_ATOL = 1e-5


def _scores(rng, rows: int, T: int) -> mx.array:
    return mx.array((rng.standard_normal((rows, T)) * 4).astype(np.float32))


@pytest.mark.parametrize("L, T, heads", [(7, 19, 3), (1, 1, 1), (64, 64, 2), (33, 300, 4)])
def test_causal_rows_equal_mlx_softmax_and_zero_past_the_limit(rng, L, T, heads):
    scores = _scores(rng, heads * L, T)
    limit = (T - L + np.arange(heads * L) % L + 1)[:, None]
    allowed = np.arange(T)[None, :] < limit
    want = mx.softmax(mx.where(mx.array(allowed), scores, -mx.inf), axis=-1, precise=True)
    # Past the limit the kernel must not even read: poison it with NaN.
    poisoned = mx.where(mx.array(allowed), scores, mx.nan)
    got = cpu_kernels.softmax_rows(poisoned, L, causal=True)
    got, want = np.array(got), np.array(want)
    assert np.all(got[~allowed] == 0.0)
    np.testing.assert_allclose(got, want, rtol=WEIGHT_RTOL, atol=1e-12)


def test_masked_entries_become_zero_and_nan_stays_visible(rng):
    scores = np.array(_scores(rng, 6, 40))
    scores[1, ::2] = -np.inf
    scores[3, :] = -np.inf  # fully masked: NaN, as MLX gives
    scores[5, 7] = np.nan  # a NaN score poisons its row rather than vanishing
    got = np.array(cpu_kernels.softmax_rows(mx.array(scores), 6, causal=False))
    want = np.array(mx.softmax(mx.array(scores[[0, 1, 2, 4]]), axis=-1, precise=True))
    assert np.all(got[1, ::2] == 0.0)
    assert np.all(np.isnan(got[3])) and np.isnan(got[5]).any()
    np.testing.assert_allclose(got[[0, 1, 2, 4]], want, rtol=WEIGHT_RTOL, atol=1e-12)


def test_bits_do_not_depend_on_the_thread_count(rng, monkeypatch):
    scores = np.array(_scores(rng, 3 * 227, 2241))  # over a million elements: threads split it
    outs = []
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("TQSTORE_CPU_THREADS", threads)
        monkeypatch.setattr(cpu_kernels, "THREADS", int(threads))
        outs.append(np.array(cpu_kernels.softmax_rows(mx.array(scores), 227, causal=True)))
    assert outs[0].tobytes() == outs[1].tobytes() == outs[2].tobytes()


def _inputs(rng, hq, hkv, L, T, d, dv, dtype=mx.float32):
    return [mx.array(rng.standard_normal(s).astype(np.float32)).astype(dtype)
            for s in ((1, hq, L, d), (1, hkv, T, d), (1, hkv, T, dv))]


@pytest.mark.parametrize("kind", ["none", "causal", "bool", "additive"])
@pytest.mark.parametrize("hq, hkv, L, T, d, dv", [(9, 3, 33, 80, 64, 64), (4, 4, 5, 5, 32, 16)])
def test_multi_token_attention_equals_mlx_sdpa(rng, kind, hq, hkv, L, T, d, dv):
    q, k, v = _inputs(rng, hq, hkv, L, T, d, dv)
    allowed = (rng.random((L, T)) < 0.6) | np.eye(L, T, k=T - L, dtype=bool)
    mask = {"none": None, "causal": "causal", "bool": mx.array(allowed),
            "additive": mx.array(np.where(allowed, 0.0, -np.inf).astype(np.float32))}[kind]
    got = cpu_multi_token_attention(q, k, v, 0.125, mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    assert got.shape == want.shape and got.dtype == q.dtype
    assert mx.abs(got - want).max().item() <= OUT_ATOL


def test_half_precision_queries_come_back_in_their_dtype(rng):
    q, k, v = _inputs(rng, 9, 3, 16, 40, 64, 64, mx.bfloat16)
    got = cpu_multi_token_attention(q, k, v, 0.125, "causal")
    want = mx.fast.scaled_dot_product_attention(*(x.astype(mx.float32) for x in (q, k, v)),
                                                scale=0.125, mask="causal")
    assert got.dtype == mx.bfloat16
    # computed in float32, rounded once to bfloat16 (8 bits of mantissa: 2^-8 relative)
    assert mx.abs(got.astype(mx.float32) - want).max().item() <= 2 ** -8 * 4


def test_calls_it_does_not_take_are_declined(rng):
    q, k, v = _inputs(rng, 4, 2, 8, 6, 16, 16)
    assert cpu_multi_token_attention(q, k, v, 0.25, "causal") is None  # L > T
    assert cpu_multi_token_attention(q, k, v, 0.25, "sliding") is None  # unknown mask
    q3, k3, v3 = _inputs(rng, 3, 2, 4, 6, 16, 16)
    assert cpu_multi_token_attention(q3, k3, v3, 0.25, None) is None  # 3 heads over 2


def test_a_broken_softmax_fails_the_self_check_and_mlx_serves(rng, monkeypatch):
    selfcheck.reset()
    real = cpu_kernels.softmax_rows

    def unnormalised(scores, L, causal):  # a planted bug: weights off by a constant factor
        out = real(scores, L, causal)
        return None if out is None else out * 1.01

    monkeypatch.setattr(cpu_kernels, "softmax_rows", unnormalised)
    q, k, v = _inputs(rng, 9, 3, 12, 30, 64, 64)
    try:
        assert dispatch.multi_token_attention(q, k, v, 0.125, "causal") is None
        assert dispatch.kernel_report()[dispatch.CPU_SOFTMAX].startswith("disabled")
    finally:
        selfcheck.reset()
    monkeypatch.setattr(cpu_kernels, "softmax_rows", real)
    got = dispatch.multi_token_attention(q, k, v, 0.125, "causal")
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    assert got is not None and mx.abs(got - want).max().item() <= OUT_ATOL
    assert dispatch.kernel_report()[dispatch.CPU_SOFTMAX].startswith("ok")
