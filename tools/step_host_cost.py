#!/usr/bin/env python3
"""The host's graph-building time of one batched decode step, on any machine (no GPU needed):
tqstore's GPU step path with its custom kernels stubbed, against mlx-lm's fp16 KVCache, on a
small model of Llama-3-8B's layer count and head layout.

Why: on an H100 a decode step of that shape is bound by the host (docs/BENCHMARKS.md, "Shared
tails and three launches per layer"): the Python and MLX calls that build a step's graph, per
layer and per row, set the pace at B=1 and B=8. That cost does not depend on the GPU or on the
arrays' sizes, so it can be measured and cut here, then confirmed on the GPU with
tools/batch_decode_gpu.py and tools/attention_e2e.py.

What is stubbed: the GPU backend is reported as CUDA, the kernels' first-use self-checks pass,
and each custom kernel call returns zero arrays of its output shapes (one cheap op each, no
source string built as MLX's real call does). Everything else is the production code: the
dispatch layer, the shared tails, the tables, the commits. The step's *values* are meaningless
here; only its host time is measured. Never used by tests or by the product.

    python3 tools/step_host_cost.py --batches 1 8 --steps 64 [--profile]
    python3 tools/step_host_cost.py --real ...   # on a GPU machine: the real kernels
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tqstore  # noqa: E402,F401  (OpenBLAS before MLX, as in every entry point)
import mlx.core as mx  # noqa: E402


def stub_gpu_kernels() -> None:
    """Make the dispatch layer take its GPU paths with kernels that only allocate outputs."""
    import tqstore.metal.attention_kernel as attention_kernel
    import tqstore.metal.dispatch as dispatch
    import tqstore.metal.quantize as quantize
    import tqstore.metal.selfcheck as selfcheck
    import tqstore.metal.step_launch as step_launch

    def builder(**_spec):
        def call(inputs, output_shapes, output_dtypes, grid, threadgroup, init_value=None,
                 **_kw):
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return call

    for module in (attention_kernel, dispatch, quantize, step_launch):
        module.gpu_backend = lambda: "cuda"
    attention_kernel.mma_capable = dispatch.mma_capable = lambda: True
    mx.fast.cuda_kernel = builder
    selfcheck.usable = lambda name, key, check: True


def small_llama(layers: int):
    """Llama-3-8B's layer count, 32 query / 8 kv heads of 128 dims; tiny projections."""
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=256, num_hidden_layers=layers, intermediate_size=256,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        vocab_size=512, rope_theta=500000.0, tie_word_embeddings=False))
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    return model


def build_ms(step, batch: int, steps: int, profile: bool, sort: str = "tottime",
             limit=18, warmup: int = 20, sections: dict[str, float] | None = None
             ) -> tuple[float, float, list[float]]:
    """Mean host ms to build one step's graph and to encode it (mx.async_eval: each kernel's
    launch into MLX's command encoder), each step then evaluated before the next; and each
    step's build ms (a block-opening step, one in 16, builds more than the others)."""
    y = mx.zeros((batch,), dtype=mx.int32)
    for _ in range(warmup):  # past a block boundary: first-use self-checks and JIT builds
        y = step(y)
        mx.eval(y)
    if sections is not None:  # time_attention_sections' totals: the timed steps only
        sections.clear()
    prof = cProfile.Profile() if profile else None
    total = encode = 0.0
    per_step = []
    for _ in range(steps):
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        y = step(y)
        if prof:
            prof.disable()
        t1 = time.perf_counter()
        mx.async_eval(y)
        total, encode = total + t1 - t0, encode + time.perf_counter() - t1
        per_step.append(1e3 * (t1 - t0))
        mx.eval(y)
    if prof:
        pstats.Stats(prof).sort_stats(sort).print_stats(limit)
    return 1e3 * total / steps, 1e3 * encode / steps, per_step


SECTIONS = ("projections", "head reshapes", "rope", "update_and_fetch", "attention",
            "release q/k/v", "output")


def time_attention_sections(totals: dict[str, float]) -> None:
    """Replace mlx-lm's llama Attention.__call__ with the same code timed section by section
    (host seconds added to ``totals``): where a step's building goes, ours against fp16's.
    "release q/k/v" drops the layer's last references to them: with stubbed kernels nothing
    holds them, so their graphs are freed there; with real kernels the attention's output
    holds them and that section is near zero (the frees come after evaluation, in MLX)."""
    from mlx_lm.models import llama

    clock = time.perf_counter

    def call(self, x, mask=None, cache=None):
        marks = [clock()]
        B, L, _ = x.shape
        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        marks.append(clock())
        queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        marks.append(clock())
        queries = self.rope(queries, offset=cache.offset)
        keys = self.rope(keys, offset=cache.offset)
        marks.append(clock())
        keys, values = cache.update_and_fetch(keys, values)
        marks.append(clock())
        output = llama.scaled_dot_product_attention(queries, keys, values, cache=cache,
                                                    scale=self.scale, mask=mask)
        marks.append(clock())
        del queries, keys, values
        marks.append(clock())
        output = self.o_proj(output.transpose(0, 2, 1, 3).reshape(B, L, -1))
        marks.append(clock())
        for name, start, end in zip(SECTIONS, marks, marks[1:]):
            totals[name] = totals.get(name, 0.0) + end - start
        return output

    llama.Attention.__call__ = call


