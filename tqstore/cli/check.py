"""`tqstore check PATH [--repair] [--json]`: walk a store and report (or repair) inconsistencies
(the walk itself is tqstore.ssd.check, run through BlockStore.check).

Without --repair it opens the store readonly, so it can run beside the daemon. --repair needs the
writer lock (stop the daemon first). Exit status: 0 consistent, 1 inconsistent (after repair: 0
if the repair left it consistent), or a store that cannot be checked (index damaged, no store,
daemon holding the writer lock for --repair): a one-line reason, never a traceback or a signal.

A damaged index: the store first walks the index in a child process (tqstore/ssd/probe.py), so
damage that would be a SIGBUS here is a "DAMAGED INDEX" report; so is an index the daemon marked
damaged while serving, or (when this user may write the index) one whose free list is broken
(tqstore.ssd.opening.verify_for_check: one aborted write txn, nothing changes). --repair opens the writer, which
rebuilds the index from the payload files (tqstore/ssd/rebuild.py) before the usual check."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from tqstore.errors import TqstoreError
from tqstore.ssd.opening import IndexDamaged, verify_for_check
from tqstore.ssd.store import BlockStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="store directory")
    parser.add_argument("--repair", action="store_true",
                        help="quarantine bad records, drop orphans, rebuild indexes (stop the "
                             "daemon first: needs the writer lock)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _cannot_check(args: argparse.Namespace, exc: TqstoreError) -> int:
    state = "DAMAGED INDEX" if isinstance(exc, IndexDamaged) else "CANNOT CHECK"
    if args.json:
        print(json.dumps({"ok": False, "state": state, "error": str(exc)}, indent=2))
    else:
        print(f"{state}: {exc}")
    return 1


def run(args: argparse.Namespace) -> int:
    try:
        if not args.repair and os.path.isdir(os.path.join(args.path, "index")):
            verify_for_check(args.path)  # the daemon's marker, a broken free list
        with BlockStore(args.path, readonly=not args.repair) as store:
            rebuilt = store.rebuild
            report = store.check(repair=args.repair)
            ok = report.ok or (report.repaired and store.check().ok)
    except TqstoreError as exc:
        return _cannot_check(args, exc)
    if args.json:
        out = {**dataclasses.asdict(report), "ok": report.ok}
        if rebuilt is not None:
            out["index_rebuild"] = dataclasses.asdict(rebuilt)
        print(json.dumps(out, indent=2))
    else:
        if rebuilt is not None:
            why = ", ".join(f"{n} {r}" for r, n in rebuilt.lost_by_reason)
            print(f"INDEX REBUILT from payload files ({rebuilt.reason}): {rebuilt.recovered} "
                  f"blocks recovered, {rebuilt.lost} lost" + (f" ({why})" if why else ""))
        print(report.summary())
        for h, why in report.bad_records[:20]:
            print(f"  bad      {h}  {why}")
        for h in report.dangling[:20]:
            print(f"  dangling {h}")
        for name in report.orphan_files[:20]:
            print(f"  orphan   {name}")
        for problem in report.index_problems:
            print(f"  index    {problem}")
        for entry in report.ignored_files[:20]:
            print(f"  ignored  {entry}")
    return 0 if ok else 1
