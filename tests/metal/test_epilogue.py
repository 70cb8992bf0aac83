"""The decode epilogue kernel (tqstore.metal.epilogue): its generated Metal and CUDA sources
type-check through the shims, and the CUDA source, run on the CPU emulator, computes what
tqstore.metal.reference.decode_epilogue_reference computes (the GPU run is
tools/attention_e2e.py's tail check, kernels against the reference end to end). The same for
its per-row form (a batch of tails of different lengths in one launch) against
batched_epilogue_reference."""

from __future__ import annotations

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from tests.metal.signature import HERE, full_source, syntax_check
from tqstore.metal.dialect import DIALECTS
from tqstore.metal.epilogue import (DIMS_PER_GROUP, EPILOGUE_INPUTS, EPILOGUE_OUTPUTS,
                                    INPUT_TYPES, THREADS, epilogue_body, epilogue_header,
                                    epilogue_unsupported_reason)
from tqstore.metal.batch_step import ROW_INPUTS, rotate_body
from tqstore.metal.dialect import activations_header
from tqstore.metal.reference import batched_epilogue_reference, decode_epilogue_reference

_NP = dict(float32=np.float32, float16=np.float16, int32=np.int32)


def _input_types(per_row: bool, model_dtype: str) -> dict:
    """Element types of the kernel's inputs: the per-row form reads the model's queries and
    new tokens in the model's dtype, and the scale."""
    if not per_row:
        return {n: INPUT_TYPES[n] for n in EPILOGUE_INPUTS}
    types = {n: INPUT_TYPES.get(n, "float32") for n in ROW_INPUTS}
    types.update(queries=model_dtype, new_keys=model_dtype, new_values=model_dtype)
    return types


def _source(dialect: str, dims: tuple, out_dtype: str, prelude=None, per_row=False,
            packed=False) -> str:
    dk, dv, hq, hkv, bs = dims
    outputs = [("out", out_dtype), ("next_tail_keys", "float16"), ("next_tail_values", "float16")]
    return full_source(dialect, "epilogue", epilogue_header(dialect, out_dtype, per_row),
                       epilogue_body(dialect, dk, dv, hq, hkv, bs, per_row, packed),
                       list(_input_types(per_row, out_dtype).items()), outputs, prelude=prelude)


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("out_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("dims", [(128, 128, 32, 8, 16), (64, 64, 9, 3, 256)],
                         ids=["llama3", "smollm2-bs256"])
@pytest.mark.parametrize("form", ["one-length", "per-row", "per-row-packed"])
def test_epilogue_source_compiles(dialect, out_dtype, dims, form, tmp_path):
    syntax_check(_source(dialect, dims, out_dtype, per_row=form != "one-length",
                         packed=form.endswith("packed")), tmp_path, f"epi_{dialect}_{out_dtype}")


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_query_rotation_source_compiles(dialect, dtype, tmp_path):
    src = full_source(dialect, "rotate", activations_header(dialect),
                      rotate_body(dialect, 128, 32, 8),
                      [("queries", dtype), ("rotation", "float32"), ("scale", "float32")],
                      [("rotated", "float32")])
    syntax_check(src, tmp_path, f"rot_{dialect}_{dtype}")


def test_unsupported_shapes_are_named():
    assert epilogue_unsupported_reason(128, 128, 32, 8, 16, "float16") is None
    assert "value_dim" in epilogue_unsupported_reason(128, 100, 32, 8, 16, "float16")
    assert "dtype" in epilogue_unsupported_reason(128, 128, 32, 8, 16, "int8")
    assert "threadgroup memory" in epilogue_unsupported_reason(128, 128, 64, 2, 16, "float16")


def _inputs(rng: np.random.Generator, dims: tuple, batch: int, n_old: int, n_new: int,
            centered: bool, empty_row: bool) -> dict:
    dk, dv, hq, hkv, bs = dims
    f16 = lambda *shape: (rng.standard_normal(shape) * 2).astype(np.float16)  # noqa: E731
    lse = (rng.standard_normal((batch, hq)) * 3 + 4).astype(np.float32)
    if empty_row:
        lse[0] = -np.inf  # a row with no page token: the tail alone
    rot = np.linalg.qr(rng.standard_normal((hkv, dv, dv)))[0].astype(np.float32)
    return dict(
        pages_out=rng.standard_normal((batch, hq, dv)).astype(np.float32),
        pages_lse=lse,
        queries=(rng.standard_normal((batch, hq, dk)) * dk ** -0.5).astype(np.float32),
        tail_keys=f16(batch, hkv, n_old, dk), tail_values=f16(batch, hkv, n_old, dv),
        new_keys=f16(batch, hkv, max(n_new, 1), dk), new_values=f16(batch, hkv, max(n_new, 1), dv),
        tail_info=np.array([n_old + n_new, n_old], dtype=np.int32),
        key_center=((rng.standard_normal((hkv, dk)) if centered else np.zeros((hkv, dk)))
                    .astype(np.float32)),
        output_rotation=rot)


