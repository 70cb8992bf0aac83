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
import platform
import tempfile
import threading
import time

from tqstore.demo import DATA


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8000],
                        help="prompt lengths in tokens (SmolLM2's context is 8192)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency measurement")


def _corpus_ids(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    for name in ("gpl-3.txt", "python-stdlib-docstrings.txt"):
        ids += tokenizer.encode((DATA / name).read_text())
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"the bundled texts hold only {len(ids)} tokens, fewer than {n}")


def _throughput(client_factory, ns, ids, blocks: int, clients: int, seconds: float) -> dict:
    done = [0] * clients
    bytes_moved = [0] * clients
    stop = time.perf_counter() + seconds
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with client_factory() as client:
                while time.perf_counter() < stop:
                    hit = client.lookup(ns, ids).hit_blocks
                    got = client.fetch_fp16(ns, ids, 0, min(hit, blocks))
                    done[i] += 1
                    bytes_moved[i] += sum(b.keys.nbytes + b.values.nbytes for b in got)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return {"clients": clients, "requests": sum(done), "requests_per_s": sum(done) / elapsed,
            "fp16_gb_per_s": sum(bytes_moved) / elapsed / 1e9}


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
                hit = generator.generate(ids, args.max_tokens)
                row = {"prompt_tokens": size, "hit_tokens": hit.hit_tokens,
                       "cold_ttft_s": cold.ttft_s, "hit_ttft_s": hit.ttft_s,
                       "hit_over_cold": hit.ttft_s / cold.ttft_s,
                       "hit_first_step_s": hit.first_step_s,
                       "identical_output": hit.token_ids == cold.token_ids}
                rows.append(row)
                if not args.json:
                    print(f"{size:>6} tokens: cold {cold.ttft_s:7.2f} s  hit {hit.ttft_s:6.2f} s  "
                          f"ratio {row['hit_over_cold']:.3f}  identical {row['identical_output']}",
                          flush=True)
                if size == max(args.sizes):
                    blocks = hit.hit_tokens // generator.block_size
                    factory = lambda: KvStoreClient(daemon.address)  # noqa: E731
                    one = _throughput(factory, generator.namespace, ids, blocks, 1, args.seconds)
                    many = _throughput(factory, generator.namespace, ids, blocks, args.clients,
                                       args.seconds)
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