def fp16_step(model, batch: int, context: int):
    from mlx_lm.models.cache import KVCache

    caches = [KVCache() for _ in model.layers]
    shape = (batch, 8, context, 128)
    for cache in caches:
        cache.update_and_fetch(mx.zeros(shape, mx.bfloat16), mx.zeros(shape, mx.bfloat16))

    def step(tokens):
        return mx.argmax(model(tokens[:, None], cache=caches)[:, -1, :], axis=-1)
    return step


def tq_step(model, batch: int, context: int, alone: bool):
    from tqstore.paged import CachePolicy, install, make_prompt_cache, pool_for_model
    from tqstore.paged.batch import batch_caches

    install(model)
    pool = pool_for_model(model, policy=CachePolicy.default(None), budget_bytes=2 << 30)
    sequences = [make_prompt_cache(pool) for _ in range(batch)]
    prefix = mx.zeros((1, 8, context, 128), mx.float16)
    for caches in sequences:
        for cache in caches:
            cache.load_fp16_prefix(prefix, prefix)

    def step(tokens):
        for caches in sequences:
            caches[0].sequence.append_token_ids([0])
        cache = sequences[0] if alone else batch_caches(sequences)
        return mx.argmax(model(tokens[:, None], cache=cache)[:, -1, :], axis=-1)
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="cProfile ours")
    ap.add_argument("--sort", default="tottime", help="the profile's order (cumulative, ...)")
    ap.add_argument("--limit", default=18, type=lambda s: int(s) if s.isdigit() else s,
                    help="rows of the profile, or a name's regex")
    ap.add_argument("--json", default=None, help="also write the table here")
    ap.add_argument("--real", action="store_true",
                    help="the real kernels, not stubs (a GPU machine): each kernel call's own "
                         "host cost counted too (MLX builds its source string per call)")
    ap.add_argument("--sections", action="store_true",
                    help="also each attention layer's building by section (projections, rope, "
                         "update_and_fetch, attention, ...), ms per step, fp16 and ours")
    args = ap.parse_args()
    model = small_llama(args.layers)
    sections: dict[str, dict[str, float]] = {}

    def timed(name: str, step, b: int, profile: bool = False):
        totals = sections.setdefault(f"{name} B={b}", {})
        if args.sections:
            time_attention_sections(totals)
        return build_ms(step, b, args.steps, profile, args.sort, args.limit, sections=totals)

    fp16 = {b: timed("fp16", fp16_step(model, b, args.context), b) for b in args.batches}
    if not args.real:
        stub_gpu_kernels()
    print(f"{'B':>3} {'fp16 ms':>8} {'ours ms':>8} {'ours/fp16':>9}  (graph building per step)"
          f"  {'fp16 enc':>8} {'ours enc':>8}  (encoding, ms)  ours' median and slowest builds")
    rows = []
    for b in args.batches:
        ours, enc, per_step = timed("ours", tq_step(model, b, args.context, alone=b == 1), b,
                                    args.profile)
        base, base_enc, _ = fp16[b]
        # The slowest steps are the block openings (one step in 16 opens a block).
        slowest = sorted(per_step)[-max(1, args.steps // 16):]
        print(f"{b:>3} {base:>8.2f} {ours:>8.2f} {ours / base:>9.2f}  {'':>24}  "
              f"{base_enc:>8.2f} {enc:>8.2f}  {statistics.median(per_step):.2f}, "
              + " ".join(f"{ms:.2f}" for ms in slowest))
        rows.append(dict(batch=b, fp16_build_ms=base, build_ms=ours, fp16_encode_ms=base_enc,
                         encode_ms=enc, build_ms_per_step=per_step))
    if args.sections:
        print("attention layers' building by section, ms per step (all layers):")
        print(f"{'':>12} " + " ".join(f"{name:>16}" for name in SECTIONS))
        for label, totals in sections.items():
            print(f"{label:>12} " + " ".join(f"{1e3 * totals.get(name, 0.0) / args.steps:>16.3f}"
                                            for name in SECTIONS))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            layers=args.layers, context=args.context, steps=args.steps, rows=rows,
            sections_ms_per_step={label: {k: 1e3 * v / args.steps for k, v in totals.items()}
                                  for label, totals in sections.items() if totals}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
