"""CPU-CI compile check: the generated Metal and CUDA kernel sources must type-check with a
C++ compiler through small shims of each language's keywords and builtins."""

from __future__ import annotations

import pytest

from tests.metal.signature import full_source, syntax_check
import shutil
import subprocess

from tests.metal.emulate import ATTN_TYPES as STEP_TYPES, OUT_TYPES
from tqstore.metal.attention_mma import (STEP_ATTN_INPUTS, MmaGeometry, mma_attention_body,
                                         mma_header)
from tqstore.metal.epilogue import out_define
from tqstore.metal.mma_epilogue import EPILOGUE_INPUTS, EPILOGUE_OUTPUTS
from tqstore.metal.attention_source import (ATTN_INPUTS, MERGE_INPUTS, AttentionGeometry,
                                            attention_body, attention_header, merge_body)
from tqstore.metal.dialect import DIALECTS

ATTN_TYPES = dict(queries="float32", key_codes="uint8", key_scales="float16",
                  value_codes="uint8", value_scales="float16", block_tables="int32",
                  seq_lens="int32", key_codebook="float32", value_codebook="float32",
                  params="int32")

GEOMETRIES = [
    AttentionGeometry(128, 128, 4, 4, 16, 32, 8),     # Llama-3-8B shaped, the benchmark case
    AttentionGeometry(64, 64, 3, 4, 32, 9, 3),        # SmolLM2: G=3, 3-bit keys
    AttentionGeometry(96, 64, 2, 8, 8, 4, 4),         # no GQA, Dk != Dv, 2/8 bits, LPT 4
    AttentionGeometry(128, 128, 1, 5, 256, 8, 1, warps=2, unroll=1),
    AttentionGeometry(128, 128, 4, 4, 16, 32, 8, warps=8, unroll=4, lanes=16, head_split=2),
]


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: g.tag())
@pytest.mark.parametrize("split", [False, True])
def test_attention_source_compiles(dialect, geo, split, tmp_path):
    outputs = ["partial_out", "partial_m", "partial_l"] if split else ["out", "lse"]
    src = full_source(dialect, "attn", attention_header(dialect),
                      attention_body(geo, dialect, split),
                      [(n, ATTN_TYPES[n]) for n in ATTN_INPUTS], [(o, "float32") for o in outputs])
    syntax_check(src, tmp_path, f"attn_{dialect}_{split}")


MMA_GEOMETRIES = [
    MmaGeometry(128, 128, 16, 32, 8, warps=4, depth=2),  # the benchmark case, default knobs
    MmaGeometry(64, 64, 16, 9, 3, warps=2, depth=1),      # SmolLM2 heads
    MmaGeometry(96, 64, 64, 4, 4, warps=1, depth=3),      # MHA, Dk != Dv
    MmaGeometry(256, 128, 32, 64, 8, warps=8, depth=1),   # G = 8
]


def _mma_source(geo: MmaGeometry, split: bool, body: str | None = None, prelude=None) -> str:
    """The kernel as MLX would build it: the plain form's inputs, or the step form's (the
    model's queries, float32 here) and the folded epilogue's."""
    outputs = ((["work"] if geo.fused else ["partial_out", "partial_m", "partial_l"]) if split
               else ["out", "lse"])
    inputs, types = ATTN_INPUTS, ATTN_TYPES
    head = mma_header(activations=geo.step)
    if geo.step:
        inputs, types = STEP_ATTN_INPUTS, STEP_TYPES
    if geo.epilogue is not None:
        inputs, outputs = inputs + EPILOGUE_INPUTS, outputs + list(EPILOGUE_OUTPUTS)
        head += out_define("cuda", geo.epilogue)
    return full_source("cuda", "attn_mma", head, body or mma_attention_body(geo, split),
                       [(n, types[n]) for n in inputs],
                       [(o, geo.epilogue if o == "attn_out" else OUT_TYPES.get(o, "float32"))
                        for o in outputs], prelude=prelude)


@pytest.mark.parametrize("geo", MMA_GEOMETRIES + [
    MmaGeometry(128, 128, 16, 32, 8, warps=4, depth=1, fused=False),
    MmaGeometry(128, 128, 16, 32, 8, warps=8, depth=1, step=True),
    MmaGeometry(128, 128, 16, 32, 8, warps=8, depth=1, step=True, epilogue="bfloat16"),
    MmaGeometry(64, 64, 16, 9, 3, warps=2, depth=1, step=True, epilogue="float16")],
    ids=lambda g: g.tag())
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("device_branch", [False, True], ids=["host", "device"])
def test_mma_source_compiles(geo, split, device_branch, tmp_path):
    """Both sides of the helpers' #if: the inline-PTX device branch (-D__CUDA_ARCH__) and the
    emulator hooks; split-K fused (the default) and with the separate merge pass."""
    syntax_check(_mma_source(geo, split), tmp_path, f"mma_{split}",
                 extra=["-D__CUDA_ARCH__=900"] if device_branch else [])


