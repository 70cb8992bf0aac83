"""A full hit against cold prefill on a real-size model shape, and the block transport's GB/s,
in one run on one machine (issue 16). For the GPU machine; `--shape tiny` runs anywhere.

Model: random bf16 weights in a Llama-3-8B shape (32 layers, 8 KV heads, head_dim 128: fp16 KV
131 KB per token), built in memory (no weights file), SmolLM2's tokenizer; prompts are random
token ids. The blocks a hit reads are the ones our own cold run computed and uploaded, so a hit
must give the cold run's tokens exactly.

Per prompt length, in this order:
- stock: mlx-lm's fp16 KVCache, generate_step's prefill (2048-token steps): the cold TTFT users
  have today (best of 2, after a warm-up);
- cold: tqstore's CachedGenerator with nothing stored (its blocks are uploaded, then awaited);
- hit: the same prompt again (Lookup, same-host read or gRPC, restore, the last token), 4 runs
  (the first in the process pins the staging buffer); its restore step by step; and 3 hits
  with the staging buffer off (ClientConfig.staging_bytes=0: pageable memory, cudaMemcpy);
- transport: the hit's blocks fetched alone: same-host read, gRPC with 1 and 4 streams, against
  a raw read of the same payload files (into fresh memory and into a reused buffer on one
  thread, and in 16 MiB pieces on up to 16 threads), and the host-to-device copy
  (host_to_device of the fetched K and V).
Then 1 and 16 client processes Lookup+Fetch over TCP (gRPC, no same-host reads).
The daemon is a separate `tqstore serve` process on loopback TCP. Prints a table and JSON.

    python3 tools/hit_gpu_bench.py --sizes 8192 32768 [--shape llama3-8b] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tqstore  # noqa: E402,F401  (OpenBLAS before MLX, as in every entry point)
from gpu_bench_inputs import SHAPES, emit, log, model_config  # noqa: E402


def build_model(shape: str, seed: int):
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import llama

    from tqstore.models.loader import LoadedModel
    from tqstore.models.smollm2 import load_smollm2

    smol = load_smollm2()
    cfg = model_config(shape, smol.tokenizer.vocab_size, {})
    cfg["max_position_embeddings"] = 131072
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    key = mx.random.key(seed)
    params = []
    for name, p in tree_flatten(model.parameters()):
        key, sub = mx.random.split(key)
        params.append((name, mx.ones(p.shape, mx.bfloat16) if name.endswith("norm.weight")
                       else mx.random.normal(p.shape, mx.bfloat16, scale=0.02, key=sub)))
        mx.eval(params[-1][1])
    model.update(tree_unflatten(params))
    return LoadedModel(model, smol.tokenizer, f"random-{shape}-seed{seed}", "")


def stock_ttft(loaded, ids: list[int], step: int = 2048) -> float:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(loaded.model)
    start = time.perf_counter()
    token, _ = next(generate_step(mx.array(ids), loaded.model, max_tokens=1, prompt_cache=cache,
                                  prefill_step_size=step))
    int(token)
    ttft = time.perf_counter() - start
    del cache
    mx.clear_cache()
    return ttft


def restore_breakdown(gen, ids: list[int]) -> dict:
    """One hit's fetch and restore step by step, as CachedGenerator.generate and restore run
    them (s): fetch, the host-to-device copies of K and V, making the caches, loading and
    evaluating them; `pinned` says whether the fetched bytes sat in the staging buffer."""
    import mlx.core as mx

    from tqstore.device_memory import host_to_device, staging
    from tqstore.paged import make_prompt_cache, release_prompt_cache

    t0 = time.perf_counter()
    blocks, _ = gen.fetch_prefix(ids)
    t1 = time.perf_counter()
    fresh = mx.zeros(blocks.keys.shape, mx.float16)  # what one device array costs to make
    mx.eval(fresh)
    allocate = time.perf_counter() - t1
    del fresh
    t1 = time.perf_counter()
    pinned = staging.holds(blocks.keys.ctypes.data, blocks.keys.nbytes)
    keys = host_to_device(blocks.keys)
    t2 = time.perf_counter()
    values = host_to_device(blocks.values)
    t3 = time.perf_counter()
    caches = make_prompt_cache(gen.pool)
    caches[0].sequence.prompt_length = len(ids)
    t4 = time.perf_counter()
    tokens = blocks.tokens
    for layer, cache in enumerate(caches):
        cut = (slice(layer, layer + 1), slice(None), slice(0, tokens))
        cache.load_fp16_prefix(keys[cut], values[cut])
    mx.eval([c.state for c in caches])
    t5 = time.perf_counter()
    release_prompt_cache(caches)
    return {"fetch": t1 - t0 - allocate, "allocate_one": allocate, "keys_to_device": t2 - t1, "values_to_device": t3 - t2,
            "make_cache": t4 - t3, "load_eval": t5 - t4, "pinned": float(pinned)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--clients", type=int, default=16, help="0 skips the TCP clients part")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--pool-gib", type=float, default=8.0)
    ap.add_argument("--block", type=int, default=256, help="store block (our prefill chunk)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()

    import mlx.core as mx
    import numpy as np

    from tqstore.bench.hit import _throughput, transport
    from tqstore.client import KvStoreClient
    from tqstore.config import ClientConfig
    from tqstore.generator import CachedGenerator
    from tqstore.servers import ServerProcess, free_port, tqstore_argv

    log(f"building a random {args.shape} model on {mx.default_device()}")
    loaded = build_model(args.shape, 0)
    store = tempfile.mkdtemp(prefix="tqstore-hit-gpu-")
    address = f"127.0.0.1:{free_port()}"
    daemon = ServerProcess("daemon", tqstore_argv("serve", "--path", store, "--listen", address,
                                                  "--max-gib", "200"), Path(store) / "daemon.log")
    rows, concurrency, prompts = [], {}, {}
    rng = np.random.default_rng(0)
    try:
        probe = KvStoreClient(address)
        daemon.wait_ready(lambda: probe.is_serving(timeout=1), 120)
        for size in args.sizes:
            ids = prompts[size] = rng.integers(0, loaded.tokenizer.vocab_size - 1, size).tolist()
            stock_ttft(loaded, ids[:1024])  # warm-up: kernels compiled, memory pools sized
            stock = min(stock_ttft(loaded, ids) for _ in range(2))
            with KvStoreClient(address) as client:
                gen = CachedGenerator(loaded, client, block_size=args.block,
                                      pool_budget_bytes=int(args.pool_gib * 2**30))
                chunk_times: list[float] = []
                cold = gen.generate(ids, 2, progress=lambda done, total: chunk_times.append(
                    time.perf_counter()))
                t = time.perf_counter()
                cold.upload.result()
                upload_s = time.perf_counter() - t
                hits = [gen.generate(ids, 2) for _ in range(4)]
                breakdown = [restore_breakdown(gen, ids) for _ in range(2)][-1]
                ns = gen.namespace
                del gen
                mx.clear_cache()
            # The same hits with ordinary (pageable) memory for the fetched bytes: the baseline
            # of the pinned staging buffer (ClientConfig.staging_bytes).
            with KvStoreClient(ClientConfig(address, staging_bytes=0)) as client:
                gen = CachedGenerator(loaded, client, block_size=args.block,
                                      pool_budget_bytes=int(args.pool_gib * 2**30))
                unstaged = [gen.generate(ids, 2) for _ in range(3)]
                del gen
                mx.clear_cache()
            with KvStoreClient(address) as client:
                # The TurboQuant form: the daemon re-quantizes, ~4x fewer bytes move, the rest
                # of the prompt attends to the dequantized prefix (close to cold, not equal).
                tq_gen = CachedGenerator(loaded, client, fetch_form="turboquant", block_size=args.block,
                                         pool_budget_bytes=int(args.pool_gib * 2**30))
                tq = [tq_gen.generate(ids, 2) for _ in range(2)]
                del tq_gen
            mx.clear_cache()
            hit = min(hits, key=lambda h: h.ttft_s)
            blocks = hit.hit_tokens // ns.block_size
            row = {"prompt_tokens": size, "stock_cold_ttft_s": stock, "cold_ttft_s": cold.ttft_s,
                   "upload_wait_s": upload_s, "hit_ttft_s": [h.ttft_s for h in hits],
                   "hit_tokens": hit.hit_tokens, "hit_status": hit.cache_status,
                   "identical_to_cold": all(h.token_ids == cold.token_ids for h in hits),
                   "cold_chunk_s": [round(b - a, 4) for a, b in zip(chunk_times, chunk_times[1:])],
                   "hit_phases_s": hit.phases, "cold_phases_s": cold.phases,
                   "restore_breakdown_s": breakdown,
                   "unstaged_hit_ttft_s": [h.ttft_s for h in unstaged],
                   "unstaged_hit_phases_s": min(unstaged, key=lambda h: h.ttft_s).phases,
                   "unstaged_identical_to_cold": all(h.token_ids == cold.token_ids
                                                     for h in unstaged),
                   "hit_over_stock": hit.ttft_s / stock, "hit_over_cold": hit.ttft_s / cold.ttft_s,
                   "turboquant_form_ttft_s": [h.ttft_s for h in tq],
                   "turboquant_form_hit_tokens": tq[-1].hit_tokens,
                   "turboquant_form_first_token_equal": tq[-1].token_ids[:1] == cold.token_ids[:1]}
            row.update(transport(address, ns, ids, blocks, store))
            rows.append(row)
            log(f"{size} tokens: stock cold {stock:.3f} s, ours cold {cold.ttft_s:.3f} s, hit "
                f"{hit.ttft_s:.3f} s = {row['hit_over_stock']:.3f}x stock, "
                f"{row['hit_over_cold']:.3f}x ours; identical {row['identical_to_cold']}; "
                f"TurboQuant-form hit {min(row['turboquant_form_ttft_s']):.3f} s; hit phases "
                f"{ {k: round(v, 3) for k, v in hit.phases.items()} }; all hits "
                f"{[round(h.ttft_s, 3) for h in hits]}; unstaged hit "
                f"{min(row['unstaged_hit_ttft_s']):.3f} s; restore breakdown "
                f"{ {k: round(v, 4) for k, v in breakdown.items()} }; cold chunks (s) first "
                f"{row['cold_chunk_s'][:3]} last {row['cold_chunk_s'][-3:]}; "
                f"direct {row['direct_gbps']:.2f} GB/s ({row['direct_over_raw_fresh']:.2f}x raw "
                f"fresh, {row['direct_over_raw_reused']:.2f}x raw reused), gRPC "
                f"{row['grpc_1_stream_gbps']:.2f} / {row['grpc_4_streams_gbps']:.2f} GB/s (1/4 "
                f"streams), raw parallel {row['raw_read_parallel_gbps']:.2f} GB/s, into MLX "
                f"{row['to_device_gbps']:.2f} GB/s, first device read "
                f"{row['first_device_read_gbps']:.2f} GB/s")
        if args.clients > 0:  # 0: skip the TCP concurrency part
            size = args.sizes[0]
            ids = prompts[size]
            blocks = size // ns.block_size
            one = _throughput(address, ns, ids, blocks, 1, args.seconds, direct=False)
            many = _throughput(address, ns, ids, blocks, args.clients, args.seconds, direct=False)
            concurrency = {"prompt_tokens": size, "single": one, "concurrent": many,
                           "ratio": many["fp16_gb_per_s"] / one["fp16_gb_per_s"]}
            log(f"TCP gRPC Lookup+Fetch, {size} tokens: 1 client {one['fp16_gb_per_s']:.2f} GB/s, "
                f"{args.clients} clients {many['fp16_gb_per_s']:.2f} GB/s ({concurrency['ratio']:.2f}x)")
    finally:
        daemon.stop(grace=10)
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {mx.default_device()}",
              "shape": args.shape, "rows": rows, "concurrency": concurrency}
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
