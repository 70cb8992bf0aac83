"""`tqstore bench hit`: TTFT of a full hit against cold prefill of the same prompt, and
concurrent Lookup/Fetch throughput of the daemon.

Same process, same run: for each prompt length a fresh store, a cold generation (nothing
cached; its prefill blocks are uploaded), then the same prompt again (prefix fetched as fp16 from
the daemon). The ratio hit/cold is the figure; outputs must be identical. Then N client threads
Lookup+Fetch the largest prompt's blocks concurrently, against one client in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import tempfile
import time

from tqstore.demo import DATA
from tqstore.errors import InvalidArgument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8000],
                        help="prompt lengths in tokens (SmolLM2's context is 8192)")
    parser.add_argument("--max-tokens", type=int, default=8,
                        help="tokens generated per run (default 8)")
    parser.add_argument("--clients", type=int, default=16,
                        help="concurrent client processes of the throughput run (default 16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency measurement")
    parser.add_argument("--forms", nargs="+", default=["fp16"], choices=["fp16", "turboquant"],
                        help="Fetch forms to measure a hit with (turboquant: codes restored "
                             "straight into the pages; close to cold, not identical)")


def _corpus_ids(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    for name in ("gpl-3.txt", "python-stdlib-docstrings.txt"):
        ids += tokenizer.encode((DATA / name).read_text())
        if len(ids) >= n:
            return ids[:n]
    raise InvalidArgument(f"the bundled texts hold only {len(ids)} tokens, fewer than {n}")


def _client_loop(address: str, ns, ids: list[int], blocks: int, start_at: float, stop_at: float,
                 out) -> None:
    """One client process: from start_at, Lookup + Fetch until stop_at; reports (requests, fp16
    bytes). The common start lets every process finish importing before the clock runs."""
    import tqstore  # noqa: F401  (OpenBLAS before MLX, as in every entry point)
    from tqstore.client import KvStoreClient

    time.sleep(max(0.0, start_at - time.time()))
    requests = moved = 0
    with KvStoreClient(address) as client:
        while time.time() < stop_at:
            hit = client.lookup(ns, ids).hit_blocks
            got = client.fetch_fp16(ns, ids, 0, min(hit, blocks))
            requests += 1
            moved += sum(b.keys.nbytes + b.values.nbytes for b in got)
    out.put((requests, moved))


def _throughput(address: str, ns, ids, blocks: int, clients: int, seconds: float) -> dict:
    """Clients are separate processes, as generators are: no shared GIL with the daemon."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0  # let every process import before the clock starts
    procs = [ctx.Process(target=_client_loop, args=(address, ns, ids, blocks, start_at,
                                                      start_at + seconds, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    requests = sum(r for r, _ in results)
    moved = sum(m for _, m in results)
    return {"clients": clients, "requests": requests, "requests_per_s": requests / seconds,
            "fp16_gb_per_s": moved / seconds / 1e9}


def run(args: argparse.Namespace) -> int:
    from tqstore.client import KvStoreClient
    from tqstore.config import ServerConfig, StoreConfig
    from tqstore.generator import CachedGenerator
    from tqstore.models.smollm2 import load_smollm2
    from tqstore.server import Daemon

    loaded = load_smollm2()
    corpus = _corpus_ids(loaded.tokenizer, max(args.sizes))
    rows = []
    concurrency = {}
    for size in args.sizes:
        ids = corpus[:size]
        daemon = Daemon(ServerConfig(path=tempfile.mkdtemp(prefix="tqstore-bench-hit-"),
                                     listen="127.0.0.1:0",
                                     store=StoreConfig(max_bytes=8 << 30, map_size=1 << 30))).start()
        try:
            with KvStoreClient(daemon.address) as client:
                generator = CachedGenerator(loaded, client)
                cold = generator.generate(ids, args.max_tokens)
                cold.upload.result()
                for form in args.forms:
                    gen = generator if form == "fp16" else CachedGenerator(loaded, client,
                                                                           fetch_form=form)
                    hit = gen.generate(ids, args.max_tokens)
                    same = sum(a == b for a, b in zip(hit.token_ids, cold.token_ids))
                    row = {"prompt_tokens": size, "form": form, "hit_tokens": hit.hit_tokens,
                           "cold_ttft_s": cold.ttft_s, "hit_ttft_s": hit.ttft_s,
                           "hit_over_cold": hit.ttft_s / cold.ttft_s,
                           "hit_first_step_s": hit.first_step_s,
                           "identical_output": hit.token_ids == cold.token_ids,
                           "tokens_equal_to_cold": f"{same}/{len(cold.token_ids)}"}
                    rows.append(row)
                    if not args.json:
                        print(f"{size:>6} tokens, {form:>10}: cold {cold.ttft_s:7.2f} s  hit "
                              f"{hit.ttft_s:6.2f} s  ratio {row['hit_over_cold']:.3f}  first step "
                              f"{hit.first_step_s:.2f} s  tokens equal {row['tokens_equal_to_cold']}",
                              flush=True)
                if size == max(args.sizes):
                    blocks = hit.hit_tokens // generator.block_size
                    one = _throughput(daemon.address, generator.namespace, ids, blocks, 1,
                                      args.seconds)
                    many = _throughput(daemon.address, generator.namespace, ids, blocks,
                                       args.clients, args.seconds)
                    concurrency = {"prompt_tokens": size, "blocks_per_request": blocks,
                                   "single": one, "concurrent": many,
                                   "throughput_ratio": many["fp16_gb_per_s"] / one["fp16_gb_per_s"]}
        finally:
            daemon.stop(grace=5)
    report = {"machine": f"{platform.machine()}, {platform.node()}", "model": "SmolLM2-135M-Instruct fp32",
              "rows": rows, "concurrency": concurrency}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        c = concurrency
        if c:
            print(f"Lookup+Fetch of {c['blocks_per_request']} blocks ({c['prompt_tokens']} tokens): "
                  f"1 client {c['single']['requests_per_s']:.2f} req/s {c['single']['fp16_gb_per_s']:.2f} GB/s; "
                  f"{c['concurrent']['clients']} clients {c['concurrent']['requests_per_s']:.2f} req/s "
                  f"{c['concurrent']['fp16_gb_per_s']:.2f} GB/s ({c['throughput_ratio']:.2f}x)")
    return 0
