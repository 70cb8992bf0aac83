"""Where one launch of the tensor-core attention kernel spends its time, phase by phase.

The kernel source is instrumented: thread 0 of every threadgroup writes clock64() (and the
GPU's globaltimer) at the phase boundaries below into an extra uint64 output, and the tool
prints the median time of each phase over threadgroups and launches, at B=1 with the default
launch (33 splits x 8 kv heads on an H100). One launch per eval, so launches do not overlap.
Scratch versions of it found the ~10 us that the small-pool inputs cost (tqstore.small_arrays)
and the merge's one-load-per-split schedule (docs/fragments/kernels.md).

`--forms` picks the kernel forms: `split` (the attention alone: rotated float32 queries in,
the fused split-K merge), `step` (the step form: the model's bf16 queries rotated in every
threadgroup, the caller's arrival counters) and `step-epilogue` (the step form with the
per-row epilogue folded into the merging threadgroup: a layer's whole decode step, as
tqstore.metal.step_launch launches it). Each form's launch span (globaltimer, first start to
last end) is the kernel's own time without the host; the differences between forms are
what the rotation and the epilogue add.

Device only (needs MLX's CUDA backend):
    PYTHONUNBUFFERED=1 python3 tools/mma_phases.py [--contexts 32768,131072] [--forms split,step]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from tqstore.metal.attention_kernel import (as_dtype, gpu_backend, launch_plan,  # noqa: E402
                                            mma_kernel_interface)
from tqstore.metal.attention_mma import (LUT_BYTES, MmaGeometry,  # noqa: E402
                                         mma_attention_body)

STAMPS = 14  # per threadgroup: the most any form uses (len(phases(geo)) + 2)
FORMS = ("split", "step", "step-epilogue")
# (phase ending at this stamp, source anchor, insert after the anchor?, condition that makes
# the stamp wait for the phase's loads). Stamp 0 is the start; the last stamp is at the end.
_BOUNDS = ("seq_lens, split bounds", "  const int tile0 = start + warp * TILE;\n", True,
           "end >= -5")
_TAIL = [
    ("main loop (warp 0)", "#undef TQ_LUT\n", True, "true"),
    ("warps merged, partial stored", "  TQ_FENCE();\n  TQ_BARRIER();\n  TQ_SHARED int tq_last;",
     False, "true"),
    ("fence + arrival counter", "  if (tq_last) {  // uniform over the threadgroup\n", False,
     "true"),
]
# The attention alone (rotated queries in): queries load first, then codes, then the table.
PHASES = [
    _BOUNDS,
    ("queries (first loads)", "  // Code words in flight", False, "qf[0][0] != 12345u"),
    ("codes issued, table built", "  const tq_u32 lk = (tq_u32)lane * 4u", False, "true"),
] + _TAIL
# The step form: codes issued first, the queries scaled and rotated while they fly, then the
# table over the staging area.
STEP_PHASES = [
    _BOUNDS,
    ("codes issued", "  float* const tq_qs = (float*)tq_lut;", False, "true"),
    ("queries scaled and rotated", "  tq_u32 qf[KSTEPS][2];", False, "true"),
    ("query fragments", "  // The dequantization table: entry e", False, "true"),
    ("table built", "  const tq_u32 lk = (tq_u32)lane * 4u", False, "true"),
] + _TAIL
# The merging threadgroup's last phases in the folded form: the merge, then the epilogue's
# parts (tqstore.metal.epilogue.epilogue_core; the last one ends at the final stamp).
EPILOGUE_PHASES = [
    ("split-K merge (merging threadgroups)", "  TQ_BARRIER();  // out and lse are written",
     False, "true"),
    ("epilogue: queries, output, tail values", "  // Tail scores s = q . (k - c)", False,
     "true"),
    ("epilogue: tail keys, scores", "  // Per head, softmax over (pages, tail)", False, "true"),
    ("epilogue: softmax", "  // Per pass of DW output dims", False, "true"),
]


def phases(geo: MmaGeometry) -> list[tuple[str, str, bool, str]]:
    """The stamped phases of `geo`'s split kernel, in order (the final stamp, at the end of
    the body, is not listed: it closes the merge, or the epilogue where it is folded in)."""
    if not geo.step:
        return PHASES
    return STEP_PHASES + (EPILOGUE_PHASES if geo.epilogue else [])


def phase_names(geo: MmaGeometry) -> list[str]:
    last = "epilogue: output dims" if geo.epilogue else "merge (merging threadgroups)"
    return [p[0] for p in phases(geo)] + [last]


def _stamp(i: int, cond: str) -> str:
    return (f"\n#if defined(__CUDA_ARCH__)\n  if (tq_tid == 0 && ({cond})) {{ unsigned long long gt_; "
            f"asm volatile(\"mov.u64 %0, %globaltimer;\" : \"=l\"(gt_)); "
            f"dbg[tg_ * {2 * STAMPS} + {i}] = gt_; "
            f"dbg[tg_ * {2 * STAMPS} + {STAMPS} + {i}] = clock64(); }}\n#endif\n")


def instrumented_source(geo: MmaGeometry) -> str:
    """The fused split kernel's body with a clock stamp per phase boundary per threadgroup.
    The final stamp, at the end, is written by every threadgroup; it closes the merge (and
    the folded epilogue) in the one threadgroup per (sequence, kv head) that runs them. The
    epilogue's own stamps (EPILOGUE_PHASES) only the merging threadgroups write: the others
    leave them zero."""
    src = mma_attention_body(geo, True)
    start = "  const int h0 = kvh * G;\n"
    if start not in src:
        raise ValueError("the kernel body changed: no start anchor")
    src = src.replace(start, start + "  const int tg_ = (b * HKV + kvh) * nsplit + split;\n"
                      + "  (void)tg_;\n" + _stamp(0, "true"), 1)
    marks = phases(geo)
    for i, (name, anchor, after, cond) in enumerate(marks, start=1):
        if src.count(anchor) != 1:
            raise ValueError(f"the kernel body changed: no single anchor for phase {name!r}")
        src = src.replace(anchor, anchor + _stamp(i, cond) if after else _stamp(i, cond) + anchor, 1)
    return src + _stamp(len(marks) + 1, "true")


def form_geometry(form: str) -> MmaGeometry:
    """Llama-3-8B's attention shape in the default launch's knobs, in one of FORMS."""
    return MmaGeometry(128, 128, 16, 32, 8, warps=8, depth=1, fused=True,
                       step=form != "split",
                       epilogue="bfloat16" if form == "step-epilogue" else None)


def form_kernel(geo: MmaGeometry):
    inputs, outputs, header = mma_kernel_interface(geo, True)
    return mx.fast.cuda_kernel(
        name=f"tq_mma_phases_{geo.tag()}", input_names=list(inputs),
        output_names=list(outputs) + ["dbg"], source=instrumented_source(geo), header=header,
        ensure_row_contiguous=True, shared_memory=LUT_BYTES)


def form_inputs(geo: MmaGeometry, p: dict, plan, rng: np.random.Generator
                ) -> tuple[list[mx.array], list, list]:
    """(inputs, output shapes, output dtypes) of one launch at B=1, the dbg output last."""
    from tqstore.metal.batch_step import scale_array
    from tqstore.small_arrays import padded_array
    hq, hkv, dk, dv, bs = 32, 8, 128, 128, 16
    pages = [p["key_codes"], p["key_scales"], p["value_codes"], p["value_scales"],
             p["block_tables"], p["seq_lens"], p["key_codebook"], p["value_codebook"],
             plan.params]
    shapes, dtypes = [(plan.fused_rows, hq, dv)], [mx.float32]
    if not geo.step:
        return [as_dtype(p["queries"], mx.float32)] + pages, shapes, dtypes

    def normal(*shape, dt=np.float32):
        return mx.array((rng.standard_normal(shape) * 2.0).astype(dt))

    def rotation(d: int) -> mx.array:
        return mx.array(np.linalg.qr(rng.standard_normal((hkv, d, d)))[0].astype(np.float32))

    arrivals = padded_array([0] * hkv)
    inputs = ([normal(1, hq, 1, dk).astype(mx.bfloat16), rotation(dk), scale_array(dk ** -0.5)]
              + pages + [arrivals, arrivals])  # `after`: never read
    if geo.epilogue:
        inputs += [normal(1, hkv, bs, dk, dt=np.float16), normal(1, hkv, bs, dv, dt=np.float16),
                   normal(1, hkv, 1, dk).astype(mx.bfloat16),
                   normal(1, hkv, 1, dv).astype(mx.bfloat16),
                   mx.array([[bs // 2 + 1, bs // 2]], dtype=mx.int32),  # a half-full tail
                   normal(hkv, dk), rotation(dv)]
        shapes += [(1, hq, 1, dv), (1, hkv, bs, dk), (1, hkv, bs, dv)]
        dtypes += [mx.bfloat16, mx.float16, mx.float16]
    return inputs, shapes, dtypes


def summarize(geo: MmaGeometry, runs: list[np.ndarray], clock_ghz: float
              ) -> tuple[list[float], list[tuple[str, float, float]]]:
    """From each launch's dbg output (threadgroups x 2 * STAMPS: globaltimer ns, then clock64
    cycles): (each launch's span in us, first start to last end on the globaltimer; per
    phase (name, median us, p90 us) over threadgroups and launches). The phases only the
    merging threadgroups run are summarized over those alone: the ones whose epilogue stamps
    are set, or without the epilogue the ones whose last phase took over 0.5 us."""
    names = phase_names(geo)
    last = len(names)
    clk = np.concatenate([r[:, STAMPS:] for r in runs]) / (clock_ghz * 1e3)
    spans = [(r[:, last].max() - r[:, 0].min()) / 1e3 for r in runs]
    merging = (clk[:, last - 1] > 0 if geo.epilogue
               else clk[:, last] - clk[:, last - 1] > 0.5)
    first_merging = last - (len(EPILOGUE_PHASES) if geo.epilogue else 0)
    rows = []
    for i, name in enumerate(names, start=1):
        d = clk[:, i] - clk[:, i - 1]
        if i >= first_merging:
            d = d[merging]
        rows.append((name, float(np.median(d)), float(np.percentile(d, 90))))
    return spans, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--forms", default="split", help=f"comma-separated, of {','.join(FORMS)}")
    ap.add_argument("--launches", type=int, default=16)
    ap.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock for clock64 -> us")
    args = ap.parse_args()
    forms = args.forms.split(",")
    if any(f not in FORMS for f in forms):
        ap.error(f"--forms: choose from {', '.join(FORMS)}")
    if gpu_backend() != "cuda":
        print("needs MLX's CUDA backend", file=sys.stderr)
        return 2
    from tqstore.bench.attention import random_pages

    rng = np.random.default_rng(11)
    for ctx in (int(c) for c in args.contexts.split(",")):
        p = random_pages(rng, [ctx], 32, 8, 128, 128, 4, 4, 16, 0)
        plan = launch_plan(p["queries"], p["key_codes"], p["value_codes"], p["block_tables"], 4, 4)
        groups = plan.nsplit * 8
        for form in forms:
            geo = form_geometry(form)
            kern = form_kernel(geo)
            inputs, shapes, dtypes = form_inputs(geo, p, plan, rng)
            runs = []
            for i in range(args.launches + 2):
                dbg = kern(inputs=inputs, output_shapes=shapes + [(groups, 2 * STAMPS)],
                           output_dtypes=dtypes + [mx.uint64], grid=plan.grid,
                           threadgroup=plan.group, init_value=0.0)[-1]
                mx.eval(dbg)
                if i >= 2:  # two warm-up launches
                    runs.append(np.array(dbg).astype(np.int64))
            spans, rows = summarize(geo, runs, args.clock_ghz)
            print(f"{form}: B=1 ctx {ctx}, {plan.nsplit} splits x 8 kv heads: launch span "
                  f"(first start to last end, globaltimer) median {np.median(spans):.1f} us, "
                  f"min {min(spans):.1f}")
            for name, median, p90 in rows:
                print(f"  {name:36s} median {median:6.2f} us  p90 {p90:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
