"""Run decode attention through dispatch with a planted wrong GPU kernel, in a fresh process
(compiled kernels are cached per process by name and source), and print what happened as JSON.

  python -m tests.metal.planted_kernel compile   the tensor-core and portable attention
                                                 kernels and the per-row decode epilogue fail
                                                 to compile
  python -m tests.metal.planted_kernel wrong     all compile and write a wrong output element
                                                 (the step kernel with the folded epilogue:
                                                 of its model output)
  python -m tests.metal.planted_kernel none      nothing planted (the control)

Used by tests/metal/test_selfcheck.py on a machine with a GPU (the `device` fixture's gpu)."""

from __future__ import annotations

import tqstore  # noqa: F401  (OpenBLAS before MLX)

import json
import logging
import sys

import mlx.core as mx
import numpy as np


def main(plant: str) -> int:
    from tqstore.bench.attention import random_pages
    from tqstore.metal import attention_kernel, dispatch
    from tqstore.metal.reference import (batched_epilogue_reference,
                                         paged_decode_attention_reference)

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("tqstore").addHandler(Keep(level=logging.WARNING))
    real = {"cuda": mx.fast.cuda_kernel, "metal": mx.fast.metal_kernel}

    def planted(kind: str):
        def build(**kw):
            name = kw["name"]
            if name.startswith(("tq_attn_", "tq_decode_epilogue_rows")) and plant != "none":
                kw["name"] = name + "_planted"
                if plant == "compile":
                    kw["source"] += "\n  this is not a statement;\n"
                elif "attn_out" in kw["output_names"]:  # the step kernel with the epilogue
                    kw["source"] += "\n  attn_out[0] = TQ_OUT(12345.0f);\n"
                elif "_single_" in name:  # a numerically wrong single-pass kernel
                    kw["source"] += "\n  out[0] = 12345.0f;\n"
                elif name.startswith("tq_decode_epilogue_rows"):
                    kw["source"] += "\n  out[0] = TQ_OUT(12345.0f);\n"
            return real[kind](**kw)
        return build

    mx.fast.cuda_kernel, mx.fast.metal_kernel = planted("cuda"), planted("metal")
    rng = np.random.default_rng(7)
    out = {}
    for label, (kb, vb) in (("mma-shape", (4, 4)), ("portable-shape", (5, 3))):
        pages = random_pages(rng, [300, 40], 32, 8, 128, 128, kb, vb, 16)
        got = dispatch.paged_decode_attention(**pages)
        with mx.stream(mx.cpu):
            want = paged_decode_attention_reference(**pages)
        mx.eval(got, want)
        out[label] = dict(
            backend=dispatch.active_backend(),
            bitwise_equal_to_reference=bool(mx.array_equal(got, want).item()),
            max_abs_err=float(mx.max(mx.abs(got - want)).item()))
    # The batched (per-row) decode epilogue: Llama-3-8B heads, bf16 activations, rows of 0, 7
    # and 15 tail tokens.
    lengths, (dk, dv, hq, hkv, bs) = [0, 7, 15], (128, 128, 32, 8, 16)

    def normal(*shape, dtype=mx.float32):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    x = dict(pages_out=normal(3, hq, dv), pages_lse=normal(3, hq) + 4,
             queries=normal(3, hq, 1, dk, dtype=mx.bfloat16), scale=dk ** -0.5,
             tail_keys=normal(3, hkv, bs, dk, dtype=mx.float16),
             tail_values=normal(3, hkv, bs, dv, dtype=mx.float16),
             new_keys=normal(3, hkv, 1, dk, dtype=mx.bfloat16),
             new_values=normal(3, hkv, 1, dv, dtype=mx.bfloat16),
             key_center=mx.zeros((hkv, dk)),
             output_rotation=mx.array(np.linalg.qr(rng.standard_normal((hkv, dv, dv)))[0]
                                      .astype(np.float32)))
    info = mx.array([[n + 1, n] for n in lengths], dtype=mx.int32)
    got = dispatch.batched_decode_epilogue(**x, tail_info=info, block_size=bs)
    with mx.stream(mx.cpu):
        want = batched_epilogue_reference(**x, tail_info=info)
    mx.eval(got, want)
    err = mx.max(mx.abs(got[0].astype(mx.float32) - want[0].astype(mx.float32)))
    out["epilogue-rows"] = dict(
        max_rel_err=float((err / mx.max(mx.abs(want[0].astype(mx.float32)))).item()),
        tails_exact=all(bool(mx.array_equal(a, b).item()) for a, b in zip(got[1:], want[1:])))
    out["gpu"] = attention_kernel.gpu_backend()
    # A batched decode step's launches (tqstore.metal.step_launch) on Llama-3-8B heads: one
    # (the step kernel with the epilogue folded in), two (without), three (the rotation, the
    # attention, the epilogue) or none (the general path: a kernel failed).
    from tools.step_host_cost import small_llama
    from tqstore.metal import step_launch
    from tqstore.paged import CachePolicy, pool_for_model
    pool = pool_for_model(small_llama(2), policy=CachePolicy.default(None), budget_bytes=64 << 20)
    arena = next(a for a in pool.arenas if not a.dense)
    launch = step_launch.batch_step_launch(mx.zeros((3, 32, 1, 128), mx.bfloat16), arena,
                                           mx.zeros((3, 256), mx.int32), 16)
    out["step-launch"] = ("none" if launch is None else "one" if launch.epilogue is None
                          else "two" if launch.rotate is None else "three")
    out["mma"] = out["gpu"] == "cuda" and attention_kernel.mma_capable()
    out["report"] = dispatch.kernel_report()
    out["warnings"] = records
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
