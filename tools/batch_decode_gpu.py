#!/usr/bin/env python3
"""Batched decode on one GPU: B sequences at a long context, tqstore's paged TurboQuant cache
(the serving engine's batched step, tqstore.paged.batch) against mlx-lm's fp16 KVCache holding
the same batch, in the same run. Issue 15's batched goal (B=8 at 32k) and its memory goal (how
many sequences of that context fit in the fp16 batch's KV bytes).

A random-weight Llama-3-8B-shaped model (bf16, SmolLM2's vocabulary: tools/hit_gpu_bench.py).
Every sequence's context is random fp16 K/V loaded as a prefix (decode speed does not depend on
the keys; tools/attention_e2e.py does the same for B=1), all B of the same length. Rows:
  fp16        mlx-lm KVCache per layer holding the B rows, stock SDPA
  tq-rows     our batched step, each row attended on its own (tqstore.paged.batch.BATCH_MODE
              "rows": the code before any batched launch)
  tq-pages    every row's pages in one attention launch, then each row's own epilogue and
              tail ("pages": the default before the shared tails)
  tq-3launch  the rows' tails in one buffer per layer (tqstore.paged.shared_tail), a rotation,
              an attention and an epilogue launch per layer for the whole batch (the default
              before tqstore.metal.step_launch's step form: STEP_FORM off)
  tq-2launch  as tq-3launch, but where the tensor-core kernel fits its step form folds the
              rotation in and needs no zero-fill: the step kernel and the per-row epilogue
              (the default before the epilogue was folded in: FOLD_EPILOGUE off)
  tq-batched  the default ("shared"): as tq-2launch with the per-row epilogue folded into the
              step kernel (tqstore.metal.mma_epilogue): one launch per layer
With --rounds R each (B, context) runs R times, our rows' order rotated by one each round, and
the report adds each row's median ratio. Per row: tokens/s (B tokens per step) built and
evaluated step by step as the serving engine does (`sync`) and pipelined as mlx-lm's
generate_step does (`pipelined`: the graph of step t+1 is built while step t runs); the host's
graph-building ms per sync step; per pipelined step the host's ms building and encoding
(mx.async_eval) the next step and its ms waiting for the GPU (a wait near zero: the host sets
the pace, or async_eval itself waited: it does when more than 10 CUDA graphs are in flight, see
--graphs); a pipelined step's median and longest ms (first to last: a stall shows as a long
maximum over a median at the pace) and the most memory in use during any pipelined step above
what was in use at its start (`peak MiB`, net of what the step freed; the slowest steps are
listed with theirs and their ms split into building, encoding and waiting); KV bytes per
sequence after the timed steps (fp16: the KVCache's bytes / B, in the model's dtype (bf16), as
allocated: mlx-lm grows it in 256-token steps; ours: the pool's bytes held by the B sequences /
B) and the sequences of this context that fit in the fp16 batch's KV bytes at ours per
sequence.

With --graphs DIR nothing is timed: each row instead counts its ops per step (by primitive)
and the CUDA graphs MLX commits per step (sync, then pipelined) with their kernel nodes (not
those inside captured child graphs: cuBLAS's), from the graphs MLX writes into DIR when
MLX_SAVE_CUDA_GRAPHS_DOT_FILE is set (MLX's CUDA backend; the tool sets it). Why: MLX cuts a
step's work into graphs of at most MLX_MAX_OPS_PER_BUFFER ops or MLX_MAX_MB_PER_BUFFER Mi
input elements, and `mx.async_eval` waits for the GPU whenever more than 10 graphs are in
flight. tools/graph_limits_gpu.sh runs this tool under other limits.

    PYTHONUNBUFFERED=1 python3 tools/batch_decode_gpu.py --batches 8 32 --contexts 8192 32768
    python3 tools/batch_decode_gpu.py --shape tiny --batches 2 --contexts 256 --steps 4   # CPU
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tqstore  # noqa: E402,F401  (OpenBLAS before MLX, as in every entry point)
import mlx.core as mx  # noqa: E402
from gpu_bench_inputs import emit, log  # noqa: E402
from hit_gpu_bench import build_model  # noqa: E402


def random_kv(model, batch: int, context: int, seed: int, dtype: mx.Dtype):
    """Per layer, random (K, V) of shape (batch, Hkv, context, head_dim) in ``dtype``."""
    attn = model.layers[0].self_attn
    head_dim = model.args.hidden_size // model.args.num_attention_heads
    shape = (batch, attn.n_kv_heads, context, head_dim)
    key = mx.random.key(seed)
    for _ in model.layers:
        key, a, b = mx.random.split(key, 3)
        yield (mx.random.normal(shape, key=a).astype(dtype),
               mx.random.normal(shape, key=b).astype(dtype))


def timed(step, batch: int, steps: int, warmup: int) -> dict:
    """Tokens/s of `step(tokens) -> next tokens`, sync (build, then evaluate, each step) and
    pipelined (mx.async_eval of step t+1 before waiting on step t), and graph-building ms."""
    y = mx.zeros((batch,), dtype=mx.int32)
    for _ in range(warmup):  # the first quantizes the loaded prefixes (ours)
        y = step(y)
        mx.eval(y)
    build = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        tb = time.perf_counter()
        y = step(y)
        build += time.perf_counter() - tb
        mx.eval(y)
    sync_s = time.perf_counter() - t0
    host = wait = 0.0
    per_step = []  # each pipelined step's ms: a few long ones are stalls, not the pace
    t0 = time.perf_counter()
    # Per pipelined step, MiB: the most memory in use during it (MLX's peak, reset at its
    # start) less what was in use at its start. Net: a step that frees first may show < 0.
    peaks = []
    # Per pipelined step, ms: the host's Python building its graph, then MLX encoding it
    # (mx.async_eval: CUDA graphs captured, updated or instantiated, and launched).
    builds, encodes = [], []
    for _ in range(steps):
        mx.reset_peak_memory()
        live = mx.get_active_memory()
        th = time.perf_counter()
        nxt = step(y)
        tb = time.perf_counter()
        mx.async_eval(nxt)
        tw = time.perf_counter()
        mx.eval(y)
        done = time.perf_counter()
        host, wait = host + tw - th, wait + done - tw
        per_step.append(1e3 * (done - th))
        builds.append(1e3 * (tb - th))
        encodes.append(1e3 * (tw - tb))
        peaks.append((mx.get_peak_memory() - live) / 2**20)
        y = nxt
    mx.eval(y)
    pipe_s = time.perf_counter() - t0
    # Pipelined, per step: the host's building and encoding of step t+1 (host_ms), then its
    # wait for step t (wait_ms). A wait near zero: the host sets the pace, not the GPU.
    return {"sync_tok_s": batch * steps / sync_s, "pipelined_tok_s": batch * steps / pipe_s,
            "build_ms": 1e3 * build / steps, "host_ms": 1e3 * host / steps,
            "wait_ms": 1e3 * wait / steps, "pipelined_step_ms_median": statistics.median(per_step),
            "pipelined_step_ms_max": max(per_step), "pipelined_step_ms": per_step,
            "pipelined_step_peak_mib": peaks, "pipelined_step_build_ms": builds,
            "pipelined_step_encode_ms": encodes}


def step_runners(step, state: dict, steps: int):
    """(run_sync, run_pipelined): `steps` steps from state["y"], evaluated one by one, or
    with step t+1 encoded (mx.async_eval) before waiting on step t; state["y"] follows."""
    def run_sync():
        for _ in range(steps):
            state["y"] = step(state["y"])
            mx.eval(state["y"])

    def run_pipelined():
        for _ in range(steps):
            nxt = step(state["y"])
            mx.async_eval(nxt)
            mx.eval(state["y"])
            state["y"] = nxt
        mx.eval(state["y"])

    return run_sync, run_pipelined


def ops_in_step(step, y: mx.array, dot_path: str) -> tuple[mx.array, dict[str, int]]:
    """One step, with the primitives MLX will evaluate for it counted by name (from
    mx.export_to_dot of its unevaluated graph): the ops the host builds and encodes."""
    nxt = step(y)
    mx.export_to_dot(dot_path, nxt)
    ops = Counter(re.findall(r'label ="([^"]+)", shape=rectangle', Path(dot_path).read_text()))
    mx.eval(nxt)
    return nxt, dict(ops.most_common())


def graphs_per_step(step, batch: int, steps: int, warmup: int, dot_prefix: str) -> dict:
    """Ops per step, then CUDA graphs MLX committed per step and kernel nodes per graph, sync
    then pipelined, from the dot files MLX writes as `{dot_prefix}_{n}.dot` per committed graph
    (none on the CPU)."""
    def committed(run) -> tuple[int, int]:
        mx.synchronize()
        clear_graph_dots(dot_prefix)  # what loading, warm-up and the ops count committed
        run()
        mx.synchronize()
        new = graph_dots(dot_prefix)
        # cudaGraphDebugDotPrint (flags 0, seen on the H100): a node opens with
        # `"graph_<g>_node_<n>"[style=... shape=...`; a kernel's shape is "octagon", a captured
        # child graph's (cuBLAS, ...: not expanded) "rectangle".
        text = "".join(f.read_text() for f in new)
        kernels = len(re.findall(r'_node_\d+"\[[^\n]*shape="octagon"', text))
        # The last committed one stays as a sample of what a graph holds (MLX numbers them).
        for f in sorted(new, key=lambda f: int(f.stem.rsplit("_", 1)[1])):
            f.replace(dot_prefix + "-sample.dot")
        return len(new), kernels

    state = {"y": mx.zeros((batch,), dtype=mx.int32)}
    step_runners(step, state, warmup)[0]()  # the warm-up, evaluated step by step
    state["y"], ops = ops_in_step(step, state["y"], dot_prefix + "-ops.dot")
    run_sync, run_pipelined = step_runners(step, state, steps)
    sync_graphs, sync_kernels = committed(run_sync)
    pipe_graphs, pipe_kernels = committed(run_pipelined)
    return {"ops_per_step": sum(ops.values()), "ops": ops,
            "graphs_per_sync_step": sync_graphs / steps,
            "kernels_per_sync_graph": sync_kernels / max(1, sync_graphs),
            "graphs_per_pipelined_step": pipe_graphs / steps,
            "kernels_per_pipelined_graph": pipe_kernels / max(1, pipe_graphs)}


def graph_dots(dot_prefix: str) -> list[Path]:
    """The per-graph dot files MLX has written (`{dot_prefix}_{n}.dot`)."""
    return list(Path(dot_prefix).parent.glob(Path(dot_prefix).name + "_*.dot"))


def clear_graph_dots(dot_prefix: str) -> None:
    for f in graph_dots(dot_prefix):
        f.unlink()


def measure(step, batch: int, args) -> dict:
    """The row's timings, or with --graphs its graph counts."""
    if args.graphs:
        return graphs_per_step(step, batch, args.steps, args.warmup, dot_prefix(args))
    return timed(step, batch, args.steps, args.warmup)


