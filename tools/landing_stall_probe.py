"""Does an upload's landing slow the default stream down? (issue 16, a diagnostic, no model)

Times work on MLX's default stream alone and with a landing (tqstore.upload_landing.land, the
route the backend takes) of every layer's K and V in flight:
- tiny: one small op and .item();
- chainN: N dependent elementwise ops on a small array in one eval (a decode step is hundreds
  of small kernels);
- big: eight (side x side) matmuls;
- host_madeN: N small arrays made from numpy (managed memory on CUDA) added up.
Best of --repeats each. This is how the wait in tools/upload_stall_bench.py's first decode step
was pinned down on the H100 (docs/BENCHMARKS.md, "Uploads off the generating thread"): with the
first route (copy kernels storing into mapped host memory) chain2000 ran 21 ms alone and 89 ms
beside a 32k-token landing; with the copy engine the same, but host_made200 (managed memory,
which the copy engine migrates) 2.2 ms alone and 6.0 beside a landing given all at once
(--piece-mb 0). The landing is polled on its thread (upload_landing.then) as in the product;
the first version of --piece-mb did not poll, so its piece columns measured a landing whose
first four pieces only were queued.

    python3 tools/landing_stall_probe.py --tokens 32768   # the H100 machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def probe(tokens: int, repeats: int, side: int, piece_mb: float, layers_count: int = 32) -> dict:
    import tqstore  # noqa: F401  (before MLX, as in every entry point)
    import mlx.core as mx
    import numpy as np

    from tqstore import upload_landing

    upload_landing._PIECE_BYTES = int(piece_mb * 2**20)

    layers = [(mx.random.normal((1, 8, tokens, 128)).astype(mx.float16),
               mx.random.normal((1, 8, tokens, 128)).astype(mx.float16))
              for _ in range(layers_count)]
    small = mx.ones((256,))
    a = mx.random.normal((side, side)).astype(mx.float16)
    mx.eval(layers, small, a)
    cap = 16 << 30

    def tiny():
        return (small + 1).sum().item()

    def chain(n):
        def run():
            x = small
            for _ in range(n):
                x = x * 1.0001 + 0.0001
            return x.sum().item()
        return run

    def big():
        x = a
        for _ in range(8):
            x = (x @ a) * 0.001
        return x.sum().item()

    def host_made(n):
        def run():  # arrays made from host memory (MLX's CUDA backend: managed memory)
            x = small
            for i in range(n):
                x = x + mx.array(np.full(256, i, np.float32))
            return x.sum().item()
        return run

    works = {"tiny": tiny, "chain50": chain(50), "chain400": chain(400), "chain2000": chain(2000),
             "big": big, "host_made20": host_made(20), "host_made200": host_made(200)}
    for work in works.values():  # compiled, and the landing buffer grown, before timing
        work()
    landing = upload_landing.land(layers, 0, tokens, cap)
    landing.result()
    out = {"route": landing.route, "device": str(mx.default_device()), "piece_mb": piece_mb,
           "landing_gb": 2 * layers_count * 8 * tokens * 128 * 2 / 1e9}
    del landing
    for name, work in works.items():
        alone, beside, landed = [], [], []
        for _ in range(repeats):
            t = time.perf_counter()
            work()
            alone.append(time.perf_counter() - t)
            t0 = time.perf_counter()
            # polled on the landing thread as the product does (then()): in pieces, later
            # pieces are queued only when it looks at the landing
            landed_future = upload_landing.then(upload_landing.land(layers, 0, tokens, cap),
                                                lambda keys, values: None)
            t = time.perf_counter()
            work()
            beside.append(time.perf_counter() - t)
            landed_future.result()
            landed.append(time.perf_counter() - t0)
        out[name] = {"alone_s": min(alone), "beside_landing_s": min(beside),
                     "landing_s": min(landed)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--side", type=int, default=4096, help="the big matmuls' side")
    ap.add_argument("--piece-mb", type=float, nargs="+", default=[0.0],
                    help="upload_landing's pieces for the copy engine, one probe each (0: all "
                         "at once)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    results = [probe(args.tokens, args.repeats, args.side, piece) for piece in args.piece_mb]
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    for res in results:
        print(f"route {res['route']} on {res['device']}, {res['landing_gb']:.2f} GB landed, "
              f"pieces of {res['piece_mb']} MB")
        for name, r in res.items():
            if isinstance(r, dict):
                print(f"  {name:12s} alone {r['alone_s'] * 1e3:8.2f} ms  beside the landing "
                      f"{r['beside_landing_s'] * 1e3:8.2f} ms  (landing {r['landing_s'] * 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