def _run_emulated(x: dict, dims: tuple, out_dtype: str, tmp_path,
                  per_row: bool = False, packed: bool = False) -> list[np.ndarray]:
    dk, dv, hq, hkv, bs = dims
    batch = x["queries"].shape[0]
    n = bs if per_row else int(x["tail_info"][0])  # rows of the next tail per (b, kv head)
    cxx = shutil.which("g++")
    assert cxx, "g++ is needed for the emulated kernel run"
    types = _input_types(per_row, out_dtype)
    for name in types:
        np.ascontiguousarray(x[name]).tofile(tmp_path / f"{name}.bin")
    ctype = dict(float32="float", float16="__half", int32="int32_t")
    sizes = dict(out=batch * hq * dv, next_tail_keys=batch * hkv * n * dk,
                 next_tail_values=batch * hkv * n * dv)
    otypes = dict(out=ctype[out_dtype], next_tail_keys="__half", next_tail_values="__half")
    args = ", ".join([f"(const {ctype[t]}*)in_{n}.data()" for n, t in types.items()]
                     + [f"{o}.data()" for o in EPILOGUE_OUTPUTS])
    main = "\n".join([
        "#include <cstring>",
        "#include <fstream>",
        "static std::vector<char> rd(const char* p) { std::ifstream f(p, std::ios::binary);"
        " return std::vector<char>(std::istreambuf_iterator<char>(f), {}); }",
        "int main() {",
        *[f'  auto in_{n} = rd("{n}.bin");' for n in types],
        # Garbage (0xFF bytes: NaN) in every output first: an element the kernel never
        # writes must fail the comparison, not pass as a vector's zero.
        *[f"  std::vector<{otypes[o]}> {o}({sizes[o]});"
          f" std::memset((void*){o}.data(), 0xFF, {o}.size() * sizeof({o}[0]));"
          for o in EPILOGUE_OUTPUTS],
        f"  tq_emu::launch(dim3{{{dv // DIMS_PER_GROUP}, {hkv}, {batch}}}, {THREADS}, [&] {{"
        f" mlx::core::cu::epilogue({args}); }});",
        *[f'  std::ofstream("{o}.out", std::ios::binary).write((const char*){o}.data(),'
          f' {o}.size() * sizeof({o}[0]));' for o in EPILOGUE_OUTPUTS],
        "  return 0;", "}"])
    cpp = tmp_path / "epi.cpp"
    cpp.write_text(_source("cuda", dims, out_dtype, prelude='#include "cuda_emu.h"',
                           per_row=per_row, packed=packed) + main)
    exe = tmp_path / "epi"
    # No FMA contraction, as tests/metal/emulate.py builds the step kernels: the folded
    # epilogue's test compares this kernel's bits with the step kernel's, and clang (macOS's
    # g++) contracts a * b + c into an FMA by default on arm64.
    res = subprocess.run([cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-pthread",
                          f"-I{HERE}", "-w", str(cpp),
                          "-o", str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, f"emulator build failed:\n{res.stderr[-4000:]}"
    res = subprocess.run([str(exe)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"emulated run failed:\n{res.stderr[-2000:]}"
    return [np.fromfile(tmp_path / "out.out", dtype=_NP[out_dtype]).reshape(batch, hq, dv),
            np.fromfile(tmp_path / "next_tail_keys.out", dtype=np.float16).reshape(batch, hkv, n, dk),
            np.fromfile(tmp_path / "next_tail_values.out", dtype=np.float16).reshape(batch, hkv, n, dv)]


# (dims (Dk, Dv, Hq, Hkv, block_size), batch, n_old, n_new, centered, a row without pages, out)
CASES = [
    ((128, 128, 32, 8, 16), 1, 5, 1, True, False, "float16"),   # Llama-3-8B, a pending token
    ((128, 128, 32, 8, 16), 1, 15, 1, False, False, "float32"),  # the token that fills the block
    ((64, 64, 9, 3, 16), 2, 7, 0, True, True, "float32"),        # SmolLM2 heads, no new token
    ((96, 64, 4, 4, 8), 1, 1, 1, True, False, "float16"),        # MHA, Dk != Dv
    ((128, 64, 16, 2, 64), 1, 40, 1, True, False, "float32"),    # G = 8, 2 staged key chunks
    # More than one new token (the standalone form's contract): the new tokens' gathered group
    # takes several rounds, and here spans a key chunk's boundary.
    ((128, 128, 32, 8, 64), 1, 30, 5, True, False, "float32"),
    ((128, 64, 16, 2, 64), 1, 3, 60, True, False, "float16"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0][2]}x{c[0][3]}_old{c[2]}_new{c[3]}")
def test_epilogue_kernel_on_the_emulator(case, tmp_path):
    dims, batch, n_old, n_new, centered, empty_row, out_dtype = case
    x = _inputs(np.random.default_rng(n_old * 7 + dims[2]), dims, batch, n_old, n_new,
                centered, empty_row)
    got = _run_emulated(x, dims, out_dtype, tmp_path)
    m = {k: mx.array(v) for k, v in x.items()}
    with mx.stream(mx.cpu):  # the oracle in fp32 (a GPU stream rounds matmuls through TF32)
        want = decode_epilogue_reference(
            m["pages_out"], m["pages_lse"], m["queries"], m["tail_keys"], m["tail_values"],
            m["new_keys"] if n_new else None, m["new_values"] if n_new else None,
            m["key_center"], m["output_rotation"], getattr(mx, out_dtype))
        want = [np.array(w.astype(mx.float32)) for w in want]
    # The next tail is a copy: exact.
    assert np.array_equal(got[1].astype(np.float32), want[1])
    assert np.array_equal(got[2].astype(np.float32), want[2])
    out = got[0].astype(np.float32)
    assert np.all(np.isfinite(out))
    scale = np.max(np.abs(want[0]))
    tol = 2e-3 if out_dtype == "float16" else 2e-5  # fp16 output: its rounding
    assert np.max(np.abs(out - want[0])) <= tol * scale


# Per-row form: (dims, the rows' old tail lengths, the model's dtype, packed). Lengths 0 (a token
# opening its tail), mid-block and a token short of the block; a row with no page token.
ROW_CASES = [
    ((128, 128, 32, 8, 16), [0, 7, 15], "float16", True),
    ((64, 64, 9, 3, 16), [3, 0, 1, 14], "float32", False),
    ((128, 64, 16, 2, 64), [40, 63], "float32", True),  # G = 8, two staged key chunks
]


@pytest.mark.parametrize("case", ROW_CASES,
                         ids=lambda c: f"h{c[0][2]}x{c[0][3]}_rows{len(c[1])}_{c[2]}_packed{c[3]}")
def test_per_row_epilogue_kernel_on_the_emulator(case, tmp_path):
    dims, lengths, dtype, packed = case
    dk, dv, hq, hkv, bs = dims
    batch = len(lengths)
    rng = np.random.default_rng(sum(lengths) + dims[2])
    x = _inputs(rng, dims, batch, bs, 1, True, True)
    # Garbage past each row's tokens (the kernel must read only [0, n_old)); the model's
    # queries (unscaled) and new tokens in its dtype; the scale.
    x["tail_info"] = np.array([[n + 1, n] for n in lengths], dtype=np.int32)
    x["queries"] = rng.standard_normal((batch, hq, 1, dk)).astype(dtype)
    x["new_keys"], x["new_values"] = (x[k].astype(np.float32).astype(dtype) * 1.001
                                      for k in ("new_keys", "new_values"))
    x["scale"] = np.array([dk ** -0.5, 0, 0, 0], dtype=np.float32)
    out, lse = x["pages_out"], x["pages_lse"]
    if packed:  # the split attention kernel's work buffer: B output rows, then the lse
        rows = -(-(batch * hq) // (hq * dv))
        flat = np.zeros(rows * hq * dv, np.float32)
        flat[:batch * hq] = lse.ravel()
        x["pages_out"] = np.concatenate([out.ravel(), flat]).reshape(-1, hq, dv)
        x["pages_lse"] = x["pages_out"]
    got = _run_emulated(x, dims, dtype, tmp_path, per_row=True, packed=packed)
    m = {k: mx.array(v) for k, v in x.items() if k != "scale"}
    m.update(pages_out=mx.array(out), pages_lse=mx.array(lse))
    with mx.stream(mx.cpu):
        want = batched_epilogue_reference(**m, scale=dk ** -0.5)
        want = [np.array(w.astype(mx.float32)) for w in want]
    # The next tails: each row's tokens (the new one converted to fp16) then zeros, exactly.
    assert np.array_equal(got[1].astype(np.float32), want[1])
    assert np.array_equal(got[2].astype(np.float32), want[2])
    for b, n in enumerate(lengths):
        assert not np.any(got[1][b, :, n + 1:]) and np.any(got[1][b, :, :n + 1])
    assert np.all(np.isfinite(got[0]))
    tol = 2e-3 if dtype == "float16" else 2e-5
    assert np.max(np.abs(got[0].astype(np.float32) - want[0][:, :, 0])) <= tol * np.max(
        np.abs(want[0]))
    # Each row of the reference is that row's one-length epilogue (the contract per row).
    b, n = batch - 1, lengths[-1]
    q = m["queries"][b:b + 1, :, 0].astype(mx.float32) * (dk ** -0.5)
    with mx.stream(mx.cpu):
        alone = decode_epilogue_reference(
            m["pages_out"][b:b + 1], m["pages_lse"][b:b + 1], q,
            m["tail_keys"][b:b + 1, :, :n], m["tail_values"][b:b + 1, :, :n],
            m["new_keys"][b:b + 1].astype(mx.float16),
            m["new_values"][b:b + 1].astype(mx.float16), m["key_center"],
            m["output_rotation"], getattr(mx, dtype))
        assert np.array_equal(np.array(alone[0].astype(mx.float32))[0], want[0][b, :, 0])


def test_the_folded_epilogue_stages_the_values_and_the_widest_pass_that_fit_the_table():
    """merged_layout: the tail's values staged where they fit the table's bytes, then whole DC
    chunks per pass that divide DV, fit beside the epilogue's other arrays and keep R's next
    pass within MAX_R_REGISTERS a thread; DC and unstaged values where nothing more fits
    (then it is the standalone's loop); a shape the epilogue does not fit is refused."""
    from tqstore.metal.attention_mma import LUT_BYTES
    from tqstore.metal.epilogue import shared_bytes
    from tqstore.metal.mma_epilogue import MAX_R_REGISTERS, merged_layout
    assert merged_layout(128, 128, 4, 16, LUT_BYTES, 256) == (True, 64)   # Llama-3-8B
    assert merged_layout(64, 64, 3, 16, LUT_BYTES, 256) == (True, 64)     # SmolLM2: one pass
    assert merged_layout(128, 128, 8, 256, LUT_BYTES, 256) == (False, 64)  # 128 KB of values
    assert merged_layout(128, 128, 4, 16, LUT_BYTES, 128) == (True, 32)   # 4 warps: registers
    assert merged_layout(128, 96, 4, 16, LUT_BYTES, 256) == (True, 32)    # 96 x 96 / 256 > 32
    assert merged_layout(128, 96, 4, 16, LUT_BYTES, 512) == (True, 96)    # 3 chunks in a pass
    tight = shared_bytes(128, 128, 4, 16)  # just the standalone's arrays: nothing more fits
    assert merged_layout(128, 128, 4, 16, tight, 256) == (False, DIMS_PER_GROUP)
    with pytest.raises(ValueError, match="does not fit"):
        merged_layout(128, 128, 4, 16, tight - 4, 256)
    for dk, dv, g, bs, nt in ((128, 128, 4, 16, 256), (64, 64, 3, 16, 128),
                              (128, 96, 8, 32, 256), (128, 128, 8, 256, 512)):
        values, width = merged_layout(dk, dv, g, bs, LUT_BYTES, nt)
        assert dv % width == 0 and width % DIMS_PER_GROUP == 0
        assert shared_bytes(dk, dv, g, bs, values, dv * width) <= LUT_BYTES
        assert -(-dv * width // nt) <= MAX_R_REGISTERS
