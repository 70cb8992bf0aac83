"""`tqstore bench hit`: TTFT of a full hit against cold prefill of the same prompt, the block
transport's GB/s against a raw read of the same files, and concurrent Lookup/Fetch throughput.

Same run: for each prompt length a fresh store and daemon (`tqstore serve`, its own process on
loopback TCP), a cold generation (nothing cached; its prefill blocks are uploaded), then the same
prompt again (prefix fetched as fp16: read from the daemon's files, this being its host). The
ratio hit/cold is the figure; outputs must be identical. At the largest length the fetch alone
is timed by path (`transport`), then 1 and N client processes Lookup+Fetch the blocks, with
same-host reads and over gRPC alone.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

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
                 direct: bool, out) -> None:
    """One client process: from start_at, Lookup + Fetch until stop_at; reports (requests, fp16
    bytes). The common start lets every process finish importing before the clock runs.
    direct: same-host reads of the daemon's files where possible; False: gRPC only."""
    import tqstore  # noqa: F401  (OpenBLAS before MLX, as in every entry point)
    from tqstore.client import KvStoreClient
    from tqstore.config import ClientConfig

    time.sleep(max(0.0, start_at - time.time()))
    requests = moved = 0
    # One stream per client: 16 clients of 4 streams would pass the daemon's 24 streaming
    # calls, and its refusals ("retry later") would end the run.
    config = ClientConfig(address, direct_reads="auto" if direct else "off", fetch_streams=1)
    with KvStoreClient(config) as client:
        while time.time() < stop_at:
            hit = client.lookup(ns, ids).hit_blocks
            got = client.fetch_fp16_prefix(ns, ids, 0, min(hit, blocks))
            requests += 1
            moved += got.keys.nbytes + got.values.nbytes
            del got
    out.put((requests, moved))


