"""Damage soak of the SSD store: seeded rounds of one damage each (a file of the store x flip
random bytes / zero a range / truncate / delete, or the whole index dir deleted), then readonly
`check` and a writer open + lookup/get of every chain + check(+repair), each in a child process
(see tqstore/ssd/damage.py for what is asserted).

    python tools/store_damage.py --rounds 100 [--seed N] [--families 8] [--chain 8] [--path DIR]
                                 [--targets data.mdb lock.mdb payload store.id writer.lock index/]

Exit status 0 when no round crashed (signal or traceback), no wrong byte was served, every
block with untouched files stayed served (bar counted quarantines) and check ended clean.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

import tqstore  # noqa: F401  (entry point convention)
from tqstore.ssd.damage import TARGETS, run_damage


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--families", type=int, default=8, help="prompt chains in the base store")
    p.add_argument("--chain", type=int, default=8, help="blocks per chain")
    p.add_argument("--path", default=None, help="parent directory for the work stores")
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                   help="files damaged (one picked per round)")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="tqstore-damage-", dir=args.path)
    t0 = time.perf_counter()
    try:
        r = run_damage(root, args.rounds, args.seed, args.families, args.chain,
                       targets=tuple(args.targets))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({
        "rounds": r.rounds, "by_target_kind": dict(sorted(r.by_target_kind.items())),
        "index_rebuilds": r.rebuilds, "recovered_blocks": r.recovered, "lost_blocks": r.lost,
        "lost_with_intact_files": r.lost_with_intact_files,
                      "healed_records": r.healed,
        "rounds_losing_intact_files": r.rounds_losing_intact_files[:20],
        "wrong_bytes_served": r.wrong_bytes_served,
        "crashes": r.crashes, "failures": r.failures[:20], "n_failures": len(r.failures),
        "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
