"""Kernels that cannot be tested here must not break a user (tqstore.metal.selfcheck): a
kernel that fails its first-use check against the reference is disabled with one warning that
names it, and the next in line serves. Planted wrong kernels: the C kernels on the CPU (every
machine), the CUDA/Metal attention kernels on a GPU (a fresh process per plant)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tqstore.bench.attention import random_pages
from tqstore.codec import CodecConfig, layer_codecs
from tqstore.metal import dispatch, selfcheck
from tqstore.metal.reference import paged_decode_attention_reference
from tqstore.native import build, cpu_kernels

ROOT = Path(__file__).resolve().parents[2]
needs_c = pytest.mark.skipif(build.load() is None, reason="no C compiler on this machine")


@pytest.fixture(autouse=True)
def fresh_verdicts():
    selfcheck.reset()
    dispatch._logged.clear()
    yield
    selfcheck.reset()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@needs_c
@pytest.mark.parametrize("plant", ["wrong", "crash", "declines"])
def test_a_planted_wrong_c_attention_kernel_is_disabled(rng, monkeypatch, caplog, plant):
    real = cpu_kernels.decode_attention

    def planted(*args):
        if plant == "crash":
            raise MemoryError("planted")
        if plant == "declines":
            return None
        out, lse = real(*args)
        return out + 1e-3, lse

    monkeypatch.setattr(cpu_kernels, "decode_attention", planted)
    pages = random_pages(rng, [100, 7], 9, 3, 64, 64, 5, 3, 16)
    with mx.stream(mx.cpu), caplog.at_level(logging.WARNING, logger="tqstore"):
        first = dispatch.paged_decode_attention(**pages)
        second = dispatch.paged_decode_attention(**pages, return_lse=True)[0]
        want = paged_decode_attention_reference(**pages)
        backend = dispatch.active_backend()  # of the CPU device (a GPU machine's default is the GPU)
    assert np.array_equal(np.array(first), np.array(want))  # the reference served, bit for bit
    assert np.array_equal(np.array(second), np.array(want))
    warned = _warnings(caplog)
    assert len(warned) == 1 and "cpu-kernel" in warned[0] and "self-check" in warned[0]
    assert selfcheck.kernel_report()["cpu-kernel"].startswith("disabled: ")
    assert backend.startswith("reference:tqstore.metal (cpu-kernel disabled")


@needs_c
def test_a_planted_wrong_c_decode_step_is_disabled(rng, monkeypatch, caplog):
    """The fused step kernel falls back to the composed path (pages kernel + epilogue)."""
    real = cpu_kernels.decode_step
    monkeypatch.setattr(cpu_kernels, "decode_step", lambda *a: real(*a) * 1.01)
    x = selfcheck.decode_step_inputs((9, 3, 64, 64, 4, 4, 16))
    args = [x[k] for k in ("queries", "scale", "query_rotation", "key_codes", "key_scales",
                           "value_codes", "value_scales", "block_tables", "seq_lens",
                           "key_codebook", "value_codebook", "tail_keys", "tail_values",
                           "key_center", "output_rotation", "key_bits", "value_bits")]
    with mx.stream(mx.cpu), caplog.at_level(logging.WARNING, logger="tqstore"):
        assert dispatch.fused_decode_step(*args) is None
        assert dispatch.fused_decode_step(*args) is None
        backend = dispatch.active_backend()
    warned = _warnings(caplog)
    assert len(warned) == 1 and "cpu-kernel-step" in warned[0]
    assert backend == "cpu-kernel (cpu-kernel-step " + selfcheck.kernel_report()["cpu-kernel-step"] + ")"


@needs_c
def test_a_planted_wrong_c_quantizer_is_disabled(rng, monkeypatch, caplog):
    real = cpu_kernels.quantize

    def planted(codec, x):
        q = real(codec, x)
        codes = np.array(q.codes)
        codes.reshape(-1)[5] ^= 1  # one bit of one code byte
        return type(q)(mx.array(codes), q.scales)

    monkeypatch.setattr(cpu_kernels, "quantize", planted)
    codec = layer_codecs(CodecConfig(4, 4), 0, 3, 64)[0]
    x = mx.array(rng.standard_normal((3, 40, 64)).astype(np.float16))
    with mx.stream(mx.cpu), caplog.at_level(logging.WARNING, logger="tqstore"):
        got = dispatch.quantize(codec, x)
        want = codec.quantize(x)
    assert np.array_equal(np.array(got.codes), np.array(want.codes))
    warned = _warnings(caplog)
    assert len(warned) == 1 and "cpu-kernel-quantize" in warned[0] and "byte-identical" in warned[0]


@needs_c
def test_each_shape_is_checked_once(rng, monkeypatch):
    calls = []
    real = selfcheck.check_attention
    monkeypatch.setattr(selfcheck, "check_attention", lambda *a: calls.append(a[0]) or real(*a))
    with mx.stream(mx.cpu):
        for kb in (4, 4, 5, 4, 5):
            dispatch.paged_decode_attention(**random_pages(rng, [40], 9, 3, 64, 64, kb, 4, 16))
    assert len(calls) == 2  # (k4v4) and (k5v4)
    assert selfcheck.kernel_report() == {"cpu-kernel": "ok (2 shapes checked)"}


def test_the_check_inputs_leave_mlx_rng_alone():
    mx.random.seed(3)
    selfcheck.attention_inputs((9, 3, 64, 64, 4, 4, 16))
    after = mx.random.uniform(shape=(4,))
    mx.random.seed(3)
    assert mx.array_equal(after, mx.random.uniform(shape=(4,))).item()


def _planted_run(plant: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "tests.metal.planted_kernel", plant], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_planted_wrong_gpu_kernels_are_disabled(device):
    """On a GPU: attention kernels that fail to compile, or compute a wrong element, are each
    disabled with one warning naming them, and the reference serves exactly. On the CPU this
    checks the control: nothing planted, no GPU kernel, nothing disabled."""
    if device == "cpu":
        control = _planted_run("none") if not (mx.cuda.is_available() or mx.metal.is_available()) else None
        if control is not None:
            assert control["gpu"] is None and control["warnings"] == []
            assert control["step-launch"] == "none"  # no GPU: the general path
            assert control["mma-shape"]["backend"] in ("cpu-kernel", "reference:tqstore.metal")
        return
    for plant in ("compile", "wrong"):
        run = _planted_run(plant)
        gpu = run["gpu"]
        for label in ("mma-shape", "portable-shape"):
            assert run[label]["backend"].startswith("reference:tqstore.metal ("), run
            assert run[label]["max_abs_err"] < 1e-3, run  # the reference on the GPU device
        disabled = {k for k, v in run["report"].items() if v.startswith("disabled")}
        assert f"{gpu}-kernel" in disabled, run
        # The batched epilogue: disabled too, and its reference serves (bf16 outputs, a GPU
        # stream's TF32 un-rotation against the CPU's fp32 oracle; the planted element: 12345).
        assert f"{gpu}-kernel-epilogue-rows" in disabled, run
        assert run["epilogue-rows"]["max_rel_err"] < 2e-2 and run["epilogue-rows"]["tails_exact"]
        # A batched step: every kernel of it failed, so the general path (the references).
        assert run["step-launch"] == "none", run
        if run["mma"]:
            assert f"{gpu}-kernel-mma-step-epilogue" in disabled, run
        named = [w for w in run["warnings"] if "self-check" in w]
        assert len(named) == len(disabled), run
    control = _planted_run("none")
    assert control["warnings"] == [] and "-kernel" in control["mma-shape"]["backend"], control
    assert control["report"][f"{control['gpu']}-kernel-epilogue-rows"].startswith("ok"), control
    assert control["epilogue-rows"]["max_rel_err"] < 2e-2, control  # bf16 outputs: 2^-8
    assert control["epilogue-rows"]["tails_exact"], control
    # One launch per layer where the tensor-core kernel runs (the folded epilogue); Metal and
    # pre-sm_80 CUDA have no step form: three.
    assert control["step-launch"] == ("one" if control["mma"] else "three"), control


def test_a_centered_codec_quantizes_to_its_own_bytes_on_every_device(rng, device):
    """The daemon's re-quantizer hands dispatch a codec with key means (a center); the kernels
    know nothing of centers, so dispatch centers first. (On the H100 the GPU quantize kernel's
    self-check caught this: it was handed the centered codec and disabled itself.)"""
    from tqstore.codec.profile import QualityProfile
    heads, dim = 3, 64
    means = (rng.standard_normal((2, heads, dim)) * 3).astype(np.float16)
    codec = layer_codecs(CodecConfig(5, 4, profile=QualityProfile("m", 2, heads, dim,
                                                                  means.tobytes())), 1, heads, dim)[0]
    x = mx.array((rng.standard_normal((heads, 40, dim)) * 2).astype(np.float16))
    got, want = dispatch.quantize(codec, x), codec.quantize(x)
    assert np.array_equal(np.array(got.codes), np.array(want.codes))
    assert np.array_equal(np.array(got.scales).view(np.uint16), np.array(want.scales).view(np.uint16))
    assert not any(v.startswith("disabled") for v in selfcheck.kernel_report().values())


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_full_tail_blocks_quantize_to_the_codecs_bytes_on_every_device(rng, device, centered):
    """dispatch.quantize_rows (a block-opening step's write of full tails, straight from the
    shared tail buffers): codec.quantize(buffer[rows]) byte for byte, in the pages' layout. On
    a GPU that is the rows kernel (the gather and the centering inside it), checked here
    against the codec on the CPU stream, and its self-check passed; elsewhere the gather."""
    from tqstore.codec.profile import QualityProfile
    from tqstore.metal.quantize import kernel_quantize_rows
    heads, dim, bs = 2, 128, 16
    profile = None
    if centered:
        means = (rng.standard_normal((4, heads, dim)) * 3).astype(np.float16)
        profile = QualityProfile("m", 4, heads, dim, means.tobytes())
    codec = layer_codecs(CodecConfig(4, 4, profile=profile), 2, heads, dim)[0]
    assert (codec.center is not None) == centered
    buffer = mx.array((rng.standard_normal((5, heads, bs, dim)) * 2).astype(np.float16))
    rows = mx.array(np.array([3, 0, 4], dtype=np.int32))
    got = dispatch.quantize_rows(codec, buffer, rows)
    with mx.stream(mx.cpu):
        want = codec.quantize(buffer[rows])
    assert got.codes.shape == (3, heads, bs, codec.code_bytes) and got.scales.shape == (3, heads, bs)
    assert np.array(got.codes).tobytes() == np.array(want.codes).tobytes()
    assert np.array(got.scales).view(np.uint16).tobytes() == np.array(
        want.scales).view(np.uint16).tobytes()
    assert (kernel_quantize_rows(codec, buffer, rows) is None) == (device == "cpu")
    assert not any(v.startswith("disabled") for v in selfcheck.kernel_report().values())


def test_the_rows_quantize_check_rejects_wrong_rows_and_a_missed_center(rng):
    """quantize_checks.check_quantize_rows passes the gather itself and fails a kernel that takes
    the first rows instead of the asked ones, or forgets the keys' center."""
    from tqstore.codec.profile import QualityProfile
    from tqstore.metal.quantize_checks import check_quantize_rows
    heads, dim = 2, 64
    means = (rng.standard_normal((2, heads, dim)) * 3).astype(np.float16)
    codec = layer_codecs(CodecConfig(4, 4, profile=QualityProfile("m", 2, heads, dim,
                                                                  means.tobytes())), 1, heads, dim)[0]
    with mx.stream(mx.cpu):
        assert check_quantize_rows(codec, lambda c, b, w: c.quantize(b[w])) is None
        first = lambda c, b, w: c.quantize(b[: w.shape[0]])  # noqa: E731
        assert "differ" in check_quantize_rows(codec, first)
        uncentered = lambda c, b, w: c.residual_codec.quantize(b[w])  # noqa: E731
        assert "differ" in check_quantize_rows(codec, uncentered)
        assert "declined" in check_quantize_rows(codec, lambda c, b, w: None)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_the_folded_epilogues_check_rejects_a_small_error_of_either_part(dtype):
    """selfcheck.check_step_epilogue (the step kernel with the epilogue folded in) passes the
    references themselves and fails a 2% error of the pages' output (which the tail's weights
    would dilute in the model's output) or of the model's output alone, a wrong next tail,
    and a kernel that leaves its counters non-zero."""
    from tqstore.metal import selfcheck
    from tqstore.metal.reference import (batched_epilogue_reference,
                                         paged_decode_attention_reference,
                                         rotate_queries_reference)
    key = (32, 8, 128, 128, 4, 4, 16, dtype)
    pages_keys = ("key_codes", "key_scales", "value_codes", "value_scales", "block_tables",
                  "seq_lens", "key_codebook", "value_codebook", "key_bits", "value_bits")
    tail_keys = ("tail_keys", "tail_values", "new_keys", "new_values", "tail_info",
                 "key_center", "output_rotation")

    def fake(pages_by=1.0, out_by=1.0, tail_by=1.0, count=False):
        def run(x):
            with mx.stream(mx.cpu):
                rotated = rotate_queries_reference(x["queries"], x["rotation"], x["scale"])
                pages, lse = paged_decode_attention_reference(
                    rotated, *(x[k] for k in pages_keys), return_lse=True)
                out, nk, nv = batched_epilogue_reference(pages, lse, x["queries"], x["scale"],
                                                         *(x[k] for k in tail_keys))
                if count:
                    x["arrivals"][:] = 1  # noqa: B023 (a kernel that does not reset them)
                return ((out.astype(mx.float32) * out_by).astype(dtype),
                        (nk * tail_by).astype(mx.float16), nv, pages * pages_by, lse)
        return run

    assert selfcheck.check_step_epilogue(key, fake()) is None
    assert "pages' output" in selfcheck.check_step_epilogue(key, fake(pages_by=1.02))
    assert "rel L2" in selfcheck.check_step_epilogue(key, fake(out_by=1.02))
    assert "differ" in selfcheck.check_step_epilogue(key, fake(tail_by=1.5))
    assert "not zero" in selfcheck.check_step_epilogue(key, fake(count=True))
