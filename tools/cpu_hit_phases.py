"""Where a CPU daemon hit's time to first token goes, and two variants of it, in one process.

A real daemon (`tqstore serve`, its own process, loopback TCP), the bundled SmolLM2 and the
bundled texts' first N tokens (as `tqstore bench hit`): one cold run uploads the prompt's
blocks, then hits of the same prompt alternate between modes, --rounds each:
  every      the default: C kernels on every core where a call is large
  one        TQSTORE_CPU_THREADS=1: every C kernel on one thread (the quantizer's A/B)
  deferred   (--deferred) the restored prefix is not quantized during the last token's chunk
             (PagedLayerCache._write_prefill_blocks a no-op) but at the first decode step
  numpy      (--numpy-restore) the fetch reads into fresh numpy memory and the restore copies
             it into MLX (unified_memory.unified_empty off: the path before the fetch read into
             MLX's own arrays)
Per hit: TTFT, the generator's phases (fetch, restore, prefill), seconds inside the quantizer
(cpu_kernels.quantize, which also evaluates its lazy inputs) and inside its C call, the first
decode step; every hit's greedy tokens must equal the cold run's (else it exits 1).

  python3 tools/cpu_hit_phases.py --tokens 4096 --rounds 4 [--deferred] [--numpy-restore]
      [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tqstore.native.cpu_kernels as cpu_kernels  # noqa: E402
from tqstore import unified_memory  # noqa: E402
from tqstore.bench.hit import _corpus_ids, _daemon  # noqa: E402
from tqstore.client import KvStoreClient  # noqa: E402
from tqstore.generator import CachedGenerator  # noqa: E402
from tqstore.models.smollm2 import load_smollm2  # noqa: E402
from tqstore.paged.cache import PagedLayerCache  # noqa: E402

_spent = {"quantize": 0.0, "c": 0.0}


def _timed(fn, key):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _spent[key] += time.perf_counter() - started
    return wrapper


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--deferred", action="store_true")
    p.add_argument("--numpy-restore", action="store_true")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    cpu_kernels.quantize = _timed(cpu_kernels.quantize, "quantize")
    lib = cpu_kernels.load()
    if lib is not None:
        lib.tq_quantize = _timed(lib.tq_quantize, "c")
    loaded = load_smollm2()
    ids = _corpus_ids(loaded.tokenizer, args.tokens)
    modes = (["every", "one"] + (["deferred"] if args.deferred else [])
             + (["numpy"] if args.numpy_restore else []))
    path = tempfile.mkdtemp(prefix="tqstore-cpu-hit-")
    daemon, address = _daemon(path)
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    write_blocks = PagedLayerCache._write_prefill_blocks
    unified_empty = unified_memory.unified_empty
    try:
        with KvStoreClient(address) as client:
            gen = CachedGenerator(loaded, client)
            cold = gen.generate(ids, args.new_tokens)
            cold.upload.result()
            for _ in range(args.rounds):
                for mode in modes:
                    if mode == "one":
                        os.environ["TQSTORE_CPU_THREADS"] = "1"
                    if mode == "deferred":
                        PagedLayerCache._write_prefill_blocks = lambda self: None
                    if mode == "numpy":
                        unified_memory.unified_empty = lambda shapes, dtype: None
                    _spent.update(quantize=0.0, c=0.0)
                    try:
                        hit = gen.generate(ids, args.new_tokens)
                    finally:
                        os.environ.pop("TQSTORE_CPU_THREADS", None)
                        PagedLayerCache._write_prefill_blocks = write_blocks
                        unified_memory.unified_empty = unified_empty
                    if hit.token_ids != cold.token_ids:
                        print(f"{mode}: the hit's tokens differ from the cold run's")
                        return 1
                    rows[mode].append({"ttft_s": hit.ttft_s, "first_step_s": hit.first_step_s,
                                       "quantize_s": _spent["quantize"], "c_s": _spent["c"],
                                       # K and V taken in place (MLX's arrays): 2, else 0
                                       "in_place": gen.restore_times.get("in_place", 0),
                                       **{k: v for k, v in hit.phases.items()}})
    finally:
        daemon.stop()
        shutil.rmtree(path, ignore_errors=True)
    out = {"tokens": args.tokens, "cold_ttft_s": cold.ttft_s, "hit_tokens": hit.hit_tokens,
           "rounds": rows}
    print(f"{args.tokens} tokens, cold TTFT {cold.ttft_s:.2f} s; medians of {args.rounds} hits "
          f"(s; quantize = over the whole generate call)")
    for mode, hits in rows.items():
        med = {k: statistics.median(h[k] for h in hits) for k in hits[0]}
        print(f"  {mode:<9} TTFT {med['ttft_s']:.3f} ({med['ttft_s'] / cold.ttft_s:.4f}x cold)  "
              f"fetch {med['fetch']:.3f}  restore {med['restore']:.3f}  prefill "
              f"{med['prefill']:.3f}  quantize {med['quantize_s']:.3f} (C {med['c_s']:.3f})  "
              f"first step {med['first_step_s']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