def _throughput(address: str, ns, ids, blocks: int, clients: int, seconds: float,
                direct: bool = True) -> dict:
    """Clients are separate processes, as generators are: no shared GIL with the daemon."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0  # let every process import before the clock starts
    procs = [ctx.Process(target=_client_loop, args=(address, ns, ids, blocks, start_at,
                                                      start_at + seconds, direct, out))
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


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def best(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def transport(address: str, ns, ids: list[int], blocks: int, store_path: str) -> dict:
    """GB/s of fetching the stored blocks [0, blocks) of ids alone: same-host read, gRPC with 1
    and 4 streams; a raw read of the same payload files (into fresh memory, and into a reused
    buffer) as the baseline; the copy into MLX arrays (host to device on CUDA); and a fetch
    with its restore, as a hit does them (on unified memory the fetch reads into MLX's own
    arrays, and the restore copies nothing). Best of 3."""
    import mlx.core as mx
    import numpy as np

    from tqstore.client import KvStoreClient
    from tqstore.config import ClientConfig
    from tqstore.device_memory import host_to_device
    from tqstore.metal.attention_kernel import gpu_build
    from tqstore.payload_format import file_name
    from tqstore.prefix_hash import hash_prefix_blocks

    nbytes = blocks * 4 * ns.num_layers * ns.num_kv_heads * ns.block_size * ns.head_dim
    row = {"bytes": nbytes}
    for label, cfg in (("direct", dict(direct_reads="on")),
                       ("grpc_1_stream", dict(direct_reads="off", fetch_streams=1)),
                       ("grpc_4_streams", dict(direct_reads="off", fetch_streams=4))):
        with KvStoreClient(ClientConfig(address, **cfg)) as client:
            # staged: into the pinned staging buffer on CUDA, as a generator's hit reads.
            got = client.fetch_fp16_prefix(ns, ids, 0, blocks, staged=True)
            assert len(got) == blocks, (label, len(got))
            row[label + "_source"] = got.source
            del got  # it would hold the staging buffer (CUDA) that the timed fetches use
            row[label + "_gbps"] = gbps(nbytes, best(
                lambda: client.fetch_fp16_prefix(ns, ids, 0, blocks, staged=True)))
    files = [os.path.join(store_path, "blocks", file_name(h))
             for h in hash_prefix_blocks(ns, ids[: blocks * ns.block_size])]
    row.update(raw_reads(files, nbytes))
    row["direct_over_raw_parallel"] = row["direct_gbps"] / row["raw_read_parallel_gbps"]
    row["direct_over_raw_fresh"] = row["direct_gbps"] / row["raw_read_fresh_gbps"]
    row["direct_over_raw_reused"] = row["direct_gbps"] / row["raw_read_reused_gbps"]
    with KvStoreClient(address) as client:
        # The copy into MLX alone: on CUDA from the staging buffer (the copy kernel); on
        # unified memory from numpy memory (mx.array), since a staged fetch there reads into
        # MLX's own arrays and its restore copies nothing (timed whole below).
        on_cuda = gpu_build("cuda")  # as device_memory.staging_empty decides
        got = client.fetch_fp16_prefix(ns, ids, 0, blocks, staged=on_cuda)

        def to_device() -> None:
            k, v = host_to_device(got.keys), host_to_device(got.values)
            mx.eval(k, v)

        row["to_device_gbps"] = gbps(nbytes, best(to_device))

        def restore() -> None:  # a hit's fetch and restore together, as a generator does them
            fetched = client.fetch_fp16_prefix(ns, ids, 0, blocks, staged=True)
            k, v = host_to_device(fetched.keys), host_to_device(fetched.values)
            mx.eval(k, v)

        row["fetch_and_restore_gbps"] = gbps(nbytes, best(restore))

    def first_touch() -> float:
        # On CUDA, MLX allocates managed memory: mx.array copies on the host, and the device's
        # first read of the pages migrates them. This times that first read.
        k, v = mx.array(got.keys), mx.array(got.values)
        mx.eval(k, v)
        t = time.perf_counter()
        mx.eval(k.sum(), v.sum())
        return time.perf_counter() - t

    row["first_device_read_gbps"] = gbps(nbytes, min(first_touch() for _ in range(3)))
    return row


def raw_reads(files: list[str], nbytes: int, runs: int = 3) -> dict[str, float]:
    """The baselines of a same-host read, GB/s (best of runs) of the same payload files (of
    equal size): preadv'd whole one after the other into a new buffer ("fresh", what a restore
    writes into) and into one already faulted in ("reused"); and in 16 MiB pieces on one thread
    per core (at most 16, as the same-host reader) into the reused buffer: the machine's
    ceiling ("parallel")."""
    import numpy as np

    size = os.path.getsize(files[0])

    def read_into(buffer) -> None:
        view = memoryview(buffer)
        for i, path in enumerate(files):
            fd = os.open(path, os.O_RDONLY)
            os.preadv(fd, [view[i * size:(i + 1) * size]], 0)
            os.close(fd)

    reused = np.empty(size * len(files), np.uint8)
    read_into(reused)
    pieces = [(i, at) for i in range(len(files)) for at in range(0, size, 16 << 20)]

    def read_piece(piece) -> None:
        i, at = piece
        fd = os.open(files[i], os.O_RDONLY)
        end = min(size, at + (16 << 20))
        os.preadv(fd, [memoryview(reused)[i * size + at:i * size + end]], at)
        os.close(fd)

    out = {"raw_read_fresh_gbps": gbps(nbytes, best(
               lambda: read_into(np.empty(size * len(files), np.uint8)), runs)),
           "raw_read_reused_gbps": gbps(nbytes, best(lambda: read_into(reused), runs))}
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        out["raw_read_parallel_gbps"] = gbps(nbytes, best(
            lambda: list(pool.map(read_piece, pieces)), runs))
    return out


def _daemon(path: str):
    """`tqstore serve` in its own process on loopback TCP (no GIL shared with the client)."""
    from tqstore.client import KvStoreClient
    from tqstore.servers import ServerProcess, free_port, tqstore_argv

    address = f"127.0.0.1:{free_port()}"
    proc = ServerProcess("daemon", tqstore_argv("serve", "--path", path, "--listen", address,
                                                "--max-gib", "8"), os.path.join(path, "daemon.log"))
    with KvStoreClient(address) as probe:
        proc.wait_ready(lambda: probe.is_serving(timeout=1), 120)
    return proc, address


def _concurrency(address: str, ns, ids, blocks: int, clients: int, seconds: float,
                 direct: bool) -> dict:
    one = _throughput(address, ns, ids, blocks, 1, seconds, direct)
    many = _throughput(address, ns, ids, blocks, clients, seconds, direct)
    return {"path": "same-host reads" if direct else "gRPC over TCP", "prompt_tokens": len(ids),
            "blocks_per_request": blocks, "single": one, "concurrent": many,
            "throughput_ratio": many["fp16_gb_per_s"] / one["fp16_gb_per_s"]}


def run(args: argparse.Namespace) -> int:
    from tqstore.client import KvStoreClient
    from tqstore.generator import CachedGenerator
    from tqstore.models.smollm2 import load_smollm2

    loaded = load_smollm2()
    corpus = _corpus_ids(loaded.tokenizer, max(args.sizes))
    rows = []
    moved, concurrency = {}, []
    for size in args.sizes:
        ids = corpus[:size]
        path = tempfile.mkdtemp(prefix="tqstore-bench-hit-")
        daemon, address = _daemon(path)
        try:
            with KvStoreClient(address) as client:
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
                ns, blocks = generator.namespace, hit.hit_tokens // generator.block_size
                moved = transport(address, ns, ids, blocks, path)
                if not args.json:
                    print(f"fetch of {blocks} blocks ({moved['bytes'] / 1e6:.0f} MB): same-host "
                          f"{moved['direct_gbps']:.2f} GB/s = {moved['direct_over_raw_fresh']:.2f}x "
                          f"a raw read into fresh memory ({moved['raw_read_fresh_gbps']:.2f}), "
                          f"{moved['direct_over_raw_reused']:.2f}x into a reused buffer "
                          f"({moved['raw_read_reused_gbps']:.2f}); gRPC "
                          f"{moved['grpc_1_stream_gbps']:.2f} / {moved['grpc_4_streams_gbps']:.2f} "
                          f"GB/s (1 / 4 streams); into MLX {moved['to_device_gbps']:.2f} GB/s; "
                          f"fetch and restore {moved['fetch_and_restore_gbps']:.2f} GB/s",
                          flush=True)
                for direct in (True, False):
                    c = _concurrency(address, ns, ids, blocks, args.clients, args.seconds, direct)
                    concurrency.append(c)
                    if not args.json:
                        print(f"Lookup+Fetch, {c['path']}, {blocks} blocks: 1 client "
                              f"{c['single']['fp16_gb_per_s']:.2f} GB/s; "
                              f"{c['concurrent']['clients']} clients "
                              f"{c['concurrent']['fp16_gb_per_s']:.2f} GB/s "
                              f"({c['throughput_ratio']:.2f}x)", flush=True)
        finally:
            daemon.stop(grace=10)
    report = {"machine": f"{platform.machine()}, {platform.node()}, {os.cpu_count()} cores",
              "model": "SmolLM2-135M-Instruct fp32", "rows": rows, "transport": moved,
              "concurrency": concurrency}
    if args.json:
        print(json.dumps(report, indent=1))
    return 0
