"""Load on a real daemon: N client processes mix Lookup / Fetch (fp16) / Put for T seconds on
one `tqstore serve` over loopback; every fetched byte is verified (tqstore/reliability/load.py).

    python tools/daemon_load.py [--clients 32] [--seconds 60] [--seed 0] [--path DIR]

Prints a table and a JSON summary: p50/p99 per call, calls/s, MB/s, errors by status code,
lost/short/wrong blocks, the daemon's RSS (start, peak, end). Exit 0 only when no call failed,
no byte was wrong, the daemon exited 0 on SIGTERM and `tqstore check` found the store clean.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile

import tqstore  # noqa: F401  (entry point convention)
from tqstore.reliability.load import format_table, run_load


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--path", default=None, help="parent directory of the run's store")
    p.add_argument("--max-gib", type=float, default=16.0,
                   help="the daemon's store budget (above what a run writes: nothing is evicted)")
    p.add_argument("--keep", action="store_true", help="keep the store and the daemon's log")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="tqstore-load-", dir=args.path)
    try:
        summary = run_load(root, clients=args.clients, seconds=args.seconds, seed=args.seed,
                           max_gib=args.max_gib)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(format_table(summary))
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
