"""Where one launch of the tensor-core attention kernel spends its time, phase by phase.

The kernel source is instrumented: thread 0 of every threadgroup writes clock64() (and the
GPU's globaltimer) at the phase boundaries below into an extra uint64 output, and the tool
prints the median time of each phase over threadgroups and launches, at B=1 with the default
launch (33 splits x 8 kv heads on an H100). One launch per eval, so launches do not overlap.
Scratch versions of it found the ~10 us that the small-pool inputs cost (tqstore.small_arrays)
and the merge's one-load-per-split schedule (docs/fragments/kernels.md).

Device only (needs MLX's CUDA backend):
    PYTHONUNBUFFERED=1 python3 tools/mma_phases.py [--contexts 32768,131072]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from tqstore.metal.attention_kernel import (as_dtype, gpu_backend, launch_plan,  # noqa: E402
                                            mma_resident_groups)
from tqstore.metal.attention_mma import (LUT_BYTES, MmaGeometry, mma_attention_body,  # noqa: E402
                                         mma_header)
from tqstore.metal.attention_source import ATTN_INPUTS  # noqa: E402

STAMPS = 8
# (phase ending at this stamp, source anchor, insert after the anchor?, condition that makes
# the stamp wait for the phase's loads). Stamp 0 is the start.
PHASES = [
    ("seq_lens, split bounds", "  const int tile0 = start + warp * TILE;\n", True, "end >= -5"),
    ("queries (first loads)", "  // Code words in flight", False, "qf[0][0] != 12345u"),
    ("codes issued, table built", "  const tq_u32 lk = (tq_u32)lane * 4u", False, "true"),
    ("main loop (warp 0)", "#undef TQ_LUT\n", True, "true"),
    ("warps merged, partial stored", "  TQ_FENCE();\n  TQ_BARRIER();\n  TQ_SHARED int tq_last;",
     False, "true"),
    ("fence + arrival counter", "  if (tq_last) {  // uniform over the threadgroup\n", False,
     "true"),
]


def _stamp(i: int, cond: str) -> str:
    return (f"\n#if defined(__CUDA_ARCH__)\n  if (tq_tid == 0 && ({cond})) {{ unsigned long long gt_; "
            f"asm volatile(\"mov.u64 %0, %globaltimer;\" : \"=l\"(gt_)); "
            f"dbg[tg_ * {2 * STAMPS} + {i}] = gt_; "
            f"dbg[tg_ * {2 * STAMPS} + {STAMPS} + {i}] = clock64(); }}\n#endif\n")


def instrumented_source(geo: MmaGeometry) -> str:
    """The fused split kernel's body with STAMPS clock stamps per threadgroup (stamp 7, at the
    end, also times the merge in the one threadgroup per (sequence, kv head) that runs it)."""
    src = mma_attention_body(geo, True)
    start = "  const int h0 = kvh * G;\n"
    if start not in src:
        raise ValueError("the kernel body changed: no start anchor")
    src = src.replace(start, start + "  const int tg_ = (b * HKV + kvh) * nsplit + split;\n"
                      + "  (void)tg_;\n" + _stamp(0, "true"), 1)
    for i, (name, anchor, after, cond) in enumerate(PHASES, start=1):
        if anchor not in src:
            raise ValueError(f"the kernel body changed: no anchor for phase {name!r}")
        src = src.replace(anchor, anchor + _stamp(i, cond) if after else _stamp(i, cond) + anchor, 1)
    return src + _stamp(len(PHASES) + 1, "true")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--launches", type=int, default=16)
    ap.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock for clock64 -> us")
    args = ap.parse_args()
    if gpu_backend() != "cuda":
        print("needs MLX's CUDA backend", file=sys.stderr)
        return 2
    from tqstore.bench.attention import random_pages

    geo = MmaGeometry(128, 128, 16, 32, 8, warps=8, depth=1, fused=True)
    kern = mx.fast.cuda_kernel(
        name="tq_mma_phases", input_names=list(ATTN_INPUTS), output_names=["work", "dbg"],
        source=instrumented_source(geo),
        header=mma_header((geo.threads, mma_resident_groups(geo))),
        ensure_row_contiguous=True, shared_memory=LUT_BYTES)
    rng = np.random.default_rng(11)
    names = [p[0] for p in PHASES] + ["merge (merging threadgroups)"]
    for ctx in (int(c) for c in args.contexts.split(",")):
        p = random_pages(rng, [ctx], 32, 8, 128, 128, 4, 4, 16, 0)
        plan = launch_plan(p["queries"], p["key_codes"], p["value_codes"], p["block_tables"], 4, 4)
        groups = plan.nsplit * 8
        inputs = [as_dtype(p["queries"], mx.float32), p["key_codes"], p["key_scales"], p["value_codes"],
                  p["value_scales"], p["block_tables"], p["seq_lens"], p["key_codebook"],
                  p["value_codebook"], plan.params]
        runs = []
        for i in range(args.launches + 2):
            (_, dbg) = kern(inputs=inputs, output_shapes=[(plan.fused_rows, 32, 128),
                                                          (groups, 2 * STAMPS)],
                            output_dtypes=[mx.float32, mx.uint64], grid=plan.grid,
                            threadgroup=plan.group, init_value=0.0)
            mx.eval(dbg)
            if i >= 2:  # two warm-up launches
                runs.append(np.array(dbg).astype(np.int64))
        clk = np.concatenate([r[:, STAMPS:] for r in runs]) / (args.clock_ghz * 1e3)
        spans = [(r[:, STAMPS - 1].max() - r[:, 0].min()) / 1e3 for r in runs]
        print(f"B=1 ctx {ctx}, {plan.nsplit} splits x 8 kv heads: launch span (first start to "
              f"last end, globaltimer) median {np.median(spans):.1f} us, min {min(spans):.1f}")
        for i, name in enumerate(names, start=1):
            d = clk[:, i] - clk[:, i - 1]
            if i == len(names):
                d = d[d > 0.5]  # only the merging threadgroups do work here
            print(f"  {name:30s} median {np.median(d):6.2f} us  p90 {np.percentile(d, 90):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
