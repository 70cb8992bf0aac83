"""The CPU path's C kernels (tqstore/native): decode attention equals the pure-MLX reference
within float32 rounding on every bit width and layout the arenas hold, with bits that do not
depend on the thread count; the quantizer gives the codec's very bytes; a missing compiler or
TQSTORE_NATIVE=0 leaves a reason and no library (dispatch then runs the reference)."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

from tqstore.bench.attention import random_pages
from tqstore.codec import CodecConfig, layer_codecs
from tqstore.codec.profile import QualityProfile
from tqstore.metal import selfcheck
from tqstore.metal.reference import paged_decode_attention_reference
from tqstore.native import build, cpu_kernels

pytestmark = pytest.mark.skipif(build.load() is None, reason="no C compiler on this machine")

# Absolute error bound, relative to the output's largest entry: the kernel and the reference
# sum up to a few thousand float32 terms in different orders (worst case ~T * 6e-8 of the
# largest value; seen up to 2.7e-6 at T = 300 on one CI run, and at most 0.44 of a 1e-5 bound
# over 240 seeded cases), and the kernel's exp is a
# polynomial good to 3e-7. A 1% error in one codebook entry moves the output by ~1e-3.
ATOL = 2e-5

# (seq_lens, Hq, Hkv, Dk, Dv, key_bits, value_bits, block_size)
ATTENTION_CASES = [
    ([2047], 9, 3, 64, 64, 5, 3, 16),            # SmolLM2's shape and a profile's widths
    ([700, 1, 0, 33], 9, 3, 64, 64, 4, 4, 16),   # ragged, an empty sequence
    ([300, 129], 32, 8, 128, 128, 7, 6, 16),     # Llama-3-8B's shape
    ([90, 17], 4, 4, 96, 64, 2, 8, 8),           # no GQA, Dk != Dv (the generic unpacking)
    ([513], 8, 1, 64, 64, 1, 3, 64),             # one kv head: many splits of one sequence
    ([40, 40], 6, 2, 256, 256, 8, 5, 32),
]


def _attention(pages: dict):
    return cpu_kernels.decode_attention(*(pages[k] for k in (
        "queries", "key_codes", "key_scales", "value_codes", "value_scales", "block_tables",
        "seq_lens", "key_codebook", "value_codebook", "key_bits", "value_bits")))


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"h{c[1]}x{c[2]}-d{c[3]}-k{c[5]}v{c[6]}")
def test_decode_attention_equals_the_reference(rng, case):
    lens, hq, hkv, dk, dv, kb, vb, bs = case
    pages = random_pages(rng, lens, hq, hkv, dk, dv, kb, vb, bs)
    with mx.stream(mx.cpu):
        want, want_lse = (np.array(x) for x in
                          paged_decode_attention_reference(**pages, return_lse=True))
    got, lse = (np.array(x) for x in _attention(pages))
    # float32 in both, summed in other orders; the softmax's exp is a polynomial good to 3e-7
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=ATOL * np.abs(want).max())
    empty = np.array(lens) == 0
    assert np.all(got[empty] == 0) and np.all(lse[empty] == -np.inf)
    np.testing.assert_allclose(lse[~empty], want_lse[~empty], rtol=1e-6, atol=1e-5)


def test_decode_attention_bits_do_not_depend_on_threads(rng, monkeypatch):
    pages = random_pages(rng, [3000, 700], 9, 3, 64, 64, 6, 4, 16)
    one = [np.array(x) for x in _attention(pages)]
    again = [np.array(x) for x in _attention(pages)]
    # decode_threads takes THREADS only when TQSTORE_CPU_THREADS is set (a call this size
    # would otherwise stay on one thread).
    monkeypatch.setenv("TQSTORE_CPU_THREADS", "3")
    monkeypatch.setattr(cpu_kernels, "THREADS", 3)
    assert cpu_kernels.decode_threads(1) == 3
    threaded = [np.array(x) for x in _attention(pages)]
    for a, b, c in zip(one, again, threaded):
        assert a.tobytes() == b.tobytes() == c.tobytes()


@pytest.mark.parametrize("shape", [(9, 3, 64, 64, 5, 3, 16), (32, 8, 128, 128, 4, 4, 16),
                                   (4, 4, 96, 64, 6, 2, 8),
                                   # Dv = 48: 32 value lanes at a time, then 8 at a time
                                   (4, 2, 64, 48, 4, 4, 16)])
@pytest.mark.parametrize("tail", [True, False])
def test_a_fused_decode_step_equals_the_composition(shape, tail):
    """Query rotation, pages, un-rotation and the merge with the fp16 tail in one call equal
    the reference's pieces composed (what the paged cache runs without this kernel)."""
    x = selfcheck.decode_step_inputs(shape)
    if not tail:
        x["tail_keys"] = x["tail_values"] = None
    with mx.stream(mx.cpu):
        want = np.array(selfcheck.decode_step_reference(x))
    got = np.array(cpu_kernels.decode_step(
        x["queries"], x["scale"], x["query_rotation"], x["key_codes"], x["key_scales"],
        x["value_codes"], x["value_scales"], x["block_tables"], x["seq_lens"],
        x["key_codebook"], x["value_codebook"], x["tail_keys"], x["tail_values"],
        x["key_center"], x["output_rotation"], x["key_bits"], x["value_bits"]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=ATOL * np.abs(want).max())
    if tail:  # the tail matters: without it the answer differs
        x["tail_values"] = x["tail_values"] * 2
        with mx.stream(mx.cpu):
            moved = np.array(selfcheck.decode_step_reference(x))
        assert np.abs(moved - got).max() > 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("threads", [1, 3])
def test_a_batched_step_gives_each_row_its_own_step_bit_for_bit(rng, monkeypatch, threads):
    """The serving engine's batched decode step (one C call for B sequences with their own
    tables, lengths and fp16 tails: every row's units in one parallel run) equals each
    sequence's step alone on one thread, bitwise: a request's tokens never depend on who
    shares its batch, nor on how many threads ran it."""
    lens, bs, hq, hkv, d = [700, 35, 2047, 16], 16, 9, 3, 64
    pages = random_pages(rng, lens, hq, hkv, d, d, 5, 3, bs)
    step = selfcheck.decode_step_inputs((hq, hkv, d, d, 5, 3, bs))
    tails = [7, 0, 1, 15]  # fp16 tail tokens per row (0: none)
    rows = []
    for b, (n, t) in enumerate(zip(lens, tails)):
        table = mx.array(np.array(pages["block_tables"])[b:b + 1, :-(-n // bs)])
        tk = None if t == 0 else mx.array(rng.standard_normal((1, hkv, t, d)).astype(np.float16))
        tv = None if t == 0 else mx.array(rng.standard_normal((1, hkv, t, d)).astype(np.float16))
        rows.append((table, pages["seq_lens"][b:b + 1], tk, tv))
    common = dict(scale=step["scale"], query_rotation=step["query_rotation"],
                  key_codes=pages["key_codes"], key_scales=pages["key_scales"],
                  value_codes=pages["value_codes"], value_scales=pages["value_scales"],
                  key_codebook=pages["key_codebook"], value_codebook=pages["value_codebook"],
                  key_center=step["key_center"], output_rotation=step["output_rotation"],
                  key_bits=5, value_bits=3)
    monkeypatch.setenv("TQSTORE_CPU_THREADS", str(threads))
    monkeypatch.setattr(cpu_kernels, "THREADS", threads)
    batched = np.array(cpu_kernels.decode_step_rows(pages["queries"], rows=rows, **common))
    monkeypatch.setenv("TQSTORE_CPU_THREADS", "1")
    monkeypatch.setattr(cpu_kernels, "THREADS", 1)
    for b, (table, n, tk, tv) in enumerate(rows):
        alone = np.array(cpu_kernels.decode_step(
            pages["queries"][b:b + 1], block_tables=table, seq_lens=n, tail_keys=tk,
            tail_values=tv, **common))
        assert batched[b:b + 1].tobytes() == alone.tobytes(), f"row {b}"
    # The rows are really their own: another row's tail would change row 0.
    rows[0] = rows[0][:2] + rows[3][2:]
    moved = np.array(cpu_kernels.decode_step_rows(pages["queries"], rows=rows, **common))
    assert moved[0].tobytes() != batched[0].tobytes()


def test_a_wrong_codebook_is_caught(rng):
    """The tolerance above is tight enough to see a one-entry codebook error."""
    pages = random_pages(rng, [600], 9, 3, 64, 64, 4, 4, 16)
    with mx.stream(mx.cpu):
        want = np.array(paged_decode_attention_reference(**pages))
    book = np.array(pages["value_codebook"])
    book[3] *= 1.01
    pages["value_codebook"] = mx.array(book)
    got = np.array(_attention(pages)[0])
    assert np.abs(got - want).max() > 5 * ATOL * np.abs(want).max()


def _inputs(rng, heads: int, tokens: int, dim: int, dtype) -> mx.array:
    x = rng.standard_normal((2, heads, tokens, dim))
    x *= rng.choice([1e-3, 1.0, 40.0, 3e3, 6e4], size=(2, heads, tokens, 1))
    x[:, :, 0] = 0.0  # a zero vector: scale 0, the codec's safe norm
    x[:, :, 1] = 1e30 if dtype == mx.float32 else 6e4  # a scale clamped to fp16's max
    return mx.array(x.astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim,dtype", [(64, mx.float16), (128, mx.float32), (16, mx.bfloat16),
                                       (256, mx.float16)])
def test_quantize_gives_the_codecs_bytes(rng, bits, dim, dtype):
    heads = 3
    for codec in layer_codecs(CodecConfig(bits, bits, norm_correction=bits % 2 == 0), bits,
                              heads, dim):
        x = _inputs(rng, heads, 37, dim, dtype)
        with mx.stream(mx.cpu):
            want = codec.quantize(x)
            got = cpu_kernels.quantize(codec, x)
            halves = [cpu_kernels.quantize(codec, x[:, :, :20]), cpu_kernels.quantize(codec, x[:, :, 20:])]
        assert np.array_equal(np.array(got.codes), np.array(want.codes))
        assert np.array(got.scales).view(np.uint16).tobytes() == \
            np.array(want.scales).view(np.uint16).tobytes()
        assert np.array_equal(np.concatenate([np.array(h.codes) for h in halves], axis=2),
                              np.array(got.codes))


@pytest.mark.parametrize("threads", ["1", "2", "3", "8"])
def test_quantize_on_any_number_of_threads_gives_the_same_bytes(rng, monkeypatch, threads):
    """A call over many rows runs on several threads, 16-row groups split between them: every
    row's bytes are the codec's whatever the thread count (1,237 rows per head: the last group
    partial, the split uneven)."""
    monkeypatch.setenv("TQSTORE_CPU_THREADS", threads)
    monkeypatch.setattr(cpu_kernels, "THREADS", int(threads))
    codec = layer_codecs(CodecConfig(5, 3), 1, 3, 64)[0]
    x = _inputs(rng, 3, 1237, 64, mx.float16)
    assert cpu_kernels.quantize_threads(3 * 1237) == min(int(threads), 4)
    with mx.stream(mx.cpu):
        want, got = codec.quantize(x), cpu_kernels.quantize(codec, x)
    assert np.array_equal(np.array(got.codes), np.array(want.codes))
    assert np.array_equal(np.array(got.scales).view(np.uint16), np.array(want.scales).view(np.uint16))


def test_large_quantize_calls_use_every_core_and_small_ones_one(monkeypatch):
    monkeypatch.delenv("TQSTORE_CPU_THREADS", raising=False)
    monkeypatch.setattr(cpu_kernels, "usable_cores", lambda: 16)
    assert cpu_kernels.quantize_threads(cpu_kernels.PARALLEL_QUANTIZE_ROWS) == 4  # 1,024 rows each
    assert cpu_kernels.quantize_threads(100_000) == 8
    assert cpu_kernels.quantize_threads(cpu_kernels.PARALLEL_QUANTIZE_ROWS - 1) == 1
    monkeypatch.setattr(cpu_kernels, "usable_cores", lambda: 2)
    assert cpu_kernels.quantize_threads(100_000) == 2
    monkeypatch.setenv("TQSTORE_CPU_THREADS", "8")
    monkeypatch.setattr(cpu_kernels, "THREADS", 8)
    assert cpu_kernels.quantize_threads(100_000) == 8 and cpu_kernels.quantize_threads(300) == 1


def test_quantize_a_centered_codec(rng):
    """Keys around calibrated means: the center is subtracted by the codec's own op first."""
    heads, dim, layers = 3, 64, 2
    means = (rng.standard_normal((layers, heads, dim)) * 3).astype(np.float16)
    profile = QualityProfile("m", layers, heads, dim, means.tobytes())
    codec = layer_codecs(CodecConfig(5, 4, profile=profile), 1, heads, dim)[0]
    assert codec.center is not None
    x = _inputs(rng, heads, 21, dim, mx.float16)
    with mx.stream(mx.cpu):
        want, got = codec.quantize(x), cpu_kernels.quantize(codec, x)
    assert np.array_equal(np.array(got.codes), np.array(want.codes))
    assert np.array_equal(np.array(got.scales).view(np.uint16), np.array(want.scales).view(np.uint16))


def test_unavailable_builds_say_why(monkeypatch, tmp_path):
    try:
        monkeypatch.setenv("TQSTORE_NATIVE", "0")
        build.reset()
        assert build.load() is None and "TQSTORE_NATIVE=0" in build.unavailable_reason()
        monkeypatch.delenv("TQSTORE_NATIVE")
        monkeypatch.setenv("TQSTORE_NATIVE_CACHE", str(tmp_path))
        monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
        monkeypatch.setattr(build, "_compiler", lambda: "false")
        build.reset()
        assert build.load() is None and "build failed" in build.unavailable_reason()
        assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.tmp"))
    finally:
        monkeypatch.undo()
        build.reset()
    assert build.load() is not None


def test_the_build_is_cached_by_source_and_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("TQSTORE_NATIVE_CACHE", str(tmp_path))
    try:
        build.reset()
        assert build.load() is not None
        first = sorted(p.name for p in tmp_path.glob("*.so"))
        build.reset()
        assert build.load() is not None
        assert sorted(p.name for p in tmp_path.glob("*.so")) == first and len(first) == 1
    finally:
        build.reset()


@pytest.mark.parametrize("bits, dim", [(1, 64), (3, 64), (4, 128), (5, 96), (8, 64), (6, 256)])
def test_dequantize_rows_give_the_codecs_bits(rng, bits, dim):
    codec, _ = layer_codecs(CodecConfig(key_bits=bits, value_bits=bits), 2, 3, dim)
    q = codec.quantize(mx.array(rng.standard_normal((3, 41, dim)).astype(np.float32)))
    got = cpu_kernels.dequantize_rotated(codec, q)
    assert np.array(got).tobytes() == np.array(codec.dequantize_rotated(q)).tobytes()


def test_gathered_pages_equal_the_codecs_reconstruction(rng):
    """TurboQuantArena.gather_dense (C lookup, one matmul per head for the un-rotation) against
    codec.dequantize_residual / dequantize (MLX ops, the fast Walsh-Hadamard transform): float32
    rounding apart (a matmul of 64 terms: ~1e-6 of values of a few units)."""
    from tqstore.paged.arenas import TurboQuantArena

    arena = TurboQuantArena(4, 8, 16, 3, 64, 64, CodecConfig())
    keys, values = (mx.array(rng.standard_normal((3, 48, 64)).astype(np.float32)) for _ in "kv")
    ids = mx.array([5, 2, 7], dtype=mx.int32)
    arena.write(ids, None, keys, values)
    got_k, got_v = arena.gather_dense(ids, 40)
    qk, qv = arena.quantized(ids, 40)
    assert mx.abs(got_k - arena.key_codec.dequantize_residual(qk)).max().item() <= 1e-5
    assert mx.abs(got_v - arena.value_codec.dequantize(qv)).max().item() <= 1e-5
    # and close to what was written (4-bit codes: a planted wrong rotation would be far off)
    assert mx.abs(got_v - values[:, :40]).mean().item() < 0.2
