"""Crash soak of the SSD tier: kill a writer with SIGKILL many times at random moments during
puts; after each kill, reopen and verify (see tqstore/ssd/soak.py for what is asserted).

    python tools/ssd_crash_soak.py --iterations 200 [--path DIR] [--seed N] [--max-run-s 0.5]

Exit status 0 when no acknowledged block was lost or torn and check stayed clean.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile

import tqstore  # noqa: F401  (entry point convention)
from tqstore.ssd.soak import run_soak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--path", default=None, help="parent directory for the soak store")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-run-s", type=float, default=0.5, help="a writer lives 0..this many seconds")
    p.add_argument("--sample-old", type=int, default=200, help="older acked blocks re-verified per kill")
    p.add_argument("--check-every", type=int, default=10, help="full check every N kills")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="tqstore-soak-", dir=args.path)
    try:
        res = run_soak(f"{root}/store", args.iterations, seed=args.seed, max_run_s=args.max_run_s,
                       deep_check_every=args.check_every, sample_old=args.sample_old)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"iterations": res.iterations, "acked_blocks": res.acked_blocks,
                      "verified_reads": res.verified_blocks, "orphans_removed": res.orphans_removed,
                      "failures": res.failures[:20], "n_failures": len(res.failures),
                      "seconds": round(res.seconds, 1)}, indent=2))
    return 0 if not res.failures else 1


if __name__ == "__main__":
    sys.exit(main())
