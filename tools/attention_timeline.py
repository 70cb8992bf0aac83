#!/usr/bin/env python3
"""The GPU timeline of the attention benchmark's queued calls: 16 independent B=1 calls queued
before one eval (as tools/bench_attention.py times them), traced with CUPTI through PyTorch's
profiler. Prints, per context and merge variant, the wall and GPU span per call, the mean
duration of each kernel name, and the first events with their CUDA streams: MLX spreads
independent calls over several streams, so one call's kernel can overlap the next one's.

Device only (needs torch with CUDA next to MLX's CUDA backend):
    PYTHONUNBUFFERED=1 python3 tools/attention_timeline.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from tqstore.metal.attention_kernel import kernel_paged_decode_attention  # noqa: E402
from tqstore.bench.attention import random_pages  # noqa: E402

SEPARATE_MERGE = dict(kernel="mma", warps=8, depth=1, fused=False)
CALLS = 16


def main() -> int:
    rng = np.random.default_rng(7)
    for ctx in (32768, 131072):
        pages = []
        for _ in range(CALLS):
            p = random_pages(rng, [ctx], 32, 8, 128, 128, 4, 4, 16, 0)
            mx.eval([v for v in p.values() if isinstance(v, mx.array)])
            pages.append(p)
        for name, variant in (("fused merge", None), ("separate merge", SEPARATE_MERGE)):
            def run(v=variant):
                return [kernel_paged_decode_attention(**p, variant=v) for p in pages]
            for _ in range(3):
                mx.eval(run())
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                mx.eval(run())
                wall = time.perf_counter() - t0
            with tempfile.NamedTemporaryFile(suffix=".json") as fh:
                prof.export_chrome_trace(fh.name)
                trace = json.loads(Path(fh.name).read_text())
            events = sorted((e for e in trace["traceEvents"]
                             if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")
                             and "dur" in e), key=lambda e: e["ts"])
            t_first = events[0]["ts"]
            span = max(e["ts"] + e["dur"] for e in events) - t_first
            by_name: dict[str, list[float]] = {}
            for e in events:
                by_name.setdefault(e["name"][:40], []).append(e["dur"])
            print(f"B=1 ctx {ctx}, {name}: wall {wall * 1e6 / CALLS:.1f} us/call (traced), GPU span "
                  f"{span / CALLS:.1f} us/call; "
                  + "; ".join(f"{k}: {len(v)}x {np.mean(v):.1f} us" for k, v in by_name.items()))
            for e in events[:10]:
                print(f"    t={e['ts'] - t_first:8.1f} us  dur {e['dur']:6.1f} us  stream "
                      f"{e.get('args', {}).get('stream', '?')}  {e['name'][:48]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