def dot_prefix(args) -> str:
    return str(Path(args.graphs).resolve() / "graph")


def diagnose(step, batch: int, label: str, steps: int = 16) -> None:
    """Where a row's step goes (``--diagnose``): the host's Python in building the graph (the
    functions of most own time over `steps` sync steps, cProfile), then, where torch with CUDA
    is importable (the GPU machine), every kernel of `steps` sync steps, then of `steps`
    pipelined ones, traced with CUPTI (tools/profile_decode.py): GPU busy ms, kernels per step,
    the heaviest kernels."""
    import cProfile
    import pstats

    y = mx.zeros((batch,), dtype=mx.int32)
    prof = cProfile.Profile()
    for _ in range(steps):
        prof.enable()
        y = step(y)
        prof.disable()
        mx.eval(y)
    log(f"== {label}: host functions over {steps} steps' graph building (own time)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    try:
        from profile_decode import summarize, traced
    except ImportError as exc:  # no torch here: the host profile only
        log(f"no CUPTI trace ({exc})")
        return
    run, run_pipelined = step_runners(step, {"y": y}, steps)
    wall, events = traced(run, label)
    summarize(label + " sync", wall, events, steps, top=14)
    wall, events = traced(run_pipelined, label)
    summarize(label + " pipelined", wall, events, steps, top=6)


def profile_builds(step, batch: int, label: str, steps: int = 32) -> None:
    """``--profile-builds``: `steps` pipelined steps, each one's graph building under a
    cProfile of its own; prints the slowest step's and a median step's profiles (cumulative,
    this project's functions): what a block-opening step builds beyond the others."""
    import cProfile
    import pstats

    y, runs = mx.zeros((batch,), dtype=mx.int32), []
    for _ in range(steps):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        nxt = step(y)
        prof.disable()
        runs.append((1e3 * (time.perf_counter() - t0), prof))
        mx.async_eval(nxt)
        mx.eval(y)
        y = nxt
    mx.eval(y)
    order = sorted(range(steps), key=lambda i: runs[i][0])
    log(f"== {label}: build ms per step under cProfile: " + " ".join(
        f"{ms:.1f}" for ms, _ in runs))
    for tag, i in (("slowest", order[-1]), ("median", order[steps // 2])):
        log(f"== {label}: the {tag} step's building (step {i}, {runs[i][0]:.1f} ms), cumulative")
        pstats.Stats(runs[i][1]).sort_stats("cumtime").print_stats("tqstore|mlx_lm", 30)


def fp16_batch(model, batch: int, context: int, seed: int):
    """(mlx-lm's fp16 KVCache per layer holding `batch` random prefixes of `context` tokens,
    the decode step over them)."""
    from mlx_lm.models.cache import KVCache

    caches = [KVCache() for _ in model.layers]
    # The model's own dtype (bf16 here), as its prefill would have written them: a cache of
    # another dtype would make SDPA promote and read twice the bytes.
    dtype = model.layers[0].self_attn.k_proj.weight.dtype
    for cache, (k, v) in zip(caches, random_kv(model, batch, context, seed, dtype)):
        cache.update_and_fetch(k, v)
        mx.eval(cache.state)

    def step(tokens: mx.array) -> mx.array:
        return mx.argmax(model(tokens[:, None], cache=caches)[:, -1, :], axis=-1)
    return caches, step


def tq_batch(model, batch: int, context: int, seed: int, pool_mib: int):
    """(our pool, each sequence's caches, the batched decode step over them) with `batch`
    random prefixes of `context` tokens loaded. The step needs tqstore.paged.install(model)."""
    from tqstore.paged import CachePolicy, make_prompt_cache, pool_for_model
    from tqstore.paged.batch import batch_caches

    pool = pool_for_model(model, policy=CachePolicy.default(None), budget_bytes=pool_mib << 20)
    sequences = [make_prompt_cache(pool) for _ in range(batch)]
    for layer, (k, v) in enumerate(random_kv(model, batch, context, seed, mx.float16)):
        for b, caches in enumerate(sequences):
            caches[layer].load_fp16_prefix(k[b:b + 1], v[b:b + 1])
        mx.eval([c.state for caches in sequences for c in caches])

    def step(tokens: mx.array) -> mx.array:
        for caches in sequences:
            caches[0].sequence.append_token_ids([0])
        joined = batch_caches(sequences)
        return mx.argmax(model(tokens[:, None], cache=joined)[:, -1, :], axis=-1)
    return pool, sequences, step


def fp16_row(model, batch: int, context: int, args) -> dict:
    caches, step = fp16_batch(model, batch, context, args.seed)
    row = measure(step, batch, args)
    row["kv_bytes_per_seq"] = sum(c.nbytes for c in caches) / batch
    if args.diagnose:
        diagnose(step, batch, f"fp16 B={batch} {context}")
    del caches
    return row


def tq_row(model, batch: int, context: int, args, mode: str, step_form: bool = True,
           fold: bool = True) -> dict:
    import tqstore.metal.step_launch as step_launch
    import tqstore.paged.batch as batch_module
    from tqstore.paged import install, uninstall

    install(model)
    pool, sequences, step = tq_batch(model, batch, context, args.seed, args.pool_mib)
    default, batch_module.BATCH_MODE = batch_module.BATCH_MODE, mode
    default_form, step_launch.STEP_FORM = step_launch.STEP_FORM, step_form
    default_fold, step_launch.FOLD_EPILOGUE = step_launch.FOLD_EPILOGUE, fold
    try:
        row = measure(step, batch, args)
        # Before any diagnosis's extra steps, which may take another block per sequence.
        row["kv_bytes_per_seq"] = sum(c.nbytes for caches in sequences for c in caches) / batch
        if args.diagnose:
            diagnose(step, batch, f"{mode} B={batch} {context}")
        if args.profile_builds:
            profile_builds(step, batch, f"{mode} B={batch} {context}")
    finally:
        batch_module.BATCH_MODE = default
        step_launch.STEP_FORM = default_form
        step_launch.FOLD_EPILOGUE = default_fold
        uninstall(model)  # the fp16 rows run stock mlx-lm, never through our dispatch
    for caches in sequences:
        caches[0].sequence.release()
    del sequences, pool
    return row


def medians(rows: list[dict]) -> list[dict]:
    """Per (batch, context, row): the median of its rounds' ratios against fp16."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["batch"], r["context"], r["name"]), []).append(r)
    return [dict(batch=b, context=c, name=n, rounds=len(rs),
                 sync_vs_fp16=statistics.median(r["sync_vs_fp16"] for r in rs),
                 pipelined_vs_fp16=statistics.median(r["pipelined_vs_fp16"] for r in rs))
            for (b, c, n), rs in groups.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=20,
                    help="untimed steps first: 20 cover a block opening (block size 16), "
                         "whose first use in a process may compile kernels (with 3, the first "
                         "timed process of a machine stalled for seconds: docs/BENCHMARKS.md)")
    ap.add_argument("--max-fp16-gib", type=float, default=40.0,
                    help="skip a (B, context) whose fp16 KV is larger than this")
    ap.add_argument("--pool-mib", type=int, default=12000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["rows", "pages", "3launch", "2launch", "batched"],
                    help="tq rows to leave out")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat each (B, context), our rows' order rotated per round; report "
                         "each row's median ratio")
    ap.add_argument("--diagnose", action="store_true",
                    help="also profile each row's graph building and trace its kernels")
    ap.add_argument("--profile-builds", action="store_true",
                    help="also profile 32 of our rows' steps' graph building one by one and "
                         "print the slowest and a median one (a block opening against the rest)")
    ap.add_argument("--graphs", default=None, metavar="DIR",
                    help="time nothing: count each row's ops and CUDA graphs per step (MLX "
                         "writes each committed graph into DIR)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.graphs:
        # Read by MLX at its first committed graph, which comes after this line.
        Path(args.graphs).mkdir(parents=True, exist_ok=True)
        os.environ["MLX_SAVE_CUDA_GRAPHS_DOT_FILE"] = dot_prefix(args)
    from tqstore.metal.dispatch import active_backend

    loaded = build_model(args.shape, args.seed)
    model = loaded.model
    attn = model.layers[0].self_attn
    head_dim = model.args.hidden_size // model.args.num_attention_heads
    fp16_per_token = 2 * 2 * attn.n_kv_heads * head_dim * len(model.layers)
    report = {"device": str(mx.default_device()), "shape": args.shape, "rows": [],
              "graph_limits": {k: os.environ.get(k) for k in (
                  "MLX_MAX_OPS_PER_BUFFER", "MLX_MAX_MB_PER_BUFFER", "MLX_USE_CUDA_GRAPHS")},
              "pool_mib": args.pool_mib}
    if not args.graphs:
        log(f"{'B':>3} {'ctx':>6} {'row':>10} {'sync tok/s':>10} {'vs fp16':>7} "
            f"{'pipe tok/s':>10} {'vs fp16':>7} {'build ms':>8} {'host ms':>7} {'wait ms':>7} "
            f"{'KV MiB/seq':>10} {'fit x':>6} {'step ms':>7} {'max ms':>7} {'peak MiB':>8}")
    tq_rows = [(name, mode) for name, mode in (
        ("tq-rows", "rows"), ("tq-pages", "pages"), ("tq-3launch", "shared"),
        ("tq-2launch", "shared"), ("tq-batched", "shared")) if name[3:] not in args.skip]
    for context in args.contexts:
        for batch in args.batches:
            if batch * context * fp16_per_token > args.max_fp16_gib * 2**30:
                log(f"skip B={batch} context {context}: fp16 KV over {args.max_fp16_gib} GiB")
                continue
            for rnd in range(args.rounds):
                # Round r runs our rows in an order rotated by r (fp16, the baseline, first):
                # rows of one run have moved ~15% against each other, the later ones lower.
                order = tq_rows[rnd % max(1, len(tq_rows)):] + tq_rows[:rnd % max(1, len(tq_rows))]
                rows = {"fp16": fp16_row(model, batch, context, args)}
                gc.collect()
                mx.clear_cache()
                for name, mode in order:
                    rows[name] = tq_row(model, batch, context, args, mode,
                                        step_form=name != "tq-3launch",
                                        fold=not name.endswith("launch"))
                    gc.collect()
                    mx.clear_cache()
                if args.graphs:
                    for name, r in rows.items():
                        r.update(name=name, batch=batch, context=context, round=rnd)
                        report["rows"].append(r)
                        log(f"{batch:>3} {context:>6} {name:>10} {r['ops_per_step']} ops/step "
                            f"(most: {list(r['ops'].items())[:8]})")
                        log(f"{batch:>3} {context:>6} {name:>10} graphs/step sync "
                            f"{r['graphs_per_sync_step']:.2f} ({r['kernels_per_sync_graph']:.1f}"
                            f" kernels each) pipelined {r['graphs_per_pipelined_step']:.2f} "
                            f"({r['kernels_per_pipelined_graph']:.1f} kernels each)")
                    continue
                base = rows["fp16"]
                for name, r in rows.items():
                    r.update(name=name, batch=batch, context=context, round=rnd,
                             sync_vs_fp16=r["sync_tok_s"] / base["sync_tok_s"],
                             pipelined_vs_fp16=r["pipelined_tok_s"] / base["pipelined_tok_s"],
                             sequences_fit_x=base["kv_bytes_per_seq"] / r["kv_bytes_per_seq"])
                    report["rows"].append(r)
                    log(f"{batch:>3} {context:>6} {name:>10} {r['sync_tok_s']:>10.1f} "
                        f"{r['sync_vs_fp16']:>7.2f} {r['pipelined_tok_s']:>10.1f} "
                        f"{r['pipelined_vs_fp16']:>7.2f} {r['build_ms']:>8.2f} "
                        f"{r['host_ms']:>7.2f} {r['wait_ms']:>7.2f} "
                        f"{r['kv_bytes_per_seq'] / 2**20:>10.1f} {r['sequences_fit_x']:>6.2f} "
                        f"{r['pipelined_step_ms_median']:>7.2f} {r['pipelined_step_ms_max']:>7.2f} "
                        f"{max(r['pipelined_step_peak_mib']):>8.0f}")
                    ms, peak = r["pipelined_step_ms"], r["pipelined_step_peak_mib"]
                    build, enc = r["pipelined_step_build_ms"], r["pipelined_step_encode_ms"]
                    slowest = sorted(range(len(ms)), key=ms.__getitem__)[-4:]
                    log(f"    {name}: slowest pipelined steps (index: ms = build + encode + "
                        f"wait, peak MiB) " + ", ".join(
                            f"{i}: {ms[i]:.1f} = {build[i]:.1f} + {enc[i]:.1f} + "
                            f"{ms[i] - build[i] - enc[i]:.1f}, {peak[i]:.0f}"
                            for i in sorted(slowest)))
                    log(f"    {name}: median build {statistics.median(build):.2f} ms, "
                        f"encode {statistics.median(enc):.2f} ms")
    if args.rounds > 1 and not args.graphs:
        report["medians"] = medians(report["rows"])
        log("medians over the rounds (each round's ratio against its own fp16):")
        for m in report["medians"]:
            log(f"{m['batch']:>3} {m['context']:>6} {m['name']:>10} sync {m['sync_vs_fp16']:.2f}"
                f" pipelined {m['pipelined_vs_fp16']:.2f} ({m['rounds']} rounds)")
    report["backend"] = active_backend()
    if args.graphs:
        mx.synchronize()
        clear_graph_dots(dot_prefix(args))  # DIR keeps the samples, not thousands of graphs
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
