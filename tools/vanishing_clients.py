"""Vanishing clients on a real daemon: client processes SIGKILLed mid-Put and mid-Fetch and
calls cancelled in flight, round after round; the daemon must keep serving, show no partial
Put, lose nothing acknowledged, return to its baseline open fds and keep its RSS under a cap
(tqstore/reliability/vanishing.py).

    python tools/vanishing_clients.py [--rounds 50] [--concurrent 4] [--seed 0]

Exit status 0 only when all of that held.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile

import tqstore  # noqa: F401  (entry point convention)
from tqstore.reliability.vanishing import run_vanishing


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--concurrent", type=int, default=4, help="victims per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-delay-s", type=float, default=1.0,
                   help="victims are killed 0.1..this many seconds after they start")
    p.add_argument("--rss-cap-mib", type=float, default=1024.0)
    p.add_argument("--path", default=None, help="parent directory of the run's store")
    p.add_argument("--keep", action="store_true", help="keep the store and the daemon's log")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="tqstore-vanish-", dir=args.path)
    try:
        res = run_vanishing(root, rounds=args.rounds, concurrent=args.concurrent, seed=args.seed,
                            max_delay_s=args.max_delay_s, rss_cap_mib=args.rss_cap_mib)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    out = dataclasses.asdict(res)
    out["failures"] = res.failures[:20]
    out["seconds"] = round(res.seconds, 1)
    out["ok"] = not res.failures
    print(f"{sum(res.victims.values())} victims {res.victims}: killed mid-put "
          f"{res.killed_mid_put}, mid-fetch {res.killed_mid_fetch}, mid-heavy "
          f"{res.killed_mid_heavy}, cancelled puts "
          f"{res.cancelled_puts}, fetches {res.cancelled_fetches}; puts {res.put_families} "
          f"(whole {res.stored_whole}, cancelled but whole {res.cancelled_but_stored}), "
          f"lost {res.lost}, partial {res.partial}, wrong {res.wrong}; "
          f"fds {res.fds_baseline} -> peak {res.fds_peak} -> {res.fds_end}; RSS {res.rss}")
    print(json.dumps(out, indent=2))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
