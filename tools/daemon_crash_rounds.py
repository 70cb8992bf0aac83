"""Crash rounds on a real daemon: writer processes Put chains while `tqstore serve` is SIGKILLed
at a random moment; after each restart every acknowledged block must be found and fetch bitwise
right, no partial block may be visible, and `tqstore check` must pass once the daemon stopped
(tqstore/reliability/crash_rounds.py).

    python tools/daemon_crash_rounds.py [--rounds 20] [--writers 4] [--seed 0] [--max-run-s 2]

Exit status 0 only when nothing acknowledged was lost, no byte was wrong, every SIGTERM exit was
0 and every check clean.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile

import tqstore  # noqa: F401  (entry point convention)
from tqstore.reliability.crash_rounds import run_crash_rounds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-run-s", type=float, default=2.0,
                   help="the daemon is killed 0.05..this many seconds after the writers start")
    p.add_argument("--path", default=None, help="parent directory of the run's store")
    p.add_argument("--keep", action="store_true", help="keep the store and the daemon's log")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="tqstore-crash-", dir=args.path)
    try:
        res = run_crash_rounds(root, rounds=args.rounds, writers=args.writers, seed=args.seed,
                               max_run_s=args.max_run_s)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    out = dataclasses.asdict(res)
    out["failures"] = res.failures[:20]
    out["seconds"] = round(res.seconds, 1)
    out["ok"] = not res.failures and res.lost == 0 and res.wrong == 0
    print(f"{res.rounds} rounds, {res.acked_blocks} acknowledged blocks, lost {res.lost}, wrong "
          f"{res.wrong}, {res.unacked_visible} unacknowledged blocks visible (whole), "
          f"{res.verified_blocks} block reads verified, {out['seconds']} s")
    print(json.dumps(out, indent=2))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
