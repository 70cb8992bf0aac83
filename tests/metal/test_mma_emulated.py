"""The generated CUDA kernels run on the CPU emulator (tests/metal/cuda_emu.h) against the fp32
reference (tqstore.metal.reference): the tensor-core kernel's fragment layouts, dim/token
permutations, GQA padding, split and merge (fused into the split launch, and the separate merge
pass), ragged and empty sequences; and its error is the fp16 rounding it documents (a numpy
model with exactly those roundings agrees with it far more closely than the reference)."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

from tests.metal.emulate import run_emulated
from tqstore.bench.attention import TOLERANCE, random_pages
from tqstore.metal.reference import paged_decode_attention_reference

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")

LOG2E = np.float32(1.4426950408889634)



def _oracle(pages: dict) -> tuple[np.ndarray, np.ndarray]:
    """The reference's output and lse, in fp32 on the CPU stream (a GPU stream would round its
    matmuls through TF32, looser than the emulated kernels it judges)."""
    with mx.stream(mx.cpu):
        return tuple(np.array(x) for x in paged_decode_attention_reference(**pages, return_lse=True))

def _unpack4(codes: np.ndarray) -> np.ndarray:
    lo, hi = codes & 0x0F, codes >> 4
    return np.stack([lo, hi], axis=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)


def fp16_model(pages: dict) -> np.ndarray:
    """Attention with q (log2 units), codebook values and p * value_norm rounded to fp16
    (p against the sequence's final max), everything else in fp32: what the MMA kernel does up
    to its running-max rescaling and summation order."""
    f16 = lambda x: np.asarray(x, np.float32).astype(np.float16).astype(np.float32)  # noqa: E731
    q = np.array(pages["queries"])
    kc, vc = np.array(pages["key_codes"]), np.array(pages["value_codes"])
    ks = np.array(pages["key_scales"]).astype(np.float32)
    vs = np.array(pages["value_scales"]).astype(np.float32)
    tables, lens = np.array(pages["block_tables"]), np.array(pages["seq_lens"])
    ck, cv = f16(np.array(pages["key_codebook"])), f16(np.array(pages["value_codebook"]))
    bsz, hq, _ = q.shape
    hkv, bs = kc.shape[1], kc.shape[2]
    out = np.zeros((bsz, hq, vc.shape[-1] * 2), np.float32)
    for b in range(bsz):
        n = int(lens[b])
        if n == 0:
            continue
        blk, slot = tables[b, np.arange(n) // bs], np.arange(n) % bs
        for h in range(hq):
            kv = h // (hq // hkv)
            keys = ck[_unpack4(kc[blk, kv, slot])]
            vals = cv[_unpack4(vc[blk, kv, slot])]
            s = (keys @ f16(q[b, h] * LOG2E)) * ks[blk, kv, slot]
            p = np.exp2(s - s.max())
            out[b, h] = (f16(p * vs[blk, kv, slot]) @ vals) / p.sum()
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# (seq_lens, Hq, Hkv, Dk, Dv, block_size, splits, warps, depth)
MMA_CASES = [
    ([1, 17, 300, 900], 32, 8, 128, 128, 16, 1, 4, 2),    # Llama-3-8B heads, single pass
    ([1, 17, 300, 900], 32, 8, 128, 128, 16, 3, 4, 2),    # ... split-K + merge
    ([129, 1000], 9, 3, 64, 64, 16, None, 2, 1),          # SmolLM2 shape, G = 3
    ([700, 64], 4, 4, 96, 64, 64, 3, 1, 3),               # MHA, Dk != Dv, 3 words per lane
    ([0, 3000], 8, 1, 128, 128, 256, 4, 4, 2),            # G = 8 (full n tile), empty sequence
    ([250, 77], 14, 2, 128, 128, 32, 2, 8, 1),            # G = 7, 8 warps
    # Llama-3-8B's default launch (8 warps, depth 1) with more splits than the merge loads in
    # one round (16 at G = 4): its later rounds, as the GPU's 33 splits run them.
    ([17, 900], 32, 8, 128, 128, 16, 20, 8, 1),
]


@pytest.mark.parametrize("case", MMA_CASES, ids=lambda c: f"h{c[1]}x{c[2]}_d{c[3]}_bs{c[5]}_s{c[6]}")
def test_mma_kernel_on_the_emulator(case, tmp_path):
    lens, hq, hkv, dk, dv, bs, splits, warps, depth = case
    rng = np.random.default_rng(sum(lens) + hq)
    import mlx.core as mx
    mx.random.seed(sum(lens) + dk)
    pages = random_pages(rng, lens, hq, hkv, dk, dv, 4, 4, bs)
    got, lse = run_emulated(pages, "mma", splits, tmp_path, warps=warps, depth=depth)
    ref, ref_lse = _oracle(pages)
    _check(got, lse, ref, ref_lse, lens, "mma")
    assert _rel(got, fp16_model(pages)) < 3e-4  # the error is the fp16 rounding, nothing else


@pytest.mark.parametrize("case", [MMA_CASES[1], MMA_CASES[4]],
                         ids=lambda c: f"h{c[1]}x{c[2]}_s{c[6]}")
def test_mma_fused_merge_is_schedule_independent(case, tmp_path):
    """The fused merge gives the same bits whichever threadgroup merges (splits run first to
    last, or last to first), and the same bits as the separate merge pass (same arithmetic)."""
    lens, hq, hkv, dk, dv, bs, splits, warps, depth = case
    rng = np.random.default_rng(sum(lens) + hq + 1)
    import mlx.core as mx
    mx.random.seed(sum(lens) + dk + 1)
    pages = random_pages(rng, lens, hq, hkv, dk, dv, 4, 4, bs)
    runs = {}
    for name, fused, reverse in (("fused", True, False), ("fused-reversed", True, True),
                                 ("separate", False, False)):
        sub = tmp_path / name
        sub.mkdir()
        runs[name] = run_emulated(pages, "mma", splits, sub, warps=warps, depth=depth,
                                  fused=fused, reverse=reverse)
    ref, ref_lse = _oracle(pages)
    _check(*runs["fused"], ref, ref_lse, lens, "mma")
    for name in ("fused-reversed", "separate"):
        for a, b in zip(runs["fused"], runs[name]):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), name


def rotated_queries(raw: np.ndarray, rotation: np.ndarray, scale: float) -> np.ndarray:
    """(B, Hq, 1, Dk) -> (B, Hq, Dk): batch_step.rotate_body's float32 arithmetic, in its
    order (scale * q rounded, then each output summed over i = 0..Dk-1, products rounded)."""
    bsz, hq, _, dk = raw.shape
    qs = (raw[:, :, 0, :] * np.float32(scale)).astype(np.float32)
    rows = rotation[np.arange(hq) // (hq // rotation.shape[0])]  # (Hq, Dk, Dk)
    acc = np.zeros((bsz, hq, dk), np.float32)
    for i in range(dk):
        product = (qs[:, :, i:i + 1] * rows[None, :, i, :]).astype(np.float32)
        acc = (acc + product).astype(np.float32)
    return acc


@pytest.mark.parametrize("case,reverse", [(MMA_CASES[0], False), (MMA_CASES[3], True),
                                          (MMA_CASES[4], False), (MMA_CASES[5], True)],
                         ids=lambda c: f"h{c[1]}x{c[2]}_d{c[3]}x{c[4]}_s{c[6]}"
                         if isinstance(c, tuple) else ("rev" if c else "fwd"))
def test_mma_step_form_folds_the_rotation_in_and_owns_its_counters(case, reverse, tmp_path):
    """The step form (MmaGeometry.step) gives the bits of the rotation kernel's float32 sums
    followed by the plain kernel (GQA groups of 1, 4, 7 and 8, Dk != Dv, single pass and
    split-K, splits run last to first too; Llama-3's heads split: the GPU self-check's); its work buffer needs no zero-fill (NaNs before
    each launch here); the merging threadgroups leave the caller's counters at zero, so each
    of two launches on the same counters gives those bits."""
    lens, hq, hkv, dk, dv, bs, splits, warps, depth = case
    rng = np.random.default_rng(sum(lens) + hq + 2)
    mx.random.seed(sum(lens) + dk + 2)
    pages = random_pages(rng, lens, hq, hkv, dk, dv, 4, 4, bs)
    raw = (rng.standard_normal((len(lens), hq, 1, dk)) * 3).astype(np.float32)
    rotation = np.linalg.qr(rng.standard_normal((hkv, dk, dk)))[0].astype(np.float32)
    scale = dk ** -0.5
    plain_dir, step_dir = tmp_path / "plain", tmp_path / "step"
    plain_dir.mkdir()
    step_dir.mkdir()
    want = run_emulated(dict(pages, queries=mx.array(rotated_queries(raw, rotation, scale))),
                        "mma", splits, plain_dir, warps=warps, depth=depth)
    got = run_emulated(pages, "mma", splits, step_dir, warps=warps, depth=depth,
                       reverse=reverse, step=dict(queries=raw, rotation=rotation, scale=scale),
                       launches=2)
    runs = [got]
    if (step_dir / "out_0.bin").exists():  # split-K: every launch's outputs were kept
        runs = [tuple(np.fromfile(step_dir / f"{name}_{k}.bin", np.float32).reshape(x.shape)
                      for name, x in zip(("out", "lse"), got)) for k in range(2)]
    for run in runs:
        for a, b in zip(run, want):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert not np.any(np.fromfile(step_dir / "arrivals.bin", dtype=np.int32))


def _check(got, lse, ref, ref_lse, lens, kind):
    tol_rel, tol_abs, tol_lse = TOLERANCE[kind]
    assert np.all(np.isfinite(got))
    assert _rel(got, ref) < tol_rel and np.max(np.abs(got - ref)) < tol_abs
    for b, n in enumerate(lens):
        if n == 0:
            assert np.all(got[b] == 0) and np.all(lse[b] == -np.inf)
        else:
            assert np.all(np.abs(lse[b] - ref_lse[b]) < tol_lse)


def test_portable_cuda_kernel_on_the_emulator(tmp_path):
    lens = [129, 1000, 0]
    pages = random_pages(np.random.default_rng(3), lens, 9, 3, 64, 64, 3, 4, 8)
    ref, ref_lse = _oracle(pages)
    for splits in (1, 3):
        got, lse = run_emulated(pages, "portable", splits, tmp_path)
        _check(got, lse, ref, ref_lse, lens, "portable")


# (case of MMA_CASES, run the splits last to first): Llama-3's heads split-K, GQA 7 over 8
# warps with block size 32, GQA 8 with an empty sequence (no page token: the tail alone)
# split, and rows without page tokens in a single pass (Dk 64 and GQA 3 are covered by the
# step form's syntax check; each emulated case costs 5-18 s of the suite).
EPILOGUE_CASES = [(MMA_CASES[1], True), (MMA_CASES[5], True), (MMA_CASES[4], True),
                  (([0, 40, 0], 32, 8, 128, 128, 16, 1, 4, 1), False)]


@pytest.mark.parametrize("case,reverse", EPILOGUE_CASES,
                         ids=lambda c: f"h{c[1]}x{c[2]}_d{c[3]}_bs{c[5]}_s{c[6]}"
                         if isinstance(c, tuple) else ("rev" if c else "fwd"))
def test_mma_step_form_with_the_epilogue_folded_in(case, reverse, tmp_path):
    """The step kernel with the per-row epilogue folded in (MmaGeometry.epilogue, one launch
    per layer) gives exactly the bits of the standalone per-row epilogue kernel run over its
    pages' output: the model's output and the next tails (every element written: garbage
    before each launch), rows whose tails hold 0, some and block_size - 1 tokens, a row
    without page tokens; each of two launches on the same counters gives them; and the
    output is within tolerance of the reference (pages, then batched_epilogue_reference)."""
    from tests.metal.test_epilogue import _run_emulated as run_standalone_epilogue
    from tqstore.metal.reference import batched_epilogue_reference, rotate_queries_reference
    lens, hq, hkv, dk, dv, bs, splits, warps, depth = case
    rng = np.random.default_rng(sum(lens) + hq + 5)
    mx.random.seed(sum(lens) + dk + 5)
    pages = random_pages(rng, lens, hq, hkv, dk, dv, 4, 4, bs)
    bsz = len(lens)
    raw = (rng.standard_normal((bsz, hq, 1, dk)) * 3).astype(np.float32)
    rotation = np.linalg.qr(rng.standard_normal((hkv, dk, dk)))[0].astype(np.float32)
    scale = dk ** -0.5
    lengths = [[0, bs - 1, 3, bs // 2][b % 4] for b in range(bsz)]
    f16 = lambda *shape: (rng.standard_normal(shape) * 2).astype(np.float16)  # noqa: E731
    epi = dict(tail_keys=f16(bsz, hkv, bs, dk), tail_values=f16(bsz, hkv, bs, dv),
               new_keys=rng.standard_normal((bsz, hkv, 1, dk)).astype(np.float32) * 2,
               new_values=rng.standard_normal((bsz, hkv, 1, dv)).astype(np.float32) * 2,
               tail_info=np.array([[n + 1, n] for n in lengths], np.int32),
               key_center=rng.standard_normal((hkv, dk)).astype(np.float32),
               output_rotation=np.linalg.qr(rng.standard_normal((hkv, dv, dv)))[0]
               .astype(np.float32))
    fused_dir, alone_dir = tmp_path / "fused", tmp_path / "alone"
    fused_dir.mkdir()
    alone_dir.mkdir()
    out, lse = run_emulated(pages, "mma", splits, fused_dir, warps=warps, depth=depth,
                            reverse=reverse, launches=2, epilogue=epi,
                            step=dict(queries=raw, rotation=rotation, scale=scale))
    shapes = dict(attn_out=(bsz, hq, dv), next_tail_keys=(bsz, hkv, bs, dk),
                  next_tail_values=(bsz, hkv, bs, dv))
    types = dict(attn_out=np.float32, next_tail_keys=np.float16, next_tail_values=np.float16)
    got = [np.fromfile(fused_dir / f"{o}.bin", types[o]).reshape(shapes[o]) for o in shapes]
    x = dict(epi, pages_out=out, pages_lse=lse, queries=raw,
             scale=np.array([scale, 0, 0, 0], np.float32))
    want = run_standalone_epilogue(x, (dk, dv, hq, hkv, bs), "float32", alone_dir, per_row=True)
    for g, w in zip(got, want):
        assert np.array_equal(g.view(np.uint16 if g.dtype == np.float16 else np.uint32),
                              w.view(np.uint16 if w.dtype == np.float16 else np.uint32))
    if (fused_dir / "attn_out_0.bin").exists():  # split-K: both launches gave these bits
        for k in range(2):
            for o, g in zip(shapes, got):
                again = np.fromfile(fused_dir / f"{o}_{k}.bin", types[o]).reshape(shapes[o])
                assert np.array_equal(again, g)
    assert not np.any(np.fromfile(fused_dir / "arrivals.bin", dtype=np.int32))
    m = {k: mx.array(v) for k, v in epi.items()}
    with mx.stream(mx.cpu):
        q = rotate_queries_reference(mx.array(raw), mx.array(rotation), scale)
        ref_out, ref_lse = paged_decode_attention_reference(**dict(pages, queries=q),
                                                            return_lse=True)
        ref = batched_epilogue_reference(ref_out, ref_lse, mx.array(raw), scale, **m)
        ref = [np.array(r.astype(mx.float32)) for r in ref]
    assert np.array_equal(got[1].astype(np.float32), ref[1])
    assert np.array_equal(got[2].astype(np.float32), ref[2])
    assert _rel(got[0], ref[0][:, :, 0]) < TOLERANCE["mma"][0]
