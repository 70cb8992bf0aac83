#!/usr/bin/env python3
"""End-to-end decode tokens/s of a random-weight model shaped like Llama-3-8B at a long context:
mlx-lm's fp16 KVCache against tqstore's paged TurboQuant cache (K4/V4), in the same run.

Rows:
  fp16          mlx-lm KVCache + mx.fast.scaled_dot_product_attention
  tq-reference  the paged cache forced onto the pure-MLX reference (dispatch.force_backend)
  tq-kernels    the same cache on tqstore.metal's kernels (decode attention and the per-token
                quantize), which its dispatch point picks on a GPU backend
  tq-kernels-tail  the same with the newest block in fp16 (CachePolicy.fp16_tail): the kernel
                over the pages plus the merge with the fp16 tail (the default policy's shape)
  tq-tail-batch-of-one  (--ab-alone) the same cache stepping as a batch of one
                (tqstore.paged.cache.SHARED_STEP_ALONE on, tqstore.paged.shared_tail): one
                launch per layer where the tensor-core kernel's step form with the epilogue
                folded in fits (tqstore.metal.step_launch)
  tq-tail-batch-of-one-2launch  (--ab-alone) the same with the epilogue not folded in: the
                step kernel and the per-row epilogue
  tq-tail-batch-of-one-3launch  (--ab-alone) the same with the step form off: the rotation,
                attention and epilogue launches

    PYTHONUNBUFFERED=1 python tools/attention_e2e.py --context 32768 --json $OUT/e2e.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache as mlx_prompt_cache  # noqa: E402

LLAMA3_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                 intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 rms_norm_eps=1e-5, vocab_size=128256, rope_theta=500000.0,
                 tie_word_embeddings=False)


def prefill(model, tokens: mx.array, cache, chunk: int) -> mx.array:
    logits = None
    for i in range(0, tokens.shape[0], chunk):
        logits = model(tokens[None, i:i + chunk], cache=cache)
        mx.eval(logits)
    return mx.argmax(logits[:, -1, :], axis=-1)


def synthetic_prefix(model, cache, context: int, seed: int = 0) -> mx.array:
    """Fill every layer's cache with `context` tokens of random fp16 K/V instead of running the
    prefill (decode speed does not depend on what the keys are; a 128k prefill would cost
    minutes of device time). mlx-lm caches take them through update_and_fetch, ours through
    load_fp16_prefix (quantized at the first decode step, outside the timed steps)."""
    from tqstore.paged.cache import PagedLayerCache

    mx.random.seed(seed)
    attn = model.layers[0].self_attn
    shape = (1, attn.n_kv_heads, context, model.args.hidden_size // model.args.num_attention_heads)
    for c in cache:
        k = mx.random.normal(shape).astype(mx.float16)
        v = mx.random.normal(shape).astype(mx.float16)
        if isinstance(c, PagedLayerCache):
            c.load_fp16_prefix(k, v)
        else:
            c.update_and_fetch(k, v)
        mx.eval(k, v)
    return mx.array([1])


BUILD_MS: dict[str, float] = {}  # per row: ms per step spent building the graph (host side)


def decode(model, y: mx.array, cache, steps: int, warmup: int, name: str = "") -> float:
    """Tokens/s of greedy decode, after `warmup` steps (the first one quantizes the prefill).
    Also records in BUILD_MS the host time per step spent building the lazy graph (the model
    call, before mx.eval): what per-op overhead in Python costs, as opposed to GPU execution."""
    for _ in range(warmup):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(y)
    build = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        tb = time.perf_counter()
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        build += time.perf_counter() - tb
        mx.eval(y)
    elapsed = time.perf_counter() - t0
    BUILD_MS[name] = 1000 * build / steps
    return steps / elapsed


def decode_pipelined(model, y: mx.array, cache, steps: int) -> float:
    """Tokens/s of greedy decode the way mlx-lm's generate_step runs it: the graph of step t+1
    is built while step t runs on the GPU (mx.async_eval), and the host waits on the token of
    step t only after that. Host graph building then overlaps GPU execution."""

    def step(tok: mx.array) -> mx.array:
        return mx.argmax(model(tok[:, None], cache=cache)[:, -1, :], axis=-1)

    y = step(y)
    mx.async_eval(y)
    mx.eval(y)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = step(y)
        mx.async_eval(nxt)
        mx.eval(y)  # the token generate_step hands out (y.item()) while nxt runs
        y = nxt
    mx.eval(y)
    return steps / (time.perf_counter() - t0)


def tail_check(steps: int = 40, prompt_len: int = 300) -> float:
    """Correctness of the decode path with the fp16 tail on this backend: a small random model
    (head_dim 128, GQA 4, 4 layers), the same teacher-forced tokens decoded one at a time on the
    kernels (pages' softmax + log-sum-exp merged with the fp16 tail) and on the pure-MLX
    reference; returns the max over steps of max|logit diff| / max|reference logit|."""
    from tqstore.metal import dispatch
    from tqstore.paged.cache import make_prompt_cache, pool_for_model
    from tqstore.paged.integration import install, uninstall
    from tqstore.paged.policy import CachePolicy

    shape = dict(LLAMA3_8B, num_hidden_layers=4, hidden_size=1024, intermediate_size=2048,
                 num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    model = llama.Model(llama.ModelArgs.from_dict(shape))
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, shape["vocab_size"], (prompt_len + steps,))
    runs = []
    for mode in ("kernel", "reference"):
        dispatch.force_backend(mode)
        install(model)
        try:
            caches = make_prompt_cache(pool_for_model(model, budget_bytes=64 << 20,
                                                      policy=CachePolicy(fp16_tail=True)))
            mx.eval(model(tokens[None, :prompt_len], cache=caches))
            out = []
            for i in range(prompt_len, prompt_len + steps):
                out.append(model(tokens[None, i:i + 1], cache=caches)[0, -1].astype(mx.float32))
                mx.eval(out[-1])
            runs.append(out)
        finally:
            uninstall(model)
            dispatch.force_backend(None)
    return max((mx.max(mx.abs(a - b)) / mx.max(mx.abs(b))).item() for a, b in zip(*runs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--small", action="store_true", help="a tiny model (CPU smoke test)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--synthetic", action="store_true",
                    help="random K/V for the context instead of a prefill (long contexts)")
    ap.add_argument("--no-tail-check", action="store_true")
    ap.add_argument("--ab-alone", action="store_true",
                    help="also time the fp16-tail cache stepping as a batch of one")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    err = None
    if not args.small and not args.no_tail_check:
        err = tail_check()
        print(f"tail check (K4V4 + fp16 tail, 40 decode steps, kernels vs reference): "
              f"max rel logit diff {err:.2e}", flush=True)

    from tqstore.paged.cache import make_prompt_cache, pool_for_model
    from tqstore.metal import dispatch
    from tqstore.paged.integration import install, uninstall
    from tqstore.paged.policy import CachePolicy

    shape = dict(LLAMA3_8B, num_hidden_layers=args.layers)
    if args.small:
        shape.update(hidden_size=256, intermediate_size=512, num_attention_heads=8,
                     num_key_value_heads=2, vocab_size=1000)
    model = llama.Model(llama.ModelArgs.from_dict(shape))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, shape["vocab_size"], (args.context,))
    rows: dict[str, float] = {}
    piped: dict[str, float] = {}  # the same rows decoded like mlx-lm's generate_step

    cache = mlx_prompt_cache(model)
    fill = ((lambda c: synthetic_prefix(model, c, args.context)) if args.synthetic
            else (lambda c: prefill(model, tokens, c, args.chunk)))
    y = fill(cache)
    rows["fp16"] = decode(model, y, cache, args.steps, args.warmup, "fp16")
    piped["fp16"] = decode_pipelined(model, y, cache, args.steps)
    del cache
    print(f"fp16 KVCache: {rows['fp16']:.2f} tok/s", flush=True)

    per_token = shape["num_hidden_layers"] * shape["num_key_value_heads"] * (2 * 128 // 2 + 4)
    budget = int((args.context + 4096) * per_token * 1.5) + (64 << 20)
    from tqstore.paged import cache as cache_module
    variants = (([] if args.skip_reference else ["tq-reference"]) + ["tq-kernels", "tq-kernels-tail"]
                + (["tq-tail-batch-of-one", "tq-tail-batch-of-one-2launch",
                    "tq-tail-batch-of-one-3launch"] if args.ab_alone else []))
    default_alone = cache_module.SHARED_STEP_ALONE
    from tqstore.metal import step_launch
    default_form, default_fold = step_launch.STEP_FORM, step_launch.FOLD_EPILOGUE
    for name in variants:
        policy = CachePolicy(fp16_tail=name.endswith(("-tail", "-of-one", "launch")))
        cache_module.SHARED_STEP_ALONE = "batch-of-one" in name or default_alone
        step_launch.STEP_FORM = default_form and not name.endswith("-3launch")
        step_launch.FOLD_EPILOGUE = default_fold and not name.endswith("launch")
        pool = pool_for_model(model, budget_bytes=budget, policy=policy)
        caches = make_prompt_cache(pool)
        # The paged cache reaches the kernels through tqstore.metal.dispatch; the reference row
        # forces the pure-MLX path there.
        dispatch.force_backend("reference" if name == "tq-reference" else None)
        install(model)
        try:
            y = fill(caches)
            steps = max(4, args.steps // 4) if name == "tq-reference" else args.steps
            rows[name] = decode(model, y, caches, steps, args.warmup, name)
            piped[name] = decode_pipelined(model, y, caches, steps)
        finally:
            uninstall(model)
            dispatch.force_backend(None)
            cache_module.SHARED_STEP_ALONE = default_alone
            step_launch.STEP_FORM, step_launch.FOLD_EPILOGUE = default_form, default_fold
        print(f"{name}: {rows[name]:.2f} tok/s", flush=True)
        del caches, pool

    print(f"\ndecode tokens/s, random-weight Llama-3-8B shape ({shape['num_hidden_layers']} layers),"
          f" context {args.context}{' (random K/V, no prefill)' if args.synthetic else ''}, batch 1")
    for name, tps in rows.items():
        print(f"  {name:15s} {tps:8.2f} tok/s  ({tps / rows['fp16']:.2f}x fp16)  step "
              f"{1000 / tps:6.2f} ms, of which graph building {BUILD_MS[name]:6.2f} ms")
    print("pipelined like mlx-lm's generate_step (next step's graph built while this one runs):")
    for name, tps in piped.items():
        print(f"  {name:15s} {tps:8.2f} tok/s  ({tps / piped['fp16']:.2f}x fp16)  step "
              f"{1000 / tps:6.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(context=args.context, synthetic=args.synthetic,
                                                   shape=shape,
                                                   tokens_per_s=rows,
                                                   tokens_per_s_pipelined=piped,
                                                   tail_check_max_rel_logit_diff=err,
                                                   graph_build_ms=BUILD_MS), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