def test_mma_register_cap_applies_under_nvrtc_only(tmp_path):
    """The launch-bounds cap (see mma_header) redefines __global__ only where NVRTC compiles
    (MLX's JIT); with it the source still type-checks, and the cap names the launch policy's
    threads and threadgroups per SM."""
    from tqstore.metal.attention_kernel import mma_resident_groups

    geo = MMA_GEOMETRIES[0]
    header = mma_header((geo.threads, mma_resident_groups(geo)))
    assert f"__launch_bounds__({geo.threads}, {mma_resident_groups(geo)})" in header
    src = full_source("cuda", "attn_mma", header, mma_attention_body(geo, True),
                      [(n, ATTN_TYPES[n]) for n in ATTN_INPUTS], [("work", "float32")])
    syntax_check(src, tmp_path, "mma_bounds",
                 extra=["-D__CUDACC_RTC__", "-D__location__(a)=", "-D__launch_bounds__(t,b)="])


def test_mma_syntax_check_catches_a_typo(tmp_path):
    geo = MMA_GEOMETRIES[0]
    body = mma_attention_body(geo, True).replace("tq_movmatrix_trans(", "tq_movmatrix_transs(", 1)
    assert "TQ_ATOMIC_ADD(counts" in body  # the default split kernel is the fused one
    with pytest.raises(AssertionError, match="syntax check"):
        syntax_check(_mma_source(geo, True, body), tmp_path, "mma_typo")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA toolkit)")
@pytest.mark.parametrize("depth,form", [(1, "plain"), (2, "plain"), (1, "step-epilogue")])
def test_mma_source_builds_for_sm90_without_spills(depth, form, tmp_path):
    """Where a CUDA toolkit is installed: the real compiler accepts the inline PTX, and the
    kernel (the default knobs, depth 2, and the step form with the epilogue folded in, the
    default launch of a decode step) fits the register budget the launch policy assumes
    (attention_kernel.MMA_REGISTERS: 128 at depth 1, so 2 threadgroups of 8 warps share an SM)
    without local memory spills. MLX's NVRTC build caps registers at that budget through
    mma_header's __launch_bounds__; nvcc offline gets the same cap as -maxrregcount."""
    from tqstore.metal.attention_kernel import DEFAULT_MMA_VARIANT, MMA_REGISTERS

    folded = dict(step=True, epilogue="bfloat16") if form == "step-epilogue" else {}
    geo = MmaGeometry(128, 128, 16, 32, 8, **{**DEFAULT_MMA_VARIANT, "depth": depth, **folded})
    src = _mma_source(geo, True, prelude="#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
                      "#include <cstdint>")
    path = tmp_path / "mma.cu"
    path.write_text(src)
    res = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-O3", "-Xptxas", "-v",
                          f"-maxrregcount={MMA_REGISTERS[depth]}", "-o",
                          str(tmp_path / "mma.cubin"), str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    info = res.stderr
    assert "0 bytes spill stores, 0 bytes spill loads" in info, info
    regs = int(info.split("Used ")[1].split(" registers")[0])
    assert regs <= MMA_REGISTERS[depth], info


@pytest.mark.parametrize("dialect", DIALECTS)
def test_merge_source_compiles(dialect, tmp_path):
    types = dict(partial_out="float32", partial_m="float32", partial_l="float32", params="int32")
    src = full_source(dialect, "merge", attention_header(dialect), merge_body(128, 32, dialect),
                      [(n, types[n]) for n in MERGE_INPUTS], [("out", "float32"), ("lse", "float32")])
    syntax_check(src, tmp_path, f"merge_{dialect}")


def test_syntax_check_catches_a_typo(tmp_path):
    geo = GEOMETRIES[0]
    body = attention_body(geo, "metal", False).replace("TQ_EXP2(s[u][g] - m[g])", "TQ_EXPP(s[u][g] - m[g])")
    assert "TQ_EXPP" in body
    src = full_source("metal", "attn", attention_header("metal"), body,
                      [(n, ATTN_TYPES[n]) for n in ATTN_INPUTS], [("out", "float32"), ("lse", "float32")])
    with pytest.raises(AssertionError, match="syntax check"):
        syntax_check(src, tmp_path, "typo")


