"""Does uploading a prefill's blocks stall decode? Cold runs with and without a daemon, in one
run on one machine (issue 16: "uploads never stall decode or the first token").

Per prompt length, cold runs on fresh random prompts (each one a miss), `--repeats` of each:
- none: CachedGenerator without a daemon: nothing is uploaded (the baseline);
- landing: with a daemon; the upload's device-to-host copy goes by the backend's route in
  tqstore.upload_landing (the copy engine into pinned memory on CUDA, in pieces of the
  default _PIECE_BYTES; numpy views on unified memory) and the upload thread waits for it;
- copied: with a daemon; the copy runs on the generating thread inside the first decode step
  (what every upload did before upload_landing; forced here by turning its routes off);
- piecesX (one per --piece-mb X): landing, with the copy engine given the landing in pieces of
  X MiB (upload_landing._PIECE_BYTES; the copy-engine route only); pieces0 = all at once.
Reported per run: TTFT, the first decode step after the first token (first_step_s: it also
quantizes the prompt's last block, in every mode), steady decode tokens/s (while the Put is
in flight), the landing's route and when the upload thread had the bytes, and the whole upload.

    python3 tools/upload_stall_bench.py --shape llama3-8b --sizes 8192 32768 --block 2048  # GPU
    python3 tools/upload_stall_bench.py --shape smollm2 --sizes 2048 --repeats 3 --max-tokens 16  # CPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tqstore  # noqa: E402,F401  (OpenBLAS before MLX, as in every entry point)
from gpu_bench_inputs import SHAPES, emit, log  # noqa: E402


def _steady_tps(report) -> float:
    """Decode tokens/s after the first decode step (the report's figure includes it)."""
    after_first = len(report.token_ids) - 1
    seconds = after_first / report.decode_tokens_per_s - report.first_step_s
    return (after_first - 1) / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES) + ["smollm2"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--block", type=int, default=None, help="store block (default: the backend's)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--pool-gib", type=float, default=None,
                    help="each generator's pool (default 8; 1 for smollm2: two 8 GiB pools "
                         "swapped the 24 GiB CPU VM)")
    ap.add_argument("--piece-mb", type=float, nargs="*", default=[],
                    help="also land in pieces of these MiB (a mode each)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    if args.pool_gib is None:
        args.pool_gib = 1.0 if args.shape == "smollm2" else 8.0

    import mlx.core as mx
    import numpy as np

    from tqstore import upload_landing
    from tqstore.client import KvStoreClient
    import tqstore.generator as generator_module
    from tqstore.generator import CachedGenerator
    from tqstore.models.smollm2 import load_smollm2
    from tqstore.servers import ServerProcess, free_port, tqstore_argv

    if args.shape == "smollm2":
        loaded = load_smollm2()
    else:
        from hit_gpu_bench import build_model
        loaded = build_model(args.shape, 0)
    log(f"{args.shape} on {mx.default_device()}")
    store = tempfile.mkdtemp(prefix="tqstore-upload-stall-")
    address = f"127.0.0.1:{free_port()}"
    daemon = ServerProcess("daemon", tqstore_argv("serve", "--path", store, "--listen", address,
                                                  "--max-gib", "200"), Path(store) / "daemon.log")
    landings: list = []
    real_land = upload_landing.land

    def recording_land(*a, **k):
        landing = real_land(*a, **k)
        landings.append(landing)
        return landing

    rng = np.random.default_rng(0)
    rows = []
    try:
        probe = KvStoreClient(address)
        daemon.wait_ready(lambda: probe.is_serving(timeout=1), 120)
        with KvStoreClient(address) as client:
            kw = dict(block_size=args.block, pool_budget_bytes=int(args.pool_gib * 2**30))
            gens = {"none": CachedGenerator(loaded, None, **kw),
                    "landing": CachedGenerator(loaded, client, **kw)}
            gens["copied"] = gens["landing"]
            pieces = {f"pieces{mb:g}": int(mb * 2**20) for mb in args.piece_mb}
            gens.update({mode: gens["landing"] for mode in pieces})
            whole = upload_landing._PIECE_BYTES
            for size in args.sizes:
                vocab = loaded.tokenizer.vocab_size - 1
                # warm-up: each generator once at this length (kernels compiled, the pool and
                # the pinned landing buffer sized: growing it is paid once per process)
                for mode in ("none", "landing"):
                    r = gens[mode].generate(rng.integers(0, vocab, size).tolist(), 4)
                    if r.upload is not None:
                        r.upload.result()
                runs = {m: [] for m in ("none", "landing", "copied", *pieces)}
                for _ in range(args.repeats):
                    for mode in runs:
                        ids = rng.integers(0, vocab, size).tolist()
                        landings.clear()
                        saved = upload_landing._by_copy_engine, upload_landing._by_views
                        upload_landing.land = generator_module.land = recording_land
                        if mode == "copied":
                            upload_landing._by_copy_engine = lambda *a: None
                            upload_landing._by_views = lambda *a: None
                        upload_landing._PIECE_BYTES = pieces.get(mode, whole)
                        try:
                            report = gens[mode].generate(ids, args.max_tokens)
                            t = time.perf_counter()
                            if report.upload is not None:
                                report.upload.result()
                        finally:
                            upload_landing._by_copy_engine, upload_landing._by_views = saved
                            upload_landing.land = generator_module.land = real_land
                            upload_landing._PIECE_BYTES = whole
                        landing = landings[0] if landings else None
                        runs[mode].append({
                            "ttft_s": report.ttft_s, "first_step_s": report.first_step_s,
                            # steady: after the first decode step
                            "decode_tps": _steady_tps(report),
                            "route": landing.route if landing else None,
                            "landed_after_s": getattr(landing, "ready_s", None),
                            "upload_left_after_decode_s": time.perf_counter() - t,
                            "uploaded_blocks": report.upload.result() if report.upload else 0})
                        del landing, report  # nothing of this run holds a landing buffer
                        landings.clear()
                        mx.clear_cache()

                def med(mode: str, key: str) -> float:
                    return statistics.median(r[key] for r in runs[mode])

                row = {"prompt_tokens": size, "runs": runs}
                for mode in ("landing", "copied", *pieces):
                    row[f"{mode}_first_step_over_none"] = (med(mode, "first_step_s")
                                                           / med("none", "first_step_s"))
                    row[f"{mode}_decode_tps_over_none"] = (med(mode, "decode_tps")
                                                           / med("none", "decode_tps"))
                rows.append(row)
                log(f"{size} tokens (medians): " + "; ".join(
                    f"{m}: first step {med(m, 'first_step_s'):.4f} s"
                    + (f" ({row[m + '_first_step_over_none']:.2f}x none)" if m != "none" else "")
                    + f", decode {med(m, 'decode_tps'):.1f} tok/s, TTFT {med(m, 'ttft_s'):.3f} s"
                    + (f", route {runs[m][0]['route']}, bytes ready after "
                       f"{runs[m][0]['landed_after_s'] or 0:.4f} s" if m != "none" else "")
                    for m in runs))
    finally:
        daemon.stop(grace=10)
    emit({"machine": f"{platform.machine()} {os.cpu_count()} cores, {mx.default_device()}",
          "shape": args.shape, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
