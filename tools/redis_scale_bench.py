"""What one Redis node, and a 3-master cluster, serve to many readers: the figures docs/SCALE.md
computes from. Same run, same blocks: C reader processes (C in --clients) each read every block
of the set again and again for --seconds, through the remote tier's verified read
(`RedisTier.get_blocks`, streamed) and, as the baseline, raw GETs of the same keys. Aggregate
GB/s per C, and the tier's ratio to raw at each C.

    python3 tools/redis_scale_bench.py [--clients 1 2 4 8] [--seconds 5] [--blocks 32]

Starts its own redis-server processes on free loopback ports (no persistence). Blocks are
random, SmolLM2-shaped (30 layers x 3 KV heads x 256 tokens x 64: 5.9 MB, two parts).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from tqstore.prefix_hash import Namespace  # noqa: E402

NS = Namespace("bench-scale", num_layers=30, num_kv_heads=3, head_dim=64, block_size=256)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(folder: Path, cluster: bool) -> tuple[list[subprocess.Popen], str]:
    import redis

    ports = [_free_port() for _ in range(3 if cluster else 1)]
    procs = []
    for port in ports:
        d = folder / str(port)
        d.mkdir(parents=True)
        extra = ["--cluster-enabled", "yes", "--cluster-port", str(_free_port()),
                 "--cluster-config-file", "nodes.conf"] if cluster else []
        procs.append(subprocess.Popen(
            [shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--dir", str(d), "--maxmemory", "8gb",
             "--maxmemory-policy", "allkeys-lru", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    for port in ports:
        for _ in range(200):
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
    if not cluster:
        return procs, f"redis://127.0.0.1:{ports[0]}"
    subprocess.run([shutil.which("redis-cli"), "--cluster", "create",
                    *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
                   check=True, capture_output=True)
    for _ in range(200):
        if all(b"cluster_state:ok" in redis.Redis(port=p).execute_command("CLUSTER", "INFO")
               for p in ports):
            break
        time.sleep(0.05)
    time.sleep(1.0)
    return procs, "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)


def _chain(blocks: int):
    from tqstore.ssd.chain import chain_hashes, token_array

    tokens = token_array(np.arange(blocks * NS.block_size) % 49152)
    return tokens, chain_hashes(NS, tokens)


def _reader(url: str, blocks: int, raw: bool, start_at: float, stop_at: float, out) -> None:
    from tqstore.config import RemoteConfig
    from tqstore.remote.redis_tier import RedisTier
    from tqstore.remote.value_format import block_keys

    tokens, hashes = _chain(blocks)
    tier = RedisTier(RemoteConfig(url=url))
    assert tier.connect(10.0)
    _, _, client = tier.conn.clients()  # the tier's own data connection: same settings for both
    keys = [k for h in hashes for k in block_keys(NS, h)]
    time.sleep(max(0.0, start_at - time.time()))
    moved = 0
    while time.time() < stop_at:
        if raw:
            for k in keys:
                moved += len(client.get(k))
        else:
            for _, p in tier.get_blocks(NS, hashes, tokens, 0, blocks):
                moved += p.keys.nbytes + p.values.nbytes
    tier.close(0)
    out.put(moved)


def _aggregate(url: str, blocks: int, clients: int, seconds: float, raw: bool) -> float:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 2.0
    procs = [ctx.Process(target=_reader, args=(url, blocks, raw, start_at, start_at + seconds, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    moved = sum(out.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    return moved / seconds / 1e9


def _upload(url: str, blocks: int) -> None:
    from tqstore.blocks import BlockPayload
    from tqstore.config import RemoteConfig
    from tqstore.remote.redis_tier import RedisTier, UploadJob

    tokens, hashes = _chain(blocks)
    rng = np.random.default_rng(0)
    shape = (NS.num_layers, NS.num_kv_heads, NS.block_size, NS.head_dim)
    payloads = [BlockPayload(rng.standard_normal(shape).astype(np.float16),
                             rng.standard_normal(shape).astype(np.float16)) for _ in range(blocks)]
    tier = RedisTier(RemoteConfig(url=url))
    tier.upload(UploadJob(NS, hashes, tokens, 0, payloads))
    assert tier.wait_uploads(600)
    assert tier.stats().get("uploaded_blocks") == blocks, tier.stats()
    tier.close(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for cluster in (False, True):
        folder = Path(tempfile.mkdtemp(prefix="tqstore-redis-scale-"))
        procs, url = _start(folder, cluster)
        try:
            _upload(url, args.blocks)
            for c in args.clients:
                raw = _aggregate(url, args.blocks, c, args.seconds, raw=True)
                tier = _aggregate(url, args.blocks, c, args.seconds, raw=False)
                row = {"redis": "3-master cluster" if cluster else "one node", "clients": c,
                       "raw_get_gbps": raw, "tier_gbps": tier, "tier_over_raw": tier / raw}
                rows.append(row)
                if not args.json:
                    print(f"{row['redis']:>16}, {c:>2} readers: raw GETs {raw:6.2f} GB/s, tier "
                          f"{tier:6.2f} GB/s ({tier / raw:.2f}x)", flush=True)
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
            shutil.rmtree(folder, ignore_errors=True)
    report = {"machine": f"{platform.machine()}, {platform.node()}, {os.cpu_count()} cores",
              "block_bytes": 4 * NS.num_layers * NS.num_kv_heads * NS.block_size * NS.head_dim,
              "blocks": args.blocks, "seconds": args.seconds, "rows": rows}
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
