"""`tqstore bench attention`: correctness of the decode-attention kernels against the pure-MLX
oracle on fresh random pages, then per-layer decode time against fp16 SDPA in the same run.

Rows: `default` is what dispatch runs (on CUDA sm_80+ the tensor-core kernel where the shape
fits, attention_mma.py), `portable` the one-body Metal/CUDA kernel on the same pages; --sweep
adds tuning variants. Every check runs twice and must give identical bits (determinism).

Timing method: a decode step runs one attention call per layer back to back, so each timed
sample queues `layers` independent layer-shaped calls before one mx.eval and divides; a lone
call with its own eval would measure launch + sync (>= 115 us on an H100), not the kernel.
The calls are independent and MLX's CUDA backend spreads them over several streams, so one
call's tail can overlap the next one's start (a CUPTI timeline shows it; a decode step's
layers depend on each other). Two figures per row, from the same samples: graph building +
eval, and eval only (the Python that builds the calls, which a decode loop overlaps with the
previous token's GPU work, left out). Both apply to the SDPA baseline alike.
Bandwidth: compressed bytes read (codes + fp16 scales) over time, against an elementwise copy
of 1 GiB measured in the same run (bytes read + written).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from tqstore.codec.codebook import lloyd_max_codebook
from tqstore.metal.attention_kernel import (TARGET_GROUPS, choose_num_splits, gpu_backend,
                                            kernel_paged_decode_attention, launch_plan)
from tqstore.metal.dispatch import active_backend
from tqstore.metal.selfcheck import TOLERANCE
from tqstore.metal.reference import paged_decode_attention_reference as paged_decode_attention_oracle
from tqstore.small_arrays import padded_array, padded_rows


def random_pages(rng: np.random.Generator, seq_lens: list[int], hq: int, hkv: int, dk: int,
                 dv: int, kbits: int, vbits: int, block_size: int, spare_blocks: int = 3):
    """Random valid pages: shuffled block ids (never block 0, the null block), random codes and
    positive scales; the tail of every table points at the null block."""
    bsz = len(seq_lens)
    need = [-(-max(n, 1) // block_size) for n in seq_lens]
    max_blocks = max(need)
    num_blocks = 1 + sum(need) + spare_blocks
    ids = rng.permutation(np.arange(1, num_blocks)).astype(np.int32)
    tables = np.zeros((bsz, max_blocks), dtype=np.int32)
    pos = 0
    for b, n in enumerate(need):
        tables[b, :n] = ids[pos:pos + n]
        pos += n

    def codes(d: int, bits: int) -> mx.array:
        return mx.random.randint(0, 256, (num_blocks, hkv, block_size, d * bits // 8)).astype(mx.uint8)

    def scales() -> mx.array:
        return mx.random.uniform(0.25, 3.0, (num_blocks, hkv, block_size)).astype(mx.float16)

    return dict(
        queries=mx.random.normal((bsz, hq, dk)) * 2.0,
        key_codes=codes(dk, kbits), key_scales=scales(),
        value_codes=codes(dv, vbits), value_scales=scales(),
        block_tables=padded_rows(tables.tolist()), seq_lens=padded_array(list(seq_lens)),
        key_codebook=mx.array(lloyd_max_codebook(dk, kbits)),
        value_codebook=mx.array(lloyd_max_codebook(dv, vbits)),
        key_bits=kbits, value_bits=vbits)


# (name, seq_lens, Hq, Hkv, Dk, Dv, kbits, vbits, block_size, forced splits or None)
CHECKS = [
    ("gqa4 b1 single", [777], 32, 8, 128, 128, 4, 4, 16, 1),
    ("gqa4 b1 split", [5000], 32, 8, 128, 128, 4, 4, 16, None),
    ("gqa4 ragged b4", [1, 17, 300, 9000], 32, 8, 128, 128, 4, 4, 16, None),
    ("gqa4 ragged b3 bs32 splits7", [4096, 33, 2500], 32, 8, 128, 128, 4, 4, 32, 7),
    ("gqa3 d64 k3v4 bs8", [129, 1000], 9, 3, 64, 64, 3, 4, 8, None),
    ("gqa3 d64 k4v4 bs16", [129, 1000], 9, 3, 64, 64, 4, 4, 16, None),
    ("mha d96/64 k2v8 bs64", [700, 64], 4, 4, 96, 64, 2, 8, 64, 3),
    ("mha d96/64 k4v4 bs64", [700, 64], 4, 4, 96, 64, 4, 4, 64, 3),
    ("gqa8 k4v4 bs256 zero-len", [0, 3000], 8, 1, 128, 128, 4, 4, 256, 4),
    ("gqa4 b8 32k", [32768] * 2 + [20000, 1, 9, 31000, 4096, 100], 32, 8, 128, 128, 4, 4, 16, None),
]

# Error bounds against the fp32 oracle: the kernels' self-check's (tqstore.metal.selfcheck).


_LAUNCH_KEYS = ("split_scale", "groups")  # bench-level: how many splits, not kernel knobs


def _knobs(variant: dict | None) -> dict | None:
    return None if variant is None else {k: v for k, v in variant.items() if k not in _LAUNCH_KEYS}


def _splits(variant: dict | None, batch: int, hkv: int, tokens: int) -> int | None:
    """None (the plan's own choice) unless the variant asks for a split policy."""
    v = variant or {}
    if "groups" not in v and "split_scale" not in v:
        return None
    if "groups" in v:  # at most this many threadgroups
        return choose_num_splits(batch, hkv, tokens, v["groups"], round_up=False)
    return choose_num_splits(batch, hkv, tokens, TARGET_GROUPS) * v["split_scale"]


def _plan_of(pages: dict, splits: int | None, variant: dict | None):
    return launch_plan(pages["queries"], pages["key_codes"], pages["value_codes"],
                       pages["block_tables"], pages["key_bits"], pages["value_bits"],
                       num_splits=splits, variant=_knobs(variant))


def run_checks(seed: int, variants: list[dict | None]) -> tuple[list[dict], bool]:
    """Every check on the automatic choice and on the portable kernel, the first ragged check
    on every variant, and a bitwise rerun (determinism) of each."""
    rng = np.random.default_rng(seed)
    mx.random.seed(seed)
    rows, ok = [], True
    cases = [(c, v) for c in CHECKS for v in (None, PORTABLE)]
    cases += [(CHECKS[2], v) for v in variants if v not in (None, PORTABLE)]
    for (name, lens, hq, hkv, dk, dv, kb, vb, bs, splits), variant in cases:
        pages = random_pages(rng, lens, hq, hkv, dk, dv, kb, vb, bs)
        kind = _plan_of(pages, splits, variant).kind
        name = f"{name} {_vname(variant)}:{kind}"
        with mx.stream(mx.cpu):  # full fp32 (MLX's GPU matmul may round through TF32)
            ref, ref_lse = paged_decode_attention_oracle(**pages, return_lse=True)
            mx.eval(ref, ref_lse)
        got, lse = kernel_paged_decode_attention(**pages, num_splits=splits,
                                                 variant=_knobs(variant), return_lse=True)
        again, lse2 = kernel_paged_decode_attention(**pages, num_splits=splits,
                                                    variant=_knobs(variant), return_lse=True)
        same_bits = bool((mx.all(got.view(mx.uint32) == again.view(mx.uint32))
                          & mx.all(lse.view(mx.uint32) == lse2.view(mx.uint32))).item())
        has = mx.isfinite(ref_lse)
        lse_err = float(mx.max(mx.where(has, mx.abs(lse - ref_lse), 0.0)).item())
        lse_empty_ok = bool(mx.all(mx.where(has, True, lse == -mx.inf)).item())
        err = mx.abs(got - ref)
        max_abs = float(mx.max(err).item())
        rel = float((mx.sqrt(mx.sum(err * err)) / mx.maximum(mx.sqrt(mx.sum(ref * ref)), 1e-30)).item())
        finite = bool(mx.all(mx.isfinite(got)).item())
        tol_rel, tol_abs, tol_lse = TOLERANCE[kind]
        zeros_ok = all(bool(mx.all(got[b] == 0).item()) for b, n in enumerate(lens) if n == 0)
        passed = (finite and same_bits and zeros_ok and lse_empty_ok and rel < tol_rel
                  and max_abs < tol_abs and lse_err < tol_lse)
        row = dict(name=name, kernel=kind, max_abs_err=max_abs, rel_err=rel, finite=finite,
                   lse_abs_err=lse_err,
                   deterministic=same_bits, passed=passed,
                   splits=_plan_of(pages, splits, variant).nsplit)
        if min(lens) >= 1 and variant is None:  # the paged reference needs seq_len >= 1
            try:
                from tqstore.metal.reference import paged_decode_attention_reference
                with mx.stream(mx.cpu):
                    other = paged_decode_attention_reference(**pages)
                row["max_abs_err_vs_paged_ref"] = float(mx.max(mx.abs(got - other)).item())
                passed = passed and row["max_abs_err_vs_paged_ref"] < tol_abs
                row["passed"] = passed
            except ImportError as e:  # tqstore.paged needs mlx-lm
                if not rows or "paged_ref_skipped" not in rows[0]:
                    print(f"(no comparison with tqstore.paged's reference here: {e})", flush=True)
                row["paged_ref_skipped"] = str(e)
        ok = ok and passed
        rows.append(row)
        vs_paged = (f" vs-paged {row['max_abs_err_vs_paged_ref']:.1e}"
                    if "max_abs_err_vs_paged_ref" in row else "")
        print(f"check {name:52s} max_abs {max_abs:.2e} rel {rel:.2e} lse {lse_err:.1e}{vs_paged} "
              f"{'same-bits' if same_bits else 'BITS-DIFFER'} {'PASS' if passed else 'FAIL'}",
              flush=True)
    return rows, ok


PORTABLE: dict = dict(kernel="portable")
# Tuning variants (--sweep) of the MMA kernel: warps / tiles in flight / split-K merged in the
# split launch or by the separate merge pass (-sep) / splits (no `groups`: the default policy,
# one wave of resident threadgroups; `gN`: at most N threadgroups).
SWEEP: list[dict] = [
    dict(kernel="mma", warps=4, depth=1, fused=False),    # the previous default (3 per SM)
    dict(kernel="mma", warps=4, depth=1),                 # ... with the fused merge
    dict(kernel="mma", warps=8, depth=1, fused=False),    # the default with the merge pass
    dict(kernel="mma", warps=4, depth=1, groups=264),     # fewer splits with 4 warps
    dict(kernel="mma", warps=4, depth=2),
    dict(kernel="mma", warps=8, depth=1, groups=528),     # 2 waves
    dict(kernel="mma", warps=16, depth=1),                # 1 per SM
]

# (heads, tokens, head_dim, bits, norm_correction, dtype)
QUANT_CHECKS = [(8, 37, 128, 4, True, mx.float16), (8, 17, 128, 3, True, mx.float32),
                (2, 300, 64, 2, False, mx.bfloat16), (4, 9, 128, 8, True, mx.float16),
                (3, 5, 256, 1, True, mx.float32)]


def run_quantize_checks(seed: int) -> tuple[list[dict], bool]:
    """The quantize kernel against codec.quantize on the GPU: identical bytes and fp16 scales,
    and quantizing n tokens at once equals quantizing them in two pieces."""
    from tqstore.codec import CodecConfig, layer_codecs
    from tqstore.metal.quantize import kernel_quantize

    mx.random.seed(seed + 1)
    rows, ok = [], True
    for i, (heads, tokens, dim, bits, nc, dtype) in enumerate(QUANT_CHECKS):
        codec = layer_codecs(CodecConfig(bits, bits, norm_correction=nc, seed=seed), i, heads, dim)[0]
        x = mx.random.normal((2, heads, tokens, dim)) * mx.random.uniform(0.01, 50.0, (2, heads, tokens, 1))
        x = mx.concatenate([x[:, :, :1] * 0.0, x[:, :, 1:]], axis=2).astype(dtype)  # a zero vector
        ref, got = codec.quantize(x), kernel_quantize(codec, x)
        cut = tokens // 2
        a, b = kernel_quantize(codec, x[:, :, :cut]), kernel_quantize(codec, x[:, :, cut:])
        pieces_codes = mx.concatenate([a.codes, b.codes], axis=2)
        code_mism = int(mx.sum(ref.codes != got.codes).item())
        scale_mism = int(mx.sum(ref.scales.view(mx.uint16) != got.scales.view(mx.uint16)).item())
        piece_mism = int(mx.sum(pieces_codes != got.codes).item())
        passed = code_mism == 0 and scale_mism == 0 and piece_mism == 0
        ok = ok and passed
        name = f"quantize h{heads} n{tokens} d{dim} b{bits} nc{int(nc)} {dtype}"
        rows.append(dict(name=name, code_bytes_differing=code_mism, scales_differing=scale_mism,
                         split_vs_whole_differing=piece_mism, total_bytes=ref.codes.size,
                         passed=passed))
        print(f"check {name:44s} differing code bytes {code_mism}/{ref.codes.size}, scales "
              f"{scale_mism}, split-vs-whole {piece_mism} {'PASS' if passed else 'FAIL'}", flush=True)
    return rows, ok


# (Dk, Dv, Hq, Hkv, block_size, batch, n_old, n_new, centered, out dtype)
EPILOGUE_CHECKS = [(128, 128, 32, 8, 16, 1, 5, 1, True, mx.float16),
                   (128, 128, 32, 8, 16, 1, 15, 1, False, mx.bfloat16),
                   (64, 64, 9, 3, 16, 2, 7, 0, True, mx.float32),
                   (96, 64, 4, 4, 256, 1, 200, 1, True, mx.float16)]


def run_epilogue_checks(seed: int) -> tuple[list[dict], bool]:
    """The decode epilogue kernel against tqstore.paged.tail's reference (fp32 on the CPU):
    the next tail bit-exact, the output within its dtype's rounding, bits equal on a rerun."""
    from tqstore.metal.epilogue import kernel_decode_epilogue
    try:
        from tqstore.metal.reference import decode_epilogue_reference
    except ImportError as e:  # tqstore.paged needs mlx-lm, a dependency of the package
        print(f"epilogue checks need tqstore.paged, which did not import: {e}", flush=True)
        return [dict(name="epilogue", passed=False, error=str(e))], False

    mx.random.seed(seed + 2)
    rows, ok = [], True
    for dk, dv, hq, hkv, bs, bsz, n_old, n_new, centered, dtype in EPILOGUE_CHECKS:
        f16 = lambda *s: (mx.random.normal(s) * 2).astype(mx.float16)  # noqa: E731
        rot = mx.array(np.linalg.qr(np.random.default_rng(seed).standard_normal((hkv, dv, dv)))[0]
                       .astype(np.float32))
        x = dict(pages_out=mx.random.normal((bsz, hq, dv)),
                 pages_lse=mx.random.normal((bsz, hq)) * 3 + 4,
                 queries=mx.random.normal((bsz, hq, dk)) * dk ** -0.5,
                 tail_keys=f16(bsz, hkv, n_old, dk), tail_values=f16(bsz, hkv, n_old, dv),
                 new_keys=f16(bsz, hkv, n_new, dk) if n_new else None,
                 new_values=f16(bsz, hkv, n_new, dv) if n_new else None,
                 key_center=(mx.random.normal((hkv, dk)) if centered else mx.zeros((hkv, dk))),
                 output_rotation=rot)
        info = padded_array([n_old + n_new, n_old])
        runs = [kernel_decode_epilogue(gpu_backend(), **x, tail_info=info, block_size=bs,
                                       out_dtype=dtype) for _ in range(2)]
        with mx.stream(mx.cpu):
            want = decode_epilogue_reference(**x, out_dtype=mx.float32)
            mx.eval(want)
        got = runs[0][0].astype(mx.float32)
        err = float((mx.max(mx.abs(got - want[0])) / mx.max(mx.abs(want[0]))).item())
        tail_exact = all(bool(mx.array_equal(a, b).item()) for a, b in zip(runs[0][1:], want[1:]))
        same = all(bool(mx.array_equal(a, b).item()) for a, b in zip(runs[0], runs[1]))
        tol = {mx.float16: 2e-3, mx.bfloat16: 1e-2, mx.float32: 1e-5}[dtype]
        passed = err < tol and tail_exact and same
        ok = ok and passed
        name = f"epilogue h{hq}x{hkv} d{dk}/{dv} bs{bs} b{bsz} tail {n_old}+{n_new} {dtype}"
        rows.append(dict(name=name, max_rel_err=err, tail_exact=tail_exact, deterministic=same,
                         passed=passed))
        print(f"check {name:52s} max_rel {err:.2e} tail {'exact' if tail_exact else 'DIFFERS'} "
              f"{'same-bits' if same else 'BITS-DIFFER'} {'PASS' if passed else 'FAIL'}", flush=True)
    return rows, ok


def _time_queued(fn, inputs: list, reps: int) -> tuple[float, float]:
    """Median seconds per call when len(inputs) calls are queued before one eval: (graph
    building + eval, eval only). The second leaves out the Python that builds the calls'
    graph, which a decode loop overlaps with the previous token's GPU work (mlx-lm's
    generate_step builds step t+1 while async_eval runs step t); both come from the same
    samples."""
    for _ in range(2):
        mx.eval([fn(x) for x in inputs])
    total, evals = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [fn(x) for x in inputs]
        t1 = time.perf_counter()
        mx.eval(outs)
        t2 = time.perf_counter()
        total.append((t2 - t0) / len(inputs))
        evals.append((t2 - t1) / len(inputs))
    return statistics.median(total), statistics.median(evals)


def copy_bandwidth(reps: int = 10) -> float:
    """Bytes/s of an elementwise pass over 1 GiB (read + write counted)."""
    a = mx.random.uniform(shape=(256 * 1024 * 1024,))  # 1 GiB of float32
    mx.eval(a)
    t, _ = _time_queued(lambda x: x + 1.0, [a] * 4, reps)
    return 2 * a.nbytes / t


def _vname(v: dict | None) -> str:
    if v is None:
        return "default"
    if v == PORTABLE:
        return "portable"
    scale = f"x{v['split_scale']}" if v.get("split_scale", 1) != 1 else ""
    scale += f"g{v['groups']}" if "groups" in v else ""
    if v.get("kernel") == "mma":
        return "mma-w{warps}d{depth}".format(**v) + scale + ("" if v.get("fused", True) else "-sep")
    return "port-w{warps}u{unroll}l{lanes}s{head_split}p{p}t{t}".format(
        **v, p=int(v.get("prefetch", True)), t=int(v.get("table_in_shared", True))) + scale


def time_case(batch: int, ctx: int, hq: int, hkv: int, dim: int, bits: int, block_size: int,
              reps: int, budget_bytes: float, variants: list[dict | None]) -> list[dict]:
    rng = np.random.default_rng(batch * 1_000_003 + ctx)
    fp16_layer = 2 * batch * hkv * ctx * dim * 2
    tq_layer = batch * hkv * ctx * (2 * dim * bits // 8 + 4)
    layers = int(max(2, min(16, budget_bytes // (fp16_layer + tq_layer))))
    scale = dim ** -0.5
    dense = []
    for _ in range(layers):
        q = mx.random.normal((batch, hq, 1, dim)).astype(mx.float16)
        k = mx.random.normal((batch, hkv, ctx, dim)).astype(mx.float16)
        v = mx.random.normal((batch, hkv, ctx, dim)).astype(mx.float16)
        mx.eval(q, k, v)
        dense.append((q, k, v))
    t_sdpa, e_sdpa = _time_queued(lambda x: mx.fast.scaled_dot_product_attention(
        x[0], x[1], x[2], scale=scale), dense, reps)
    del dense
    paged = []
    for _ in range(layers):
        p = random_pages(rng, [ctx] * batch, hq, hkv, dim, dim, bits, bits, block_size, 0)
        mx.eval([v for v in p.values() if isinstance(v, mx.array)])
        paged.append(p)
    rows = []
    for variant in variants:
        knobs = _knobs(variant)
        splits = _splits(variant, batch, hkv, ctx)
        t_tq, e_tq = _time_queued(lambda p: kernel_paged_decode_attention(
            **p, num_splits=splits, variant=knobs), paged, reps)
        plan = _plan_of(paged[0], splits, variant)
        rows.append(dict(batch=batch, context=ctx, variant=_vname(variant),
                         kernel=plan.kind, layers_queued=layers,
                         sdpa_fp16_us=t_sdpa * 1e6, tq_us=t_tq * 1e6, ratio=t_tq / t_sdpa,
                         sdpa_eval_us=e_sdpa * 1e6, tq_eval_us=e_tq * 1e6,
                         ratio_eval=e_tq / e_sdpa, tq_eval_gbps=tq_layer / e_tq / 1e9,
                         tq_bytes=tq_layer, tq_gbps=tq_layer / t_tq / 1e9,
                         sdpa_gbps=fp16_layer / t_sdpa / 1e9, splits=plan.nsplit))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write results as JSON to PATH (or stdout without PATH)")
    parser.add_argument("--contexts", default="4096,32768,131072",
                        help="comma-separated context lengths to time (default 4096,32768,131072)")
    parser.add_argument("--batches", default="1,8",
                        help="comma-separated batch sizes to time (default 1,8)")
    parser.add_argument("--block-size", type=int, default=16,
                        help="tokens per page (default 16)")
    parser.add_argument("--bits", type=int, default=4, help="key and value code bits (default 4)")
    parser.add_argument("--reps", type=int, default=15,
                        help="timed samples per row, the median reported (default 15)")
    parser.add_argument("--budget-gb", type=float, default=24.0,
                        help="device memory for the queued layers of one case")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000,
                        help="seed of the random pages of the checks (default: from the clock, "
                             "printed)")
    parser.add_argument("--skip-timing", action="store_true",
                        help="correctness checks only, no timings")
    parser.add_argument("--sweep", action="store_true",
                        help="also check and time the tuning variants in SWEEP")



def run(args: argparse.Namespace) -> int:
    backend = active_backend()
    print(f"backend: {backend}; mlx {mx.__version__}; device {mx.default_device()}; "
          f"seed {args.seed}", flush=True)
    if "-kernel" not in backend:
        print("no GPU kernel backend here: nothing to benchmark", file=sys.stderr)
        return 2
    variants = [None, PORTABLE] + (SWEEP if args.sweep else [])
    checks, ok = run_checks(args.seed, variants)
    qchecks, qok = run_quantize_checks(args.seed)
    echecks, eok = run_epilogue_checks(args.seed)
    ok = ok and qok and eok
    result = dict(backend=backend, mlx=mx.__version__, host=platform.node(), seed=args.seed,
                  checks=checks, quantize_checks=qchecks, epilogue_checks=echecks,
                  checks_passed=ok)
    try:
        result["device_info"] = {k: str(v) for k, v in mx.device_info().items()}
        print(f"device_info: {result['device_info']}", flush=True)
    except Exception:  # noqa: BLE001  (device_info is informative only)
        pass
    if not args.skip_timing:
        bw = copy_bandwidth()
        result["copy_gbps"] = bw / 1e9
        cases = []
        for b in (int(x) for x in args.batches.split(",")):
            for ctx in (int(x) for x in args.contexts.split(",")):
                for row in time_case(b, ctx, 32, 8, 128, args.bits, args.block_size,
                                     args.reps, args.budget_gb * 1e9, variants):
                    row["pct_copy_bw"] = 100.0 * row["tq_gbps"] * 1e9 / bw
                    row["pct_copy_bw_eval"] = 100.0 * row["tq_eval_gbps"] * 1e9 / bw
                    cases.append(row)
                    print(f"  B={b} ctx={ctx} {row['variant']}: sdpa {row['sdpa_fp16_us']:.1f} us,"
                          f" tq {row['tq_us']:.1f} us", flush=True)
        result["cases"] = cases
        print(f"\ncopy bandwidth (1 GiB elementwise, r+w): {bw / 1e9:.0f} GB/s")
        print("per call: graph building + eval | eval only (graph built before the clock)")
        print(f"{'B':>2} {'ctx':>7} {'variant':>12} {'kernel':>8} {'sdpa_fp16_us':>12} {'tq_us':>8} {'ratio':>6} "
              f"{'tq_GB/s':>8} {'%copy':>6} | {'sdpa_ev':>8} {'tq_ev':>8} {'ratio':>6} {'%copy':>6} "
              f"{'splits':>6} {'layers':>6}")
        for r in cases:
            print(f"{r['batch']:>2} {r['context']:>7} {r['variant']:>12} {r['kernel']:>8} {r['sdpa_fp16_us']:>12.1f} {r['tq_us']:>8.1f} "
                  f"{r['ratio']:>6.2f} {r['tq_gbps']:>8.0f} {r['pct_copy_bw']:>6.1f} | "
                  f"{r['sdpa_eval_us']:>8.1f} {r['tq_eval_us']:>8.1f} {r['ratio_eval']:>6.2f} "
                  f"{r['pct_copy_bw_eval']:>6.1f} {r['splits']:>6} {r['layers_queued']:>6}")
    print(f"correctness: {'all checks passed' if ok else 'FAILED'}")
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
