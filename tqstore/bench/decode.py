"""`tqstore bench decode`: decode tokens/s of the paged TurboQuant cache against stock mlx-lm's
KVCache on the same model and machine, in the same run, at several context lengths.

Method, per context length N (the bundled texts, tokenized):
- One stock prefill of the first N - 1 tokens (mlx-lm's KVCache, 512-token chunks). Its K/V
  seed both caches, so the two runs decode after the very same prefix: stock keeps its own
  cache; ours gets the K/V as fp16 through `load_fp16_prefix` (how a daemon hit restores) and
  is told the prompt length, exactly as `CachedGenerator` runs a prompt.
- Each cache then runs token N (the last prompt token: the first token comes out) and
  --steps greedy decode steps, one synchronous step at a time (model call, argmax, eval):
  the same loop for both, so per-step times are comparable.
- steady tokens/s: the median step after the first 3 decode steps. pause: the first decode
  step's time minus a steady step, in steady steps (ours quantizes the prefill there, once).
- --rounds alternations of both; every ratio is the median of the rounds' own ratios (this
  machine's speed drifts by 10-20% over minutes: only same-round pairs compare).
- pipelined tokens/s: the same caches again through mlx-lm's `generate_step` (what
  `tqstore generate` and mlx_lm run), tokens 4.. over their time.
Ratios are ours / stock, measured in the same process, alternating.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import mlx.core as mx

from tqstore.errors import InvalidArgument

PREFILL_CHUNK = 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8000],
                        help="prompt lengths in tokens (SmolLM2's context is 8192)")
    parser.add_argument("--steps", type=int, default=40, help="decode steps per run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of both caches (default 3)")
    parser.add_argument("--backend", choices=["auto", "reference"], default="auto",
                        help="auto: the kernels dispatch picks; reference: the pure-MLX path")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _prompt(tokenizer, n: int) -> list[int]:
    from tqstore.bench.hit import _corpus_ids
    return _corpus_ids(tokenizer, n)


def _stock_prefix(model, ids: list[int]):
    from mlx_lm.models.cache import make_prompt_cache as stock_cache
    cache = stock_cache(model)
    for start in range(0, len(ids), PREFILL_CHUNK):
        model(mx.array([ids[start:start + PREFILL_CHUNK]]), cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def _kv(cache) -> tuple[mx.array, mx.array]:
    """A stock layer cache's K/V up to its offset (its buffers run past it)."""
    keys, values, offset = cache.state
    return keys[..., :offset, :], values[..., :offset, :]


def _copy_stock(model, prefix):
    """A stock cache holding a copy of prefix's K/V (each run appends to its own)."""
    from mlx_lm.models.cache import make_prompt_cache as stock_cache
    cache = stock_cache(model)
    for c, p in zip(cache, prefix):
        c.update_and_fetch(*_kv(p))
    mx.eval([c.state for c in cache])
    return cache


def _ours(pool, prefix, prompt_length: int):
    from tqstore.paged import make_prompt_cache
    caches = make_prompt_cache(pool)
    for c, p in zip(caches, prefix):
        c.load_fp16_prefix(*_kv(p))
    caches[0].sequence.prompt_length = prompt_length
    mx.eval([c.state for c in caches])
    return caches


def _sync_steps(model, cache, last: int, steps: int) -> list[float]:
    """Seconds per step: the last prompt token's step, then `steps` greedy decode steps."""
    times, token = [], last
    for step in range(steps + 1):
        t0 = time.perf_counter()
        logits = model(mx.array([[token]]), cache=cache)
        if step == 0:  # the prompt's last chunk: evaluated with the caches' state, as the
            mx.eval(logits, [c.state for c in cache])  # generator's prefill does
        token = int(mx.argmax(logits[0, -1]).item())
        times.append(time.perf_counter() - t0)
    return times


