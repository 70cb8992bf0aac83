"""Run decode attention through dispatch with a planted wrong GPU kernel, in a fresh process
(compiled kernels are cached per process by name and source), and print what happened as JSON.

  python -m tests.metal.planted_kernel compile   the tensor-core and portable attention
                                                 kernels fail to compile
  python -m tests.metal.planted_kernel wrong     both compile and write a wrong output element
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
    from tqstore.metal.reference import paged_decode_attention_reference

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("tqstore").addHandler(Keep(level=logging.WARNING))
    real = {"cuda": mx.fast.cuda_kernel, "metal": mx.fast.metal_kernel}

    def planted(kind: str):
        def build(**kw):
            name = kw["name"]
            if name.startswith("tq_attn_") and plant != "none":
                kw["name"] = name + "_planted"
                if plant == "compile":
                    kw["source"] += "\n  this is not a statement;\n"
                elif "_single_" in name:  # a numerically wrong single-pass kernel
                    kw["source"] += "\n  out[0] = 12345.0f;\n"
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
    out["report"] = dispatch.kernel_report()
    out["warnings"] = records
    out["gpu"] = attention_kernel.gpu_backend()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
