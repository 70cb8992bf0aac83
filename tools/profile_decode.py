#!/usr/bin/env python3
"""Where a decode step's time goes on an NVIDIA GPU: every CUDA kernel MLX launches, traced with
CUPTI through PyTorch's profiler (in the same process, so it sees MLX's kernels), summed by name.

For each row (mlx-lm's fp16 KVCache, tqstore's paged cache on the kernels with the fp16 tail)
of a random-weight Llama-3-8B-shaped model at a long context: wall ms per step, kernels per
step, GPU busy ms per step (the union of kernel intervals) and the heaviest kernel names. Then
the attention kernel alone at B=1 (fp16 SDPA vs ours): kernel-only time, so launch overhead
and kernel speed can be told apart.

Device only (needs torch with CUDA next to MLX's CUDA backend):
    PYTHONUNBUFFERED=1 python3 tools/profile_decode.py --context 32768 --json $OUT/profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from attention_e2e import LLAMA3_8B, prefill  # noqa: E402


def traced(fn, label: str) -> tuple[float, list[dict]]:
    """Run fn() under CUPTI; returns (wall seconds, kernel events {name, ts, dur} in us)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    kernels = [e for e in trace.get("traceEvents", [])
               if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e]
    print(f"[{label}] {len(kernels)} GPU events traced", flush=True)
    return wall, kernels


def busy_us(events: list[dict]) -> float:
    """Union of the events' intervals."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    total, end = 0.0, -1e30
    for a, b in spans:
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(label: str, wall: float, events: list[dict], per: int, top: int = 24) -> dict:
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in events:
        by_name[e["name"][:90]].append(e["dur"])
    rows = sorted(((sum(v), len(v), k) for k, v in by_name.items()), reverse=True)
    busy = busy_us(events)
    span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) if events else 0
    out = dict(label=label, wall_ms_per=1000 * wall / per, kernels_per=len(events) / per,
               busy_ms_per=busy / per / 1000, gpu_span_ms_per=span / per / 1000,
               sum_kernel_ms_per=sum(e["dur"] for e in events) / per / 1000,
               kernels=[dict(name=k, us_per=t / per, count_per=n / per, mean_us=t / n)
                        for t, n, k in rows])
    print(f"\n== {label}: wall {out['wall_ms_per']:.2f} ms, GPU span {out['gpu_span_ms_per']:.2f} ms, "
          f"busy {out['busy_ms_per']:.2f} ms, {out['kernels_per']:.0f} kernels (per unit)")
    for r in out["kernels"][:top]:
        print(f"  {r['us_per']:9.1f} us {r['count_per']:6.1f}x {r['mean_us']:8.2f} us  {r['name']}")
    return out


def decode_row(model, y, cache, steps: int, label: str) -> dict:
    for _ in range(3):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(y)
    state = {"y": y}

    def run():
        for _ in range(steps):
            state["y"] = mx.argmax(model(state["y"][:, None], cache=cache)[:, -1, :], axis=-1)
            mx.eval(state["y"])

    wall, ev = traced(run, label)
    return summarize(label, wall, ev, steps)


def attention_rows(ctx: int, layers: int, reps: int) -> list[dict]:
    """fp16 SDPA vs our default kernel at B=1: `layers` calls queued per eval, `reps` evals."""
    from tqstore.metal.attention_kernel import kernel_paged_decode_attention
    from tqstore.bench.attention import random_pages

    rng = np.random.default_rng(7)
    dense = [(mx.random.normal((1, 32, 1, 128)).astype(mx.float16),
              mx.random.normal((1, 8, ctx, 128)).astype(mx.float16),
              mx.random.normal((1, 8, ctx, 128)).astype(mx.float16)) for _ in range(layers)]
    paged = [random_pages(rng, [ctx], 32, 8, 128, 128, 4, 4, 16, 0) for _ in range(layers)]
    mx.eval(dense, [[v for v in p.values() if isinstance(v, mx.array)] for p in paged])
    out = []
    for label, fn, xs in (
            ("sdpa-fp16", lambda x: mx.fast.scaled_dot_product_attention(x[0], x[1], x[2],
                                                                           scale=128 ** -0.5), dense),
            ("tq-kernel", lambda p: kernel_paged_decode_attention(**p), paged),
            ("tq-kernel-lse", lambda p: kernel_paged_decode_attention(**p, return_lse=True), paged)):
        for _ in range(2):
            mx.eval([fn(x) for x in xs])

        def run():
            for _ in range(reps):
                mx.eval([fn(x) for x in xs])

        wall, ev = traced(run, label)
        out.append(summarize(f"{label} ctx {ctx} (per call)", wall, ev, reps * layers, top=5))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--attention-contexts", default="131072,32768")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.zeros(1, device="cuda")  # CUDA context + CUPTI up before MLX work is traced
    result: dict = dict(attention=[], decode=[])
    for ctx in (int(c) for c in args.attention_contexts.split(",") if c):
        result["attention"] += attention_rows(ctx, 16, 10)

    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache as mlx_prompt_cache
    from tqstore.paged.cache import make_prompt_cache, pool_for_model
    from tqstore.paged.integration import install, uninstall
    from tqstore.paged.policy import CachePolicy

    shape = dict(LLAMA3_8B, num_hidden_layers=args.layers)
    model = llama.Model(llama.ModelArgs.from_dict(shape))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, shape["vocab_size"], (args.context,))
    cache = mlx_prompt_cache(model)
    y = prefill(model, tokens, cache, 2048)
    result["decode"].append(decode_row(model, y, cache, args.steps, "fp16 KVCache step"))
    del cache
    per_token = shape["num_hidden_layers"] * shape["num_key_value_heads"] * (2 * 128 // 2 + 4)
    pool = pool_for_model(model, budget_bytes=int((args.context + 4096) * per_token * 1.5) + (64 << 20),
                          policy=CachePolicy(fp16_tail=True))
    caches = make_prompt_cache(pool)
    install(model)
    try:
        y = prefill(model, tokens, caches, 2048)
        result["decode"].append(decode_row(model, y, caches, args.steps, "tq kernels + tail step"))
    finally:
        uninstall(model)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