def test_metal_body_names_the_attributes_mlx_must_add():
    body = attention_body(GEOMETRIES[0], "metal", True)
    for attr in ("thread_position_in_threadgroup", "threadgroup_position_in_grid",
                 "threadgroups_per_grid"):
        assert attr in body
    assert "threadIdx" not in body and "__shared__" not in body


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("dim,bits,nc", [(128, 4, True), (64, 3, True), (256, 8, False), (32, 1, True)])
def test_quantize_source_compiles(dialect, dim, bits, nc, tmp_path):
    from tqstore.metal.quantize import QUANT_INPUTS, quantize_body, quantize_header
    types = dict(x="float32", signs="float32", codebook="float32", midpoints="float32",
                 rot_norm="float32", params="int32")
    src = full_source(dialect, "quant", quantize_header(dialect),
                      quantize_body(dim, bits, nc, dialect),
                      [(n, types[n]) for n in QUANT_INPUTS],
                      [("codes", "uint8"), ("scales", "float16")])
    syntax_check(src, tmp_path, f"quant_{dialect}")


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("load", ["rows", "rows_centered"])
def test_quantize_rows_source_compiles(dialect, load, tmp_path):
    """The rows form (fp16 tail buffers, the rows to take, the keys' center) of the quantize
    kernel that a block-opening decode step writes full tails with."""
    from tqstore.metal.quantize import ROWS_INPUTS, quantize_body, quantize_header
    types = dict(x="float16", signs="float32", codebook="float32", midpoints="float32",
                 rot_norm="float32", params="int32", where="int32", center="float32")
    body = quantize_body(128, 4, True, dialect, load)
    assert ("center[" in body) == (load == "rows_centered") and "where[" in body
    src = full_source(dialect, "quant", quantize_header(dialect), body,
                      [(n, types[n]) for n in ROWS_INPUTS],
                      [("codes", "uint8"), ("scales", "float16")])
    syntax_check(src, tmp_path, f"quant_{load}_{dialect}")


def test_quantize_tree_sum_matches_the_codec_order(rng):
    """The generated reduction replays codec.tree_sum_last's pairing, odd tails included."""
    import mlx.core as mx
    import numpy as np

    from tqstore.codec.turboquant import tree_sum_last
    from tqstore.metal.quantize import _tree_sum

    for n in (8, 24, 96, 128):
        x = rng.standard_normal(n).astype(np.float32) * 1e3
        a = x.copy()
        for line in _tree_sum("a", n).splitlines():  # interpret the two statement forms
            line = line.strip()
            if line.startswith("for"):
                half = int(line.split("i < ")[1].split(";")[0])
                a[:half] = (a[:half] + a[half:2 * half]).astype(np.float32)
            else:
                dst, src = (int(t.split("]")[0]) for t in line.split("[")[1:3])
                a[dst] = a[src]
        assert a[0] == np.array(tree_sum_last(mx.array(x)))


@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_quantize_warp_tree_sum_matches_the_codec_order_in_every_lane(rng, head_dim):
    """The SIMD-group reduction of the quantize kernel, replayed on 32 simulated lanes (lane l
    holds elements [l*E, l*E + E)), gives codec.tree_sum_last's float32 sum bit for bit, and
    in every lane (the scale and the normalization use each lane's copy)."""
    import mlx.core as mx
    import numpy as np

    from tqstore.codec.turboquant import tree_sum_last
    from tqstore.metal.quantize import _warp_tree_sum

    E = head_dim // 32
    for _ in range(5):
        x = (rng.standard_normal(head_dim) * 10.0 ** rng.integers(-3, 4, head_dim)).astype(np.float32)
        lanes = x.reshape(32, E).copy()
        for line in _warp_tree_sum("a", head_dim).splitlines():
            line = line.strip()
            if "TQ_SHFL_XOR" in line:
                m = int(line.rsplit(", ", 1)[1].split(")")[0])
                partner = lanes[np.arange(32) ^ m]
                lanes = (lanes + partner).astype(np.float32)
            elif line.startswith("for"):
                half = int(line.split("i < ")[1].split(";")[0])
                lanes[:, :half] = (lanes[:, :half] + lanes[:, half:2 * half]).astype(np.float32)
            elif line:
                raise AssertionError(f"unexpected statement {line!r}")
        want = np.array(tree_sum_last(mx.array(x)))
        assert (lanes[:, 0] == want).all()