def _pipelined(model, cache, last: int, steps: int) -> float:
    from mlx_lm.generate import generate_step
    stamps = []
    for _ in generate_step(mx.array([last]), model, max_tokens=steps, prompt_cache=cache):
        stamps.append(time.perf_counter())
    return (len(stamps) - 4) / (stamps[-1] - stamps[3])


def _one(model, pool, prefix, ids: list[int], name: str, steps: int, pipelined: bool):
    from tqstore.paged import release_prompt_cache
    cache = _copy_stock(model, prefix) if name == "stock" else _ours(pool, prefix, len(ids))
    try:
        if pipelined:
            return _pipelined(model, cache, ids[-1], steps)
        return _sync_steps(model, cache, ids[-1], steps)
    finally:
        if name == "tqstore":
            release_prompt_cache(cache)


def measure(loaded, context: int, steps: int, rounds: int) -> dict:
    """Both caches `rounds` times, alternating (a slow spell of a shared machine hits both);
    ratios are medians of the per-round ratios."""
    from tqstore.paged import CachePolicy, install, pool_for_model
    model = loaded.model
    ids = _prompt(loaded.tokenizer, context)
    prefix = _stock_prefix(model, ids[:-1])
    policy = CachePolicy.default(loaded.fingerprint)
    pool = pool_for_model(model, policy=policy, budget_bytes=256 << 20,
                          model_fingerprint=loaded.fingerprint)
    install(model)
    runs: dict = {name: dict(steady_s=[], first_decode_s=[], pipelined_tps=[])
                  for name in ("stock", "tqstore")}
    for _ in range(rounds):
        for name in ("stock", "tqstore"):
            times = _one(model, pool, prefix, ids, name, steps, pipelined=False)
            runs[name]["steady_s"].append(statistics.median(times[4:]))
            runs[name]["first_decode_s"].append(times[1])
        for name in ("stock", "tqstore"):
            runs[name]["pipelined_tps"].append(_one(model, pool, prefix, ids, name, steps, True))
    row: dict = dict(context=context, policy=policy.label(), rounds=rounds, **runs)
    for e in runs.values():
        e["steady_tps"] = 1.0 / statistics.median(e["steady_s"])
        e["pause_steps"] = statistics.median(
            (f - s) / s for f, s in zip(e["first_decode_s"], e["steady_s"]))
    ours, stock = runs["tqstore"], runs["stock"]
    row["steady_ratio"] = statistics.median(
        s / o for o, s in zip(ours["steady_s"], stock["steady_s"]))
    row["pipelined_ratio"] = statistics.median(
        o / s for o, s in zip(ours["pipelined_tps"], stock["pipelined_tps"]))
    return row


def run(args: argparse.Namespace) -> int:
    from tqstore.metal import dispatch
    from tqstore.models.smollm2 import load_smollm2
    if any(c < 16 or c > 8192 for c in args.contexts):
        raise InvalidArgument("contexts must be within 16..8192 (SmolLM2's context)")
    if args.steps < 8:
        raise InvalidArgument("--steps must be >= 8")
    dispatch.force_backend("reference" if args.backend == "reference" else None)
    loaded = load_smollm2()
    rows = [measure(loaded, c, args.steps, args.rounds) for c in args.contexts]
    result = dict(machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
                  device=str(mx.default_device()), attention_path=dispatch.active_backend(),
                  kernels=dispatch.kernel_report(), rows=rows)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"decode, SmolLM2 ({rows[0]['policy']}), {result['device']}, attention: "
          f"{result['attention_path']}")
    print(f"{'context':>8} {'stock tok/s':>12} {'ours tok/s':>11} {'ratio':>6} "
          f"{'pause (steps)':>14} {'pipelined ratio':>16}")
    for r in rows:
        print(f"{r['context']:>8} {r['stock']['steady_tps']:>12.2f} "
              f"{r['tqstore']['steady_tps']:>11.2f} {r['steady_ratio']:>6.2f} "
              f"{r['tqstore']['pause_steps']:>14.2f} {r['pipelined_ratio']:>16.2f}")
    return 0
