"""Same-host reads alone (issue 16): the reader's C loop against its Python loop and raw reads.

A real daemon (`tqstore serve` in its own process, loopback TCP) stores synthetic fp16 blocks
of a model shape (random values, random token ids: no model runs). Then, in one process and
alternating, best of --best each, GB/s of:
  C / python   KvStoreClient.fetch_fp16_prefix over the same-host reader (Locate, then pread
               into fresh memory and XXH3 of every chunk) with tq_read.c's loop, or Python's
  C reused     Locate and the reader's C loop into a PrefixKV already faulted in (what a
               fetch into CUDA's pinned staging buffer does)
  raw fresh    the same payload files preadv'd one after the other into a new buffer
  raw reused   the same into a buffer already faulted in
  raw parallel the same files in 16 MiB pieces on one thread per core (at most 16)
  restore      the fetch and then the restore's MLX arrays of K and V, evaluated
               (device_memory.host_to_device), as a generator's hit does: `staged` reads
               where the restore takes the bytes from (on unified memory MLX's own arrays: no
               second copy; on CUDA the pinned staging buffer, then the copy kernel), `numpy`
               reads into fresh numpy memory first (then mx.array; cudaMemcpy on CUDA)
Issue 16's goal: same-host restore >= 0.7x of a raw read of the same bytes from page cache.

  python3 tools/read_path_bench.py                          # SmolLM2's shape, 31 blocks
  python3 tools/read_path_bench.py --shape llama3-8b --blocks 4 --block 2048   # the GPU host
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tqstore import direct_read  # noqa: E402  (first: tqstore preloads BLAS before mlx)
import mlx.core as mx  # noqa: E402
from tqstore.bench.hit import _daemon, best, gbps, raw_reads  # noqa: E402
from tqstore.blocks import BlockPayload, PrefixKV  # noqa: E402
from tqstore.client import KvStoreClient  # noqa: E402
from tqstore.config import ClientConfig  # noqa: E402
from tqstore.device_memory import host_to_device  # noqa: E402
from tqstore.native.read_verify import available  # noqa: E402
from tqstore.payload_format import file_name  # noqa: E402
from tqstore.prefix_hash import Namespace, hash_prefix_blocks  # noqa: E402

SHAPES = {"smollm2": (30, 3, 64), "llama3-8b": (32, 8, 128)}  # layers, kv heads, head_dim


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--blocks", type=int, default=31)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--best", type=int, default=5)
    p.add_argument("--json", metavar="PATH", help="also write the figures here as JSON")
    args = p.parse_args()
    layers, heads, dim = SHAPES[args.shape]
    ns = Namespace(f"read-path-bench-{args.shape}", layers, heads, dim, args.block)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, args.blocks * args.block).tolist()
    path = tempfile.mkdtemp(prefix="tqstore-read-path-")
    daemon, address = _daemon(path)
    rows: dict[str, list[float]] = {}
    try:
        with KvStoreClient(address) as client:
            for i in range(args.blocks):  # one block per Put: bounded memory here
                shape = (layers, heads, args.block, dim)
                block = BlockPayload(rng.standard_normal(shape).astype(np.float16),
                                     rng.standard_normal(shape).astype(np.float16))
                client.put(ns, ids[:(i + 1) * args.block], i, [block])
        nbytes = args.blocks * 4 * layers * heads * args.block * dim
        hashes = hash_prefix_blocks(ns, ids)
        files = [os.path.join(path, "blocks", file_name(h)) for h in hashes]
        with KvStoreClient(ClientConfig(address, direct_reads="on")) as client:
            assert client.fetch_fp16_prefix(ns, ids, 0, args.blocks).source == "direct"
            faulted = PrefixKV.empty((layers, heads, args.block, dim), args.blocks)
            faulted.keys.fill(0)
            faulted.values.fill(0)

            def read_reused() -> None:
                located = client._locate(ns, ids, 0, args.blocks)
                assert client._reader.read(located, hashes, faulted, 0) == args.blocks

            for _ in range(args.rounds):
                for label, native in (("C", True), ("python", False)):
                    direct_read.NATIVE_READS = native
                    seconds = best(lambda: client.fetch_fp16_prefix(ns, ids, 0, args.blocks),
                                   args.best)
                    rows.setdefault(label, []).append(gbps(nbytes, seconds))
                direct_read.NATIVE_READS = True
                rows.setdefault("C reused", []).append(gbps(nbytes, best(read_reused, args.best)))
                for label, staged in (("restore staged", True), ("restore numpy", False)):
                    rows.setdefault(label, []).append(gbps(nbytes, best(
                        lambda: restore(client.fetch_fp16_prefix(ns, ids, 0, args.blocks,
                                                                 staged=staged)), args.best)))
                raw = raw_reads(files, nbytes, args.best)
                for label in ("fresh", "reused", "parallel"):
                    rows.setdefault(f"raw {label}", []).append(raw[f"raw_read_{label}_gbps"])
    finally:
        direct_read.NATIVE_READS = True
        daemon.stop()
        shutil.rmtree(path, ignore_errors=True)
    out = {"shape": args.shape, "block": args.block, "blocks": args.blocks, "bytes": nbytes,
           "cores": os.cpu_count(), "c_loop_available": available(),
           "gbps": {k: [float(f"{x:.3g}") for x in v] for k, v in rows.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    print(f"{args.shape}, {args.blocks} blocks of {args.block} tokens ({nbytes / 1e6:.0f} MB), "
          f"{os.cpu_count()} cores, C loop available: {out['c_loop_available']}")
    for label, values in out["gbps"].items():
        print(f"  {label:<15} " + "  ".join(f"{v:6.2f}" for v in values) + "  GB/s")
    for label in ("C", "python", "C reused", "restore staged", "restore numpy"):
        r = [a / b for a, b in zip(rows[label], rows["raw fresh"])]
        q = [a / b for a, b in zip(rows[label], rows["raw parallel"])]
        print(f"  {label} / raw fresh: " + " ".join(f"{x:.2f}" for x in r)
              + f"   / raw parallel: " + " ".join(f"{x:.2f}" for x in q))
    return 0


def restore(prefix: PrefixKV) -> None:
    """What a generator's restore makes of a fetch: MLX arrays of K and V, evaluated."""
    keys, values = host_to_device(prefix.keys), host_to_device(prefix.values)
    mx.eval(keys, values)


if __name__ == "__main__":
    sys.exit(main())
