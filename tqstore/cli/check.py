"""`tqstore check PATH [--repair] [--json]`: walk a store and report (or repair) inconsistencies
(the walk itself is tqstore.ssd.check, run through BlockStore.check).

Without --repair it opens the store readonly, so it can run beside the daemon. --repair needs the
writer lock (stop the daemon first). Exit status: 0 consistent, 1 inconsistent (after repair: 0
if the repair left it consistent)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from tqstore.ssd.store import BlockStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="store directory")
    parser.add_argument("--repair", action="store_true",
                        help="quarantine bad records, drop orphans, rebuild indexes (stop the "
                             "daemon first: needs the writer lock)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    with BlockStore(args.path, readonly=not args.repair) as store:
        report = store.check(repair=args.repair)
        ok = report.ok or (report.repaired and store.check().ok)
    if args.json:
        print(json.dumps({**dataclasses.asdict(report), "ok": report.ok}, indent=2))
    else:
        print(report.summary())
        for h, why in report.bad_records[:20]:
            print(f"  bad      {h}  {why}")
        for h in report.dangling[:20]:
            print(f"  dangling {h}")
        for name in report.orphan_files[:20]:
            print(f"  orphan   {name}")
        for problem in report.index_problems:
            print(f"  index    {problem}")
    return 0 if ok else 1
