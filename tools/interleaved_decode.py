#!/usr/bin/env python3
"""fp16 against our batched decode in ONE process, in alternating chunks of steps: a ratio that
the host's speed of the moment moves for both sides alike.

Why: tools/batch_decode_gpu.py times its rows one after another, each in its own stretch of
the process. On the H200 the host's graph building for the same code and shape ranged 2.1-4.9
ms a step between processes (docs/BENCHMARKS.md, twenty-third session), and a B=1 step is
bound by the host, so two processes with the same setting gave 0.63x and 0.99x. Here both
sides live in the process at once (mlx-lm's fp16 KVCache and our pool, holding the same random
prefixes as in batch_decode_gpu.py) and take turns: `--chunk` pipelined steps of one, then of
the other, `--pairs` times, the side that goes first alternating. Each pair gives a ratio of
two stretches a few hundred milliseconds apart; the report is their median and spread, and
the whole run's ratio (every step of each side). Past about 14 pairs of 16 steps fp16's
KVCache grows (every 256 tokens), a copy inside one of its chunks: the median absorbs it.

A chunk of 16 steps (the block size) holds one block opening of ours wherever it starts, so
every chunk of ours pays the openings' share. Each chunk starts from a drained GPU (its first
step is not overlapped) and ends with a drain: alike for both sides, it pulls the ratio
slightly toward 1 (about one step in 16). Between chunks our attention routing is
installed or removed (tqstore.paged.install / uninstall), so fp16 runs stock mlx-lm as in
batch_decode_gpu.py.

    PYTHONUNBUFFERED=1 python3 tools/interleaved_decode.py --batch 1 --context 32768
    python3 tools/interleaved_decode.py --shape tiny --batch 2 --context 256 --pairs 2  # CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tqstore  # noqa: E402,F401  (OpenBLAS before MLX, as in every entry point)
import mlx.core as mx  # noqa: E402
from batch_decode_gpu import fp16_batch, tq_batch  # noqa: E402
from gpu_bench_inputs import emit, log  # noqa: E402
from hit_gpu_bench import build_model  # noqa: E402


def pipelined_chunk(step, y: mx.array, steps: int) -> tuple[mx.array, float, list[float],
                                                             list[float], list[float]]:
    """`steps` steps from y, step t+1 built and encoded (mx.async_eval) before waiting on step
    t, as mlx-lm's generate_step does, then drained: (last tokens, seconds, each step's
    building ms, each step's encoding ms, the ms between consecutive steps' completions).

    The intervals leave out the chunk's edges: the first step starts from a drained GPU and
    the last one drains it. Their median is a steady step's pace, free of the chunk's fill
    and of its one block opening (the chunk's seconds include both)."""
    mx.synchronize()
    builds, encodes, done = [], [], []
    t0 = time.perf_counter()
    for _ in range(steps):
        tb = time.perf_counter()
        nxt = step(y)
        te = time.perf_counter()
        mx.async_eval(nxt)
        builds.append(1e3 * (te - tb))
        encodes.append(1e3 * (time.perf_counter() - te))
        mx.eval(y)
        done.append(time.perf_counter())
        y = nxt
    mx.eval(y)
    # done[0] is the previous chunk's last token (or the warm-up's): intervals from done[1].
    intervals = [1e3 * (b - a) for a, b in zip(done[1:], done[2:])]
    return y, time.perf_counter() - t0, builds, encodes, intervals


def run(model, args) -> dict:
    from tqstore.paged import install, uninstall

    fp16_caches, fp16_step = fp16_batch(model, args.batch, args.context, args.seed)
    install(model)
    try:
        pool, sequences, tq_step = tq_batch(model, args.batch, args.context, args.seed,
                                            args.pool_mib)
    finally:
        uninstall(model)
    sides = {"fp16": fp16_step, "tq-batched": tq_step}
    tokens = {name: mx.zeros((args.batch,), dtype=mx.int32) for name in sides}
    seconds = {name: [] for name in sides}
    builds = {name: [] for name in sides}
    encodes = {name: [] for name in sides}
    intervals = {name: [] for name in sides}

    def turn(name: str, steps: int, record: bool) -> None:
        if name != "fp16":
            install(model)
        try:
            y, s, b, e, gaps = pipelined_chunk(sides[name], tokens[name], steps)
        finally:
            if name != "fp16":
                uninstall(model)
        tokens[name] = y
        if record:
            seconds[name].append(s)
            builds[name] += b
            encodes[name] += e
            intervals[name] += gaps

    for name in sides:  # first-use kernel builds, self-checks and a block opening of ours
        turn(name, args.warmup, record=False)
    order = list(sides)
    for pair in range(args.pairs):
        for name in (order if pair % 2 == 0 else order[::-1]):
            turn(name, args.chunk, record=True)
    ratios = [f / t for f, t in zip(seconds["fp16"], seconds["tq-batched"])]
    report = {"batch": args.batch, "context": args.context, "chunk": args.chunk,
              "pairs": args.pairs, "pool_mib": args.pool_mib,
              "pair_ratios": ratios, "median_ratio": statistics.median(ratios),
              "whole_run_ratio": sum(seconds["fp16"]) / sum(seconds["tq-batched"])}
    for name in sides:
        total_steps = args.chunk * args.pairs
        report[name] = {"tok_s": args.batch * total_steps / sum(seconds[name]),
                        "median_build_ms": statistics.median(builds[name]),
                        "median_encode_ms": statistics.median(encodes[name]),
                        "chunk_seconds": seconds[name],
                        "steady_steps": len(intervals[name]),
                        "median_step_ms": (statistics.median(intervals[name])
                                           if intervals[name] else None)}
    if intervals["fp16"] and intervals["tq-batched"]:
        # The steady pace's ratio: without each chunk's fill and drain and our block openings
        # (one in 16 steps), which median_ratio and whole_run_ratio both include.
        report["median_step_ratio"] = (report["fp16"]["median_step_ms"]
                                       / report["tq-batched"]["median_step_ms"])
    report["kv_bytes_per_seq"] = {
        "fp16": sum(c.nbytes for c in fp16_caches) / args.batch,
        "tq-batched": sum(c.nbytes for caches in sequences for c in caches) / args.batch}
    for caches in sequences:
        caches[0].sequence.release()
    del pool
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=16,
                    help="pipelined steps per turn (16, the block size: one block opening of "
                         "ours in every turn)")
    ap.add_argument("--pairs", type=int, default=12, help="turns of each side")
    ap.add_argument("--warmup", type=int, default=20,
                    help="untimed steps of each side first (20 cover a block opening)")
    ap.add_argument("--pool-mib", type=int, default=12000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.chunk < 1 or args.pairs < 1:
        ap.error("--chunk and --pairs must be at least 1")
    report = run(build_model(args.shape, args.seed).model, args)
    report["device"] = str(mx.default_device())
    ratios = report["pair_ratios"]
    log(f"B={args.batch} context {args.context}: {args.pairs} pairs of {args.chunk} pipelined "
        f"steps; tq-batched against fp16 per pair: median {report['median_ratio']:.2f}x "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}); whole run "
        f"{report['whole_run_ratio']:.2f}x"
        + (f"; median steady step {report['median_step_ratio']:.2f}x"
           if "median_step_ratio" in report else ""))
    for name in ("fp16", "tq-batched"):
        r = report[name]
        step_ms = r["median_step_ms"]
        log(f"  {name:>10}: {r['tok_s']:.1f} tok/s, median step "
            f"{'-' if step_ms is None else f'{step_ms:.2f}'} ms, median build "
            f"{r['median_build_ms']:.2f} ms, "
            f"encode {r['median_encode_ms']:.2f} ms, KV MiB/seq "
            f"{report['kv_bytes_per_seq'][name] / 2**20:.1f}")
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
