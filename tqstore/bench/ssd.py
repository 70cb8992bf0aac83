"""`tqstore bench ssd`: SSD tier throughput against raw file I/O of the same bytes on the same
disk in the same run, lookup latency of a long prompt against a large index, and the cost and
ratio of zstd on the payload.

Write: put_blocks in batches (payload fsynced, index committed) vs one sequential file of the same
bytes written and fsynced in the same batch sizes. Read: get_block of every block (verified) vs a
sequential read of that file into a reused buffer, cold (page cache dropped, where permitted) and
warm. Lookup: a store index of --lookup-blocks blocks (records inserted directly: lookup never
reads payload files), a prompt of --lookup-tokens tokens, all of whose blocks are present; p50/p99
of lookup(token_ids) and of its index part lookup_hashes(hashes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import zlib

import numpy as np
import zstandard

from tqstore.blocks import BlockPayload
from tqstore.prefix_hash import Namespace
from tqstore.ssd.chain import chain_hashes, token_array
from tqstore.config import GiB, StoreConfig
from tqstore.ssd.payload import allocated, body_checksum
from tqstore.ssd.records import BlockRecord


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", default=None, help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--blocks", type=int, default=64, help="blocks written and read (default 64)")
    parser.add_argument("--batch", type=int, default=8, help="blocks per put_blocks call")
    parser.add_argument("--layers", type=int, default=30, help="KV layout (default SmolLM2-135M: 30 x 3 x 64)")
    parser.add_argument("--kv-heads", type=int, default=3, help="KV heads per layer (default 3)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension (default 64)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per block")
    parser.add_argument("--lookup-blocks", type=int, default=100_000, help="index size for the lookup test")
    parser.add_argument("--lookup-tokens", type=int, default=131_072, help="prompt length for the lookup test")
    parser.add_argument("--lookup-reps", type=int, default=300,
                        help="timed lookups for the p50/p99 (default 300)")
    parser.add_argument("--compression", default="none", choices=["none", "zstd", "zstd-planes"],
                        help="payload compression of the store under test (default none)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def kv_like(rng: np.random.Generator, shape: tuple[int, int, int, int], keys: bool) -> np.ndarray:
    """Synthetic KV with the structure real KV has: a large per-(layer, head) mean direction
    (about 39% of key energy in SmolLM2, shared/notes/quality.md), a few outlier channels, and
    RoPE-like smoothness along tokens in half of the dims. Not a substitute for real KV: the
    compression figure that matters is the measured SmolLM2 one, quoted next to this."""
    layers, heads, tokens, dim = shape
    mean = rng.standard_normal((layers, heads, 1, dim)) * (1.0 if keys else 0.2)
    scale = np.ones(dim)
    scale[rng.choice(dim, max(1, dim // 16), replace=False)] = 8.0
    x = rng.standard_normal(shape) * scale * 0.8 + mean
    t = np.arange(tokens)[:, None]
    freqs = 1.0 / (10000 ** (np.arange(dim // 2) / (dim // 2)))
    x[..., : dim // 2] += np.cos(t * freqs) * 0.5
    return x.astype(np.float16)


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def _throughput(root: str, ns: Namespace, payloads: list[BlockPayload], batch: int,
                compression: str) -> dict:
    from tqstore.ssd.store import BlockStore

    n = len(payloads)
    rng = np.random.default_rng(1)
    toks = token_array(rng.integers(0, 49152, n * ns.block_size))
    logical = sum(p.keys.nbytes + p.values.nbytes for p in payloads)
    # Raw baseline: the same bytes, one sequential file, fsynced at the same batch boundaries.
    raw_path = os.path.join(root, "raw.bin")
    t = time.perf_counter()
    fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for i in range(0, n, batch):
        os.writev(fd, [memoryview(a).cast("B") for p in payloads[i:i + batch] for a in (p.keys, p.values)])
        os.fsync(fd)
    os.close(fd)
    raw_write = time.perf_counter() - t
    store_path = os.path.join(root, "store")
    cfg = StoreConfig(max_bytes=64 * GiB, compression=compression)
    with BlockStore(store_path, cfg) as store:
        t = time.perf_counter()
        for i in range(0, n, batch):
            store.put_blocks(ns, toks, i, payloads[i:i + batch])
        store_write = time.perf_counter() - t
        on_disk = store.stats().payload_bytes
    out = {"blocks": n, "block_bytes": logical // n, "logical_bytes": logical,
           "stored_bytes": on_disk, "raw_write_gbps": _gbps(logical, raw_write),
           "store_write_gbps": _gbps(logical, store_write)}
    out["write_ratio"] = out["store_write_gbps"] / out["raw_write_gbps"]
    buf = np.empty(logical // n, dtype=np.uint8)
    for mode in ("cold", "warm"):
        dropped = _drop_caches() if mode == "cold" else True
        t = time.perf_counter()
        with open(raw_path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        raw_read = time.perf_counter() - t
        if mode == "cold":
            _drop_caches()
        with BlockStore(store_path, cfg, readonly=True) as store:
            t = time.perf_counter()
            for i in range(n):
                store.get_block(ns, toks, i)
            store_read = time.perf_counter() - t
        out[f"raw_read_{mode}_gbps"] = _gbps(logical, raw_read)
        out[f"store_read_{mode}_gbps"] = _gbps(logical, store_read)
        out[f"read_{mode}_ratio"] = raw_read / store_read
        out[f"{mode}_cache_dropped"] = dropped
    return out


def _lookup_latency(root: str, ns: Namespace, n_blocks: int, prompt_tokens: int, reps: int) -> dict:
    from tqstore.ssd.index import Index
    from tqstore.ssd.store import BlockStore

    rng = np.random.default_rng(2)
    bs = ns.block_size
    path = os.path.join(root, "lookup")
    os.makedirs(os.path.join(path, "blocks"), exist_ok=True)
    prompt = token_array(rng.integers(0, 49152, prompt_tokens))
    chains = [prompt] + [token_array(rng.integers(0, 49152, prompt_tokens))
                         for _ in range(max(0, -(-n_blocks // (prompt_tokens // bs)) - 1))]
    idx = Index.open(os.path.join(path, "index"), 16 * GiB, readonly=False)
    root_hash = ns.root_hash()
    inserted = 0
    with idx.env.begin(write=True) as txn:
        for toks in chains:
            hashes = chain_hashes(ns, toks)
            for i, h in enumerate(hashes):
                if inserted >= n_blocks:
                    break
                rec = BlockRecord(ns=root_hash, parent=hashes[i - 1] if i else root_hash, index=i,
                                  tokens=toks[i * bs:(i + 1) * bs].tobytes(), n_tokens=bs,
                                  layout=(ns.num_layers, ns.num_kv_heads, bs, ns.head_dim),
                                  dtype="float16", format_version=ns.format_version,
                                  compression="none", raw_size=0, stored_size=0, file_size=64,
                                  chunks=[], created=inserted, access=inserted)
                idx.insert(txn, h, rec)
                inserted += 1
    idx.env.close()
    full, idx_only, miss = [], [], []
    other = token_array(rng.integers(0, 49152, prompt_tokens))
    with BlockStore(path, readonly=True) as store:
        hashes = chain_hashes(ns, prompt)
        assert store.lookup(ns, prompt) == len(hashes)
        for _ in range(reps):
            t = time.perf_counter()
            store.lookup(ns, prompt)
            full.append(time.perf_counter() - t)
            t = time.perf_counter()
            store.lookup_hashes(ns, hashes)
            idx_only.append(time.perf_counter() - t)
            t = time.perf_counter()
            store.lookup(ns, other)
            miss.append(time.perf_counter() - t)
        as_list = prompt.tolist()
        t = time.perf_counter()
        store.lookup(ns, as_list)
        list_ms = (time.perf_counter() - t) * 1e3

    def pct(xs: list[float]) -> dict:
        return {"p50_ms": float(np.percentile(xs, 50) * 1e3), "p99_ms": float(np.percentile(xs, 99) * 1e3)}

    return {"index_blocks": inserted, "prompt_tokens": prompt_tokens, "prompt_blocks": len(hashes),
            "full_hit": pct(full), "index_only": pct(idx_only), "miss": pct(miss),
            "full_hit_python_list_ms": list_ms}


def _compression(payloads: list[BlockPayload], level: int = 1) -> dict:
    raw = np.concatenate([np.concatenate([p.keys.reshape(-1), p.values.reshape(-1)]) for p in payloads[:8]])
    u16 = raw.view(np.uint16)
    planes = np.concatenate([(u16 >> 8).astype(np.uint8), (u16 & 0xFF).astype(np.uint8)])
    out = {}
    for name, data in (("zstd", memoryview(u16).cast("B")), ("zstd-planes", memoryview(planes))):
        t = time.perf_counter()
        comp = zstandard.ZstdCompressor(level=level).compress(data)
        c_s = time.perf_counter() - t
        t = time.perf_counter()
        zstandard.ZstdDecompressor().decompress(comp)
        d_s = time.perf_counter() - t
        out[name] = {"ratio": raw.nbytes / len(comp), "compress_gbps": _gbps(raw.nbytes, c_s),
                     "decompress_gbps": _gbps(raw.nbytes, d_s)}
    t = time.perf_counter()
    zlib.crc32(memoryview(u16).cast("B"))
    out["crc32_gbps"] = _gbps(raw.nbytes, time.perf_counter() - t)
    t = time.perf_counter()
    body_checksum(memoryview(u16).cast("B"))
    out["xxh3_gbps"] = _gbps(raw.nbytes, time.perf_counter() - t)
    out["note"] = "synthetic KV-like data; measured on real SmolLM2 KV (shared/notes/quality.md): 1.09x raw, 1.18x planes"
    return out


def run_bench(args: argparse.Namespace) -> dict:
    ns = Namespace("bench-model", args.layers, args.kv_heads, args.head_dim, args.block_size)
    shape = (args.layers, args.kv_heads, args.block_size, args.head_dim)
    rng = np.random.default_rng(0)
    base = [BlockPayload(kv_like(rng, shape, True), kv_like(rng, shape, False)) for _ in range(4)]
    # Distinct bytes per block without generating each: roll the base blocks.
    payloads = [BlockPayload(np.roll(base[i % 4].keys, i, axis=2), np.roll(base[i % 4].values, i, axis=2))
                for i in range(args.blocks)]
    root = tempfile.mkdtemp(prefix="tqstore-bench-ssd-", dir=args.path)
    try:
        result = {"machine": f"{os.cpu_count()} cores", "path": root,
                  "throughput": _throughput(root, ns, payloads, args.batch, args.compression),
                  "compression": _compression(payloads),
                  "lookup": _lookup_latency(root, ns, args.lookup_blocks, args.lookup_tokens, args.lookup_reps)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def format_table(r: dict) -> str:
    t, lk, c = r["throughput"], r["lookup"], r["compression"]
    mb = t["block_bytes"] / 1e6
    lines = [
        f"SSD tier, {t['blocks']} blocks of {mb:.2f} MB fp16 ({t['logical_bytes'] / 1e9:.2f} GB), {r['machine']}",
        f"{'':22}{'store GB/s':>11}{'raw GB/s':>10}{'ratio':>8}",
        f"{'write (fsynced)':22}{t['store_write_gbps']:>11.2f}{t['raw_write_gbps']:>10.2f}{t['write_ratio']:>8.2f}",
        f"{'read cold':22}{t['store_read_cold_gbps']:>11.2f}{t['raw_read_cold_gbps']:>10.2f}{t['read_cold_ratio']:>8.2f}"
        + ("" if t["cold_cache_dropped"] else "  (page cache NOT dropped)"),
        f"{'read warm':22}{t['store_read_warm_gbps']:>11.2f}{t['raw_read_warm_gbps']:>10.2f}{t['read_warm_ratio']:>8.2f}",
        f"lookup, {lk['prompt_tokens']} tokens ({lk['prompt_blocks']} blocks) in an index of {lk['index_blocks']} blocks:",
        f"  full hit   p50 {lk['full_hit']['p50_ms']:.3f} ms  p99 {lk['full_hit']['p99_ms']:.3f} ms  (incl. SHA-256 chain)",
        f"  index only p50 {lk['index_only']['p50_ms']:.3f} ms  p99 {lk['index_only']['p99_ms']:.3f} ms  (pre-hashed chain)",
        f"  miss       p50 {lk['miss']['p50_ms']:.3f} ms  p99 {lk['miss']['p99_ms']:.3f} ms;"
        f"  token ids as a Python list: {lk['full_hit_python_list_ms']:.2f} ms",
        f"zstd-1 (synthetic KV): raw {c['zstd']['ratio']:.3f}x at {c['zstd']['compress_gbps']:.2f}/"
        f"{c['zstd']['decompress_gbps']:.2f} GB/s (comp/decomp); planes {c['zstd-planes']['ratio']:.3f}x at "
        f"{c['zstd-planes']['compress_gbps']:.2f}/{c['zstd-planes']['decompress_gbps']:.2f} GB/s; crc32 {c['crc32_gbps']:.2f} GB/s, xxh3 (used) {c['xxh3_gbps']:.2f} GB/s",
        f"  ({c['note']})",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = run_bench(args)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
