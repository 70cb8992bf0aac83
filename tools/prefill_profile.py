"""Where a cold prefill's time goes: tqstore's CachedGenerator against stock mlx-lm, in one run.

Random bf16 weights in a real model shape (tools/hit_gpu_bench.build_model), random token ids,
no daemon. First the quantize kernel alone (per call, on a 256-token chunk and on 8k tokens of
one layer's keys, and its bytes against the codec's). Then per prompt length, TTFT (the prompt
and its first token), best of 2 after a warm-up:
- stock S: mlx-lm's generate_step prefill with its fp16 KVCache in steps of S tokens (2048 is
  its default; 256 is our default chunk, the store block);
- ours B: CachedGenerator cold with store block B (its prefill chunk), default policy, on a
  generator warmed by one 1024-token request; also its first decode step (first_step_s);
- ours 256, pages at the end: the per-chunk page writes turned off (the prefill is quantized at
  the first decode step instead), which isolates their cost;
- ours 256, fp16 policy: no quantization at all;
- ours 256, first request: a new generator's first request (its pool allocated before it).
Also our per-chunk times at 256 (first and last three). Prints a line per variant and JSON.

    python3 tools/prefill_profile.py --sizes 8192 32768 [--shape llama3-8b] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tqstore  # noqa: E402,F401  (OpenBLAS before MLX, as in every entry point)
from gpu_bench_inputs import SHAPES, emit, log  # noqa: E402
from hit_gpu_bench import build_model, stock_ttft  # noqa: E402


def quantize_probe(loaded) -> dict:
    """The quantize kernel (tqstore.metal.dispatch's choice) on layer 0's key codec: ms per call
    for a 256-token chunk and for 8,192 tokens, and whether its bytes equal the codec's."""
    import mlx.core as mx

    from tqstore.codec import CodecConfig, layer_codecs
    from tqstore.metal import dispatch
    from tqstore.paged.cache import model_kv_layout

    layout = model_kv_layout(loaded.model)
    codec, _ = layer_codecs(CodecConfig(), 0, layout["num_kv_heads"], layout["key_head_dim"])
    out = {}
    for tokens in (256, 8192):
        x = mx.random.normal((1, layout["num_kv_heads"], tokens, layout["key_head_dim"])
                             ).astype(mx.float16)
        mx.eval(x)
        q = dispatch.quantize(codec, x)
        mx.eval(q.codes, q.scales)
        with mx.stream(mx.cpu):
            ref = codec.quantize(x)
            mx.eval(ref.codes, ref.scales)
        same = bool(mx.array_equal(q.codes, ref.codes).item()
                    and mx.array_equal(q.scales.view(mx.uint16), ref.scales.view(mx.uint16)).item())
        start, n = time.perf_counter(), 50
        mx.eval([(q.codes, q.scales) for q in (dispatch.quantize(codec, x) for _ in range(n))])
        ms = (time.perf_counter() - start) / n * 1e3  # launched together: throughput
        out[f"{tokens}_tokens"] = {"ms_per_call": ms, "bytes_equal_codec": same}
        log(f"quantize ({layout['num_kv_heads']} heads x {tokens} tokens): {ms:.3f} ms per call, "
            f"bytes equal the codec's: {same}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192])
    ap.add_argument("--pool-gib", type=float, default=8.0)
    ap.add_argument("--stock-steps", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--blocks", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()

    import mlx.core as mx
    import numpy as np

    from tqstore.generator import CachedGenerator
    from tqstore.paged.policy import FP16_POLICY
    from tqstore.paged.cache import PagedLayerCache

    log(f"building a random {args.shape} model on {mx.default_device()}")
    loaded = build_model(args.shape, 0)
    rng = np.random.default_rng(0)
    gib = 2**30

    def ours(ids, block=256, pool_gib=args.pool_gib, policy=None, chunks=None, fresh=False):
        """(TTFT, first decode step) best of 2 cold runs on one generator warmed by a
        1024-token prompt, or with fresh=True the generator's first request."""
        gen = CachedGenerator(loaded, None, policy=policy, block_size=block,
                              pool_budget_bytes=int(pool_gib * gib))
        if not fresh:
            gen.generate(ids[:1024], 2)
        best = None
        for _ in range(1 if fresh else 2):
            marks = [time.perf_counter()]
            report = gen.generate(ids, 3, progress=lambda done, total: marks.append(
                time.perf_counter()))
            if best is None or report.ttft_s < best[0]:
                best = (report.ttft_s, report.first_step_s)
        if chunks is not None:
            chunks.extend(round(b - a, 4) for a, b in zip(marks, marks[1:]))
        del gen
        mx.clear_cache()
        return best

    write_blocks = PagedLayerCache._write_prefill_blocks

    def pages_at_end(ids):
        PagedLayerCache._write_prefill_blocks = lambda self: None
        try:
            return ours(ids)
        finally:
            PagedLayerCache._write_prefill_blocks = write_blocks

    kernel = quantize_probe(loaded)
    rows = []
    for size in args.sizes:
        ids = rng.integers(0, loaded.tokenizer.vocab_size - 1, size).tolist()
        stock_ttft(loaded, ids[:1024])  # warm-up: kernels compiled, memory pools sized
        chunks: list[float] = []
        variants = {f"stock {s}": (lambda s=s: (min(stock_ttft(loaded, ids, step=s)
                                                    for _ in range(2)), 0.0))
                    for s in args.stock_steps}
        variants.update({f"ours {b}": (lambda b=b: ours(ids, b, chunks=chunks if b == 256
                                                         else None)) for b in args.blocks})
        variants.update({
            "ours 256, pages at the end": lambda: pages_at_end(ids),
            "ours 256, fp16 policy": lambda: ours(ids, policy=FP16_POLICY),
            "ours 256, first request": lambda: ours(ids, fresh=True),
        })
        row = {"prompt_tokens": size}
        base = None
        for name, run in variants.items():
            ttft, first_step = run()
            row[name] = {"ttft_s": ttft, "first_step_s": first_step}
            base = base or (ttft if name == f"stock {max(args.stock_steps)}" else None)
            log(f"{size} tokens, {name}: TTFT {ttft:.3f} s"
                + (f" ({ttft / base:.2f}x stock {max(args.stock_steps)})" if base else "")
                + (f", first decode step {first_step * 1e3:.1f} ms" if first_step else ""))
        row["ours_256_chunk_s"] = chunks
        log(f"{size} tokens, our chunks (s): first {chunks[:3]} last {chunks[-3:]}")
        rows.append(row)
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {mx.default_device()}",
              "shape": args.shape, "quantize_kernel": kernel, "rows": rows}
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
