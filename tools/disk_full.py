"""Disk-full run of the SSD store on a real small tmpfs: fill until puts fail, then verify
(see tqstore/ssd/diskfull.py): every failure is ResourceExhausted, no temp file remains, every
acknowledged block reads back bitwise, check is clean, puts work again after freeing space and
after evict(), close() is clean on a full disk, a reopen sees every block.

    python tools/disk_full.py [--sizes-mb 4 8 16] [--ballast-kb 1024]   (needs root for mount)

Exit status 0 when every size passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time

import tqstore  # noqa: F401  (entry point convention)
from tqstore.ssd.diskfull import run_disk_full


def _one(size_mb: int, ballast: int) -> dict:
    mnt = tempfile.mkdtemp(prefix="tqstore-diskfull-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", mnt],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return {"size_mb": size_mb, "ok": False, "error": f"mount failed: {r.stderr.strip()}"}
    t0 = time.perf_counter()
    try:
        rep = run_disk_full(mnt, ballast_bytes=ballast)
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)
    return {"size_mb": size_mb, "ok": rep.ok, **dataclasses.asdict(rep),
            "seconds": round(time.perf_counter() - t0, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--ballast-kb", type=int, default=1024)
    args = p.parse_args()
    runs = [_one(mb, args.ballast_kb << 10) for mb in args.sizes_mb]
    print(json.dumps(runs, indent=2))
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
