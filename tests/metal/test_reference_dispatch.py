"""The kernels' reference computes the contract's function (against float64 numpy attention),
the dispatch runs the kernel on a GPU device and falls back to the reference on the CPU device
(and says which), and the launch policy is sane. Device-dependent tests run on every device the
machine has (the `device` fixture)."""

from __future__ import annotations

import logging

import mlx.core as mx
import numpy as np
import pytest

from tqstore.codec import CodecConfig, layer_codecs
from tqstore.metal import dispatch, selfcheck
from tqstore.native import build
from tqstore.metal.attention_kernel import (MAX_SPLITS, attention_kernel, choose_num_splits,
                                            gpu_backend, kernel_paged_decode_attention)
from tqstore.metal.attention_source import AttentionGeometry
from tqstore.bench.attention import TOLERANCE, random_pages
from tqstore.codec.packing import unpack_indices
from tqstore.metal.reference import paged_decode_attention_reference

from tests.tolerance import ATTENTION_TF32, rtol


def _dense_attention(q, k, v, seq_len):
    """float64 numpy attention of one sequence: q (Hq, D), k/v (Hkv, T, D)."""
    hq, hkv = q.shape[0], k.shape[0]
    out = np.zeros((hq, v.shape[-1]))
    for h in range(hq):
        s = k[h // (hq // hkv), :seq_len] @ q[h]
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v[h // (hq // hkv), :seq_len]
    return out


def _dense_pages_attention(pages: dict, key_bits: int, value_bits: int):
    """float64 numpy attention over the pages as the contract reads them: (B, Hq, Dv) output
    (zeros for an empty sequence) and (B, Hq) natural-log log-sum-exp (-inf when empty)."""
    def dequant(codes, scales, book, bits):
        dim = codes.shape[-1] * 8 // bits
        idx = np.array(unpack_indices(codes, bits, dim))
        return np.array(book, np.float64)[idx] * np.array(scales, np.float64)[..., None]

    keys = dequant(pages["key_codes"], pages["key_scales"], pages["key_codebook"], key_bits)
    values = dequant(pages["value_codes"], pages["value_scales"], pages["value_codebook"],
                     value_bits)
    q = np.array(pages["queries"], np.float64)
    tables, lens = np.array(pages["block_tables"]), np.array(pages["seq_lens"])
    bsz, hq, _ = q.shape
    hkv = keys.shape[1]
    out, lse = np.zeros((bsz, hq, values.shape[-1])), np.full((bsz, hq), -np.inf)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        k = keys[tables[b]].transpose(1, 0, 2, 3).reshape(hkv, -1, keys.shape[-1])[:, :n]
        v = values[tables[b]].transpose(1, 0, 2, 3).reshape(hkv, -1, values.shape[-1])[:, :n]
        for h in range(hq):
            s = k[h // (hq // hkv)] @ q[b, h]
            m = s.max()
            e = np.exp(s - m)
            out[b, h] = (e / e.sum()) @ v[h // (hq // hkv)]
            lse[b, h] = m + np.log(e.sum())
    return out, lse


def test_reference_matches_codec_dequantize_and_dense_attention(rng, device):
    """Pages filled by the real codec: the reference equals attention over dequantized K/V."""
    hq, hkv, d, bs, lens = 8, 2, 64, 16, [37, 5]
    kc, vc = layer_codecs(CodecConfig(4, 3), 0, hkv, d)
    max_blocks = 3
    nblocks = 1 + 2 * max_blocks
    arr = {k: np.zeros(s, dtype=t) for k, s, t in [
        ("kcode", (nblocks, hkv, bs, d // 2), np.uint8), ("ksc", (nblocks, hkv, bs), np.float16),
        ("vcode", (nblocks, hkv, bs, d * 3 // 8), np.uint8), ("vsc", (nblocks, hkv, bs), np.float16)]}
    tables = rng.permutation(np.arange(1, nblocks))[: 2 * max_blocks].reshape(2, max_blocks)
    q = rng.standard_normal((2, hq, d)).astype(np.float32)
    out_expect = []
    for b, n in enumerate(lens):
        k = mx.array(rng.standard_normal((hkv, n, d)).astype(np.float32))
        v = mx.array(rng.standard_normal((hkv, n, d)).astype(np.float32))
        qk, qv = kc.quantize(k), vc.quantize(v)
        for t in range(n):
            blk, slot = tables[b, t // bs], t % bs
            arr["kcode"][blk, :, slot] = np.array(qk.codes[:, t])
            arr["ksc"][blk, :, slot] = np.array(qk.scales[:, t])
            arr["vcode"][blk, :, slot] = np.array(qv.codes[:, t])
            arr["vsc"][blk, :, slot] = np.array(qv.scales[:, t])
        kd = np.array(kc.dequantize_rotated(qk), dtype=np.float64)
        vd = np.array(vc.dequantize_rotated(qv), dtype=np.float64)
        out_expect.append(_dense_attention(q[b].astype(np.float64), kd, vd, n))
    got = paged_decode_attention_reference(
        mx.array(q), mx.array(arr["kcode"]), mx.array(arr["ksc"]), mx.array(arr["vcode"]),
        mx.array(arr["vsc"]), mx.array(tables.astype(np.int32)), mx.array(np.array(lens, np.int32)),
        kc.codebook, vc.codebook, 4, 3)
    want = np.stack(out_expect)
    scale = np.abs(want).max()  # TF32's error is relative to the output's scale, not each entry
    np.testing.assert_allclose(np.array(got), want, rtol=rtol(2e-4, ATTENTION_TF32),
                               atol=rtol(2e-5, ATTENTION_TF32 * scale))


def test_reference_on_ragged_gqa_equals_float64_attention(rng, device):
    """Ragged lengths across more tokens than one online-softmax chunk, GQA, 4/2 bits."""
    pages = random_pages(rng, [1, 40, 2100], 12, 4, 64, 64, 4, 2, 8)
    out, lse = paged_decode_attention_reference(**pages, return_lse=True)
    want, want_lse = _dense_pages_attention(pages, 4, 2)
    scale = np.abs(want).max()  # TF32's error is relative to the output's scale, not each entry
    np.testing.assert_allclose(np.array(out), want, rtol=rtol(1e-4, ATTENTION_TF32),
                               atol=rtol(1e-5, ATTENTION_TF32 * scale))
    np.testing.assert_allclose(np.array(lse), want_lse, rtol=rtol(1e-5, ATTENTION_TF32),
                               atol=rtol(1e-5, ATTENTION_TF32))


def test_zero_length_sequence_gives_zeros(rng, device):
    """As the kernels do: zeros and an lse of -inf, never 0/0."""
    pages = random_pages(rng, [0, 20], 4, 2, 64, 64, 4, 4, 16)
    out, lse = (np.array(x) for x in paged_decode_attention_reference(**pages, return_lse=True))
    assert np.all(out[0] == 0) and np.all(np.isfinite(out)) and np.any(out[1] != 0)
    assert np.all(lse[0] == -np.inf) and np.all(np.isfinite(lse[1]))


@pytest.fixture
def native_off(monkeypatch):
    """This process as if the C kernels could not be built (no compiler)."""
    monkeypatch.setenv("TQSTORE_NATIVE", "0")
    build.reset()
    selfcheck.reset()
    yield
    monkeypatch.delenv("TQSTORE_NATIVE")
    build.reset()
    selfcheck.reset()


def test_dispatch_runs_the_gpu_kernel_on_a_gpu_and_the_c_kernel_on_the_cpu(rng, device, caplog):
    pages = random_pages(rng, [50, 3], 8, 2, 64, 64, 4, 4, 16)
    dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="tqstore.metal"):
        out = dispatch.paged_decode_attention(**pages)
        dispatch.paged_decode_attention(**pages)
    logged = [r.getMessage() for r in caplog.records if "TurboQuant pages runs on" in r.getMessage()]
    assert len(logged) == 1  # said once, not at every call
    want, _ = _dense_pages_attention(pages, 4, 4)
    if device == "cpu":
        assert gpu_backend() is None
        assert attention_kernel(AttentionGeometry(128, 128, 4, 4, 16, 32, 8), True) is None
        assert kernel_paged_decode_attention(**pages) is None
        assert dispatch.active_backend() == "cpu-kernel"
        assert logged[0].endswith("cpu-kernel")
        # float32 throughout, another summation order than the reference's matmuls
        np.testing.assert_allclose(np.array(out), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    else:
        assert gpu_backend() in ("cuda", "metal")
        assert "-kernel" in dispatch.active_backend() and "-kernel" in logged[0]
        _, abs_tol, _ = TOLERANCE["mma"]  # the looser kernel's (tensor cores round to fp16)
        np.testing.assert_allclose(np.array(out), want, rtol=abs_tol, atol=abs_tol)


def test_without_the_c_kernels_the_cpu_runs_the_reference(rng, native_off, caplog):
    pages = random_pages(rng, [50, 3], 8, 2, 64, 64, 4, 4, 16)
    with mx.stream(mx.cpu), caplog.at_level(logging.WARNING, logger="tqstore"):
        out = dispatch.paged_decode_attention(**pages)
        assert dispatch.active_backend().startswith("reference:")
        assert "cpu-kernel" in dispatch.active_backend()  # and says what is missing
        assert np.array_equal(np.array(out), np.array(paged_decode_attention_reference(**pages)))
    assert any("TQSTORE_NATIVE=0" in r.getMessage() for r in caplog.records)


def test_forcing_the_kernel_without_any_kernel_raises(rng, device, native_off):
    pages = random_pages(rng, [5], 4, 4, 64, 64, 4, 4, 16)
    dispatch.force_backend("kernel")
    try:
        if device == "cpu":
            with pytest.raises(RuntimeError, match="no kernel serves"):
                dispatch.paged_decode_attention(**pages)
        else:
            assert dispatch.paged_decode_attention(**pages).shape == (1, 4, 64)
    finally:
        dispatch.force_backend(None)
    with pytest.raises(ValueError):
        dispatch.force_backend("fast")


@pytest.mark.parametrize("batch,hkv,tokens,expect", [
    (1, 8, 131072, 128), (8, 8, 131072, 16), (1, 8, 4096, 8), (1, 8, 300, 1), (8, 8, 4096, 8),
    (64, 8, 32768, 2), (1, 1, 10**7, MAX_SPLITS)])
def test_choose_num_splits(batch, hkv, tokens, expect):
    assert choose_num_splits(batch, hkv, tokens) == expect


def test_geometry_validation_and_lanes():
    assert AttentionGeometry(128, 128, 4, 4, 16, 32, 8).lanes_per_token == 8
    assert AttentionGeometry(96, 64, 4, 4, 16, 4, 4).lanes_per_token == 4
    assert AttentionGeometry(8, 8, 4, 4, 16, 4, 4).lanes_per_token == 1
    with pytest.raises(ValueError):
        AttentionGeometry(128, 128, 4, 4, 16, 30, 8)
    with pytest.raises(ValueError):
        AttentionGeometry(100, 128, 4, 4, 16, 32, 8)


def test_quantize_dispatch_uses_the_kernel_on_a_gpu_and_the_codec_on_the_cpu(device):
    """On a GPU, the kernel's codes are the codec's, byte for byte, as the codec computes them in
    fp32 on the CPU (on the GPU stream the codec's rotation matmul would round through TF32)."""
    from tqstore.metal.quantize import kernel_quantize, quantize_kernel_fits

    kc, _ = layer_codecs(CodecConfig(4, 4), 3, 2, 64)
    x = mx.random.normal((1, 2, 9, 64))
    assert quantize_kernel_fits(kc)
    assert (kernel_quantize(kc, x) is None) == (device == "cpu")
    got = dispatch.quantize(kc, x)
    with mx.stream(mx.cpu):
        ref = kc.quantize(x)
    assert np.array_equal(np.array(got.codes), np.array(ref.codes))
    assert np.array_equal(np.array(got.scales.view(mx.uint16)), np.array(ref.scales.view(mx.uint16)))
    odd, _ = layer_codecs(CodecConfig(4, 4), 0, 2, 96)  # 96 = 32 * 3: dense mix, no kernel
    assert not quantize_kernel_fits(odd)


def test_cli_exposes_bench_attention():
    from tqstore.cli import build_parser

    args = build_parser().parse_args(["bench", "attention", "--json", "--skip-timing"])
    assert args.json == "-" and args.skip_timing and callable(args.run)


def test_kernel_kind_picks_the_mma_kernel_where_it_fits():
    from tqstore.metal.attention_kernel import kernel_kind

    def kind(hq, hkv, dk, dv, kb, vb, bs, backend="cuda", requested=None):
        q = mx.zeros((1, hq, dk))
        kc = mx.zeros((2, hkv, bs, dk * kb // 8), dtype=mx.uint8)
        vc = mx.zeros((2, hkv, bs, dv * vb // 8), dtype=mx.uint8)
        return kernel_kind(q, kc, vc, kb, vb, backend, requested)

    assert kind(32, 8, 128, 128, 4, 4, 16) == "mma"
    assert kind(9, 3, 64, 64, 4, 4, 32) == "mma"
    assert kind(8, 1, 128, 128, 4, 4, 256) == "mma"        # G = 8
    assert kind(32, 8, 128, 128, 4, 4, 16, backend="metal") == "portable"
    assert kind(32, 8, 128, 128, 4, 4, 16, requested="portable") == "portable"
    for args in [(32, 8, 128, 128, 3, 4, 16), (32, 8, 128, 128, 4, 8, 16), (9, 3, 64, 64, 4, 4, 8),
                 (32, 2, 128, 128, 4, 4, 16), (4, 4, 80, 128, 4, 4, 16), (4, 4, 128, 96, 4, 4, 16)]:
        assert kind(*args) == "portable", args            # bits, block 8, G = 16, dims
        with pytest.raises(ValueError, match="does not fit"):
            kind(*args, requested="mma")
    with pytest.raises(ValueError):
        kind(32, 8, 128, 128, 4, 4, 16, requested="fast")


def test_dispatch_returns_the_log_sum_exp_on_request(rng, device):
    """return_lse (the decode epilogue merges the pages' softmax with the fp16 tail): the kernel's
    and the CPU fallback's lse is float64 attention's, natural log, -inf for an empty sequence."""
    pages = random_pages(rng, [40, 1, 129, 0], 8, 2, 64, 64, 4, 4, 16)
    out, lse = dispatch.paged_decode_attention(**pages, return_lse=True)
    want, want_lse = _dense_pages_attention(pages, 4, 4)
    assert lse.shape == (4, 8)
    # the CPU reference is fp32; a GPU kernel may be the tensor-core one (fp16 products)
    _, abs_tol, lse_tol = TOLERANCE["mma"] if device == "gpu" else (None, 1e-5, 1e-5)
    np.testing.assert_allclose(np.array(out), want, rtol=10 * abs_tol, atol=abs_tol)
    np.testing.assert_allclose(np.array(lse), want_lse, rtol=lse_tol, atol=lse_tol)
    assert np.all(np.isneginf(np.array(lse)[3])) and np.all(np.array(out)[3] == 0)
