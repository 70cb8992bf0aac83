#!/usr/bin/env python3
"""A batched decode step of SmolLM2 over B sequences of the same context length: the serving
engine's paged TurboQuant step (tqstore.paged.batch) with its rows attended in one C call
(the default on the CPU) and row by row, against stock mlx-lm's KVCache holding the same batch
(fp32 here, as mlx_lm.server holds the exported fp32 model). Rounds alternate the three; each
figure is the median step after two warm-up steps. The step only: no prefill interleaving,
sampling or HTTP (`tqstore bench serve` measures those).

    python3 tools/batch_step_bench.py --batch 8 --context 2200 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tqstore  # noqa: E402,F401  (BLAS preload before mlx)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402


def _paged_batch(loaded, batch: int, context: int, rng):
    """B paged sequences prefilled with random tokens as the engine does (store-block chunks)."""
    from tqstore.generator import DEFAULT_STORE_BLOCK, prefill_bounds
    from tqstore.paged import CachePolicy, install, make_prompt_cache, pool_for_model

    install(loaded.model)
    pool = pool_for_model(loaded.model, policy=CachePolicy.default(loaded.fingerprint),
                          budget_bytes=1 << 30, model_fingerprint=loaded.fingerprint)
    sequences = []
    for _ in range(batch):
        ids = rng.integers(100, 40000, context).tolist()
        caches = make_prompt_cache(pool)
        caches[0].sequence.prompt_length = context
        bounds = prefill_bounds(0, context, DEFAULT_STORE_BLOCK)
        for a, b in zip(bounds, bounds[1:]):
            loaded.model(mx.array([ids[a:b]]), cache=caches)
            mx.eval([c.state for c in caches])
        sequences.append(caches)
    return sequences


def _median_step(step, steps: int) -> float:
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=2200)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per figure")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import tqstore.paged.batch as batch_module
    from mlx_lm.models.cache import KVCache
    from tqstore.models.smollm2 import load_smollm2
    from tqstore.paged.batch import batch_caches

    rng = np.random.default_rng(args.seed)
    loaded = load_smollm2()
    sequences = _paged_batch(loaded, args.batch, args.context, rng)
    stock_model = load_smollm2().model  # not installed: stock attention
    stock = [KVCache() for _ in stock_model.layers]
    ids = mx.array(rng.integers(100, 40000, (args.batch, args.context)).tolist())
    for a in range(0, args.context, 512):
        stock_model(ids[:, a:a + 512], cache=stock)
        mx.eval([c.state for c in stock])
    token = mx.array([[5]] * args.batch)

    def ours() -> None:
        for caches in sequences:
            caches[0].sequence.append_token_ids([5])
        joined = batch_caches(sequences)
        mx.eval(loaded.model(token, cache=joined), [c.state for c in joined])

    def row_by_row() -> None:
        fused = batch_module.fused_batch_step
        batch_module.fused_batch_step = lambda *a, **k: None
        try:
            ours()
        finally:
            batch_module.fused_batch_step = fused

    def stock_step() -> None:
        mx.eval(stock_model(token, cache=stock), [c.state for c in stock])

    rows = []
    for r in range(args.rounds):
        row = {"round": r, "one_call_ms": 1e3 * _median_step(ours, args.steps),
               "row_by_row_ms": 1e3 * _median_step(row_by_row, args.steps),
               "stock_fp32_ms": 1e3 * _median_step(stock_step, args.steps)}
        row["tok_s_ours"] = args.batch / row["one_call_ms"] * 1e3
        row["tok_s_stock"] = args.batch / row["stock_fp32_ms"] * 1e3
        row["ratio"] = row["stock_fp32_ms"] / row["one_call_ms"]
        rows.append(row)
        print(f"round {r}: B={args.batch} context {args.context}+: one call "
              f"{row['one_call_ms']:.1f} ms, row by row {row['row_by_row_ms']:.1f} ms, stock "
              f"fp32 KVCache {row['stock_fp32_ms']:.1f} ms: {row['ratio']:.2f}x stock tokens/s",
              flush=True)
    print(json.dumps({"batch": args.batch, "context": args.context,
                      "median_ratio": statistics.median(r["ratio"] for r in rows),
                      "rounds": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
