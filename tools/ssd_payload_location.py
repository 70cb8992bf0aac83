"""Where should block payloads live: LMDB values or one file per block? A brief measurement.

    python tools/ssd_payload_location.py [--blocks 32] [--mb 5.9]

Writes the same blocks (a) as LMDB values in one writemap txn per batch of 8, (b) as fsynced
files (temp + rename, directory fsync per batch), then reads them back cold and warm (LMDB via
a zero-copy buffer copied out, files via preadv into one buffer). Prints GB/s and LMDB file size
vs live data after deleting half the blocks and rewriting them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import lmdb
import numpy as np

import tqstore  # noqa: F401


def _drop() -> None:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--mb", type=float, default=5.9)
    args = p.parse_args()
    size = int(args.mb * 1e6)
    data = [np.random.default_rng(i).integers(0, 255, size, dtype=np.uint8) for i in range(4)]
    keys = [os.urandom(32) for _ in range(args.blocks)]
    total = size * args.blocks
    root = tempfile.mkdtemp()
    env = lmdb.open(f"{root}/lmdb", map_size=1 << 34, writemap=True)
    t = time.perf_counter()
    for i in range(0, args.blocks, 8):
        with env.begin(write=True) as txn:
            for j in range(i, min(i + 8, args.blocks)):
                txn.put(keys[j], data[j % 4])
    lw = time.perf_counter() - t
    os.makedirs(f"{root}/files")
    t = time.perf_counter()
    for i in range(0, args.blocks, 8):
        for j in range(i, min(i + 8, args.blocks)):
            fd = os.open(f"{root}/files/{j}.tmp", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, data[j % 4])
            os.fsync(fd)
            os.close(fd)
            os.rename(f"{root}/files/{j}.tmp", f"{root}/files/{j}")
        dfd = os.open(f"{root}/files", os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    fw = time.perf_counter() - t
    print(f"write  lmdb(writemap) {total / lw / 1e9:.2f} GB/s   files {total / fw / 1e9:.2f} GB/s")
    for mode in ("cold", "warm"):
        if mode == "cold":
            _drop()
        t = time.perf_counter()
        with env.begin(buffers=True) as txn:
            for k in keys:
                np.frombuffer(txn.get(k), np.uint8).copy()
        lr = time.perf_counter() - t
        if mode == "cold":
            _drop()
        t = time.perf_counter()
        for j in range(args.blocks):
            buf = np.empty(size, np.uint8)
            fd = os.open(f"{root}/files/{j}", os.O_RDONLY)
            os.preadv(fd, [buf], 0)
            os.close(fd)
        fr = time.perf_counter() - t
        print(f"read {mode:4} lmdb {total / lr / 1e9:.2f} GB/s   files {total / fr / 1e9:.2f} GB/s")
    for _ in range(3):  # churn: delete and rewrite half, as eviction + puts would
        with env.begin(write=True) as txn:
            for k in keys[::2]:
                txn.delete(k)
        for k in keys[::2]:
            with env.begin(write=True) as txn:
                txn.put(k, data[0])
    used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    print(f"lmdb pages in use after churn: {used / total:.2f}x live data (files: 1.00x)")
    env.close()
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
