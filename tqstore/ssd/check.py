"""`check`: walk the whole store, report every inconsistency, optionally repair.

What is checked:
- every index record decodes (frame CRC, fields) and its payload file verifies (header, size,
  every chunk CRC, decompression);
- prefix closure: every record's parent is present or is its namespace root ("dangling" if not);
- every payload file has a record (else "orphan file"; temp files too);
- the derived databases (children, leaves) and the counters (blocks, payload and logical bytes,
  per-namespace blocks/bytes) equal what the records imply.

Repair keeps exactly the records that verify and are reachable from a namespace root; bad records
are quarantined, unreachable good ones removed, orphan files unlinked, and children, leaves and
counters rebuilt from the kept records, all in one write txn (payload files unlinked after it).
A readonly check (another process while the daemon writes) re-reads a failing record in a fresh
txn and skips it if it changed or vanished meanwhile: an eviction race is not corruption.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable

from tqstore.ssd import payload as pl
from tqstore.ssd.chain import closure_order
from tqstore.ssd.selfdesc import entry_untrusted
from tqstore.ssd.index import COUNTERS_KEY, Index, leaf_key
from tqstore.ssd.records import (
    BlockRecord,
    NamespaceRecord,
    RecordError,
    decode_counters,
    encode_counters,
)


@dataclass
class CheckReport:
    records_checked: int = 0
    files_checked: int = 0
    bytes_verified: int = 0
    bad_records: list[tuple[str, str]] = field(default_factory=list)  # (hash hex, reason)
    dangling: list[str] = field(default_factory=list)  # records whose parent is missing
    orphan_files: list[str] = field(default_factory=list)
    # entries of blocks/ the store ignores and never deletes: not regular files, or another
    # user's (reported, not counted as inconsistency: nothing reads them)
    ignored_files: list[str] = field(default_factory=list)
    index_problems: list[str] = field(default_factory=list)
    quarantined_total: int = 0  # records in the quarantine db after the check
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not (self.bad_records or self.dangling or self.orphan_files or self.index_problems)

    def summary(self) -> str:
        state = "OK" if self.ok else "INCONSISTENT"
        return (f"{state}: {self.records_checked} records, {self.files_checked} files, "
                f"{self.bytes_verified} payload bytes verified; {len(self.bad_records)} bad, "
                f"{len(self.dangling)} dangling, {len(self.orphan_files)} orphan files, "
                f"{len(self.index_problems)} index problems; quarantined total "
                f"{self.quarantined_total}"
                + (f"; {len(self.ignored_files)} foreign entries ignored" if self.ignored_files
                   else "") + (" (repaired)" if self.repaired else ""))


def _verify_payload(blocks_dir: str, key: bytes, rec: BlockRecord, executor: Executor | None) -> str:
    path = os.path.join(blocks_dir, key.hex() + ".blk")
    try:
        raw = pl.read_file(path, key, rec.file_size, rec.stored_size, rec.raw_size,
                           rec.compression, rec.chunks, executor)
        pl.decode(raw, rec.layout)
    except FileNotFoundError:
        return "payload file missing"
    except pl.PayloadError as exc:
        return str(exc)
    except OSError as exc:  # a symlink (ELOOP: never followed) or an unreadable file
        return f"payload file unreadable: {exc.strerror or exc}"
    return ""


def run_check(idx: Index, blocks_dir: str, executor: Executor | None, repair: bool,
              now: Callable[[], int]) -> CheckReport:
    report = CheckReport()
    with idx.env.begin() as txn:
        raws = {bytes(k): bytes(v) for k, v in txn.cursor(db=idx.blocks)}
    good: dict[bytes, BlockRecord] = {}
    bad: dict[bytes, str] = {}
    for key, raw in raws.items():
        report.records_checked += 1
        try:
            rec = BlockRecord.decode(raw)
            reason = "" if len(key) == 32 else "bad key length"
            reason = reason or _verify_payload(blocks_dir, key, rec, executor)
        except RecordError as exc:
            rec, reason = None, str(exc)
        if reason:
            with idx.env.begin(db=idx.blocks) as txn:
                if txn.get(key) != raw:
                    continue  # changed or evicted while we read it: not corruption
            bad[key] = reason
        else:
            good[key] = rec  # type: ignore[assignment]
            report.bytes_verified += rec.stored_size  # type: ignore[union-attr]
    report.bad_records = sorted((k.hex(), r) for k, r in bad.items())

    # Reachability from namespace roots over verified records (prefix closure; shared with the
    # rebuild so that the two agree on what a store holds).
    keep = {k: good[k] for k in closure_order(good)}
    report.dangling = sorted(k.hex() for k in good if k not in keep)

    # Files without records.
    names = os.listdir(blocks_dir)
    report.files_checked = len(names)
    for name in names:
        why = entry_untrusted(os.path.join(blocks_dir, name))
        if why:
            report.ignored_files.append(f"{name} ({why})")
            continue
        stem, _, ext = name.partition(".")
        try:
            known = ext == "blk" and bytes.fromhex(stem) in raws
        except ValueError:
            known = False
        if not known:
            report.orphan_files.append(name)
    report.orphan_files.sort()

    # Derived databases and counters, as the kept records imply them.
    children = {(r.parent, k) for k, r in keep.items()}
    parents = {p for p, _ in children}
    leaves = {leaf_key(r.access, k) for k, r in keep.items() if k not in parents}
    ns_counts: dict[bytes, list[int]] = {}
    for r in keep.values():
        c = ns_counts.setdefault(r.ns, [0, 0])
        c[0] += 1
        c[1] += pl.allocated(r.file_size)
    with idx.env.begin() as txn:
        have_children = {(bytes(k), bytes(v)) for k, v in txn.cursor(db=idx.children)}
        have_leaves = {bytes(k) for k, _ in txn.cursor(db=idx.leaves)}
        try:
            counters = decode_counters(txn.get(COUNTERS_KEY, db=idx.meta))
        except RecordError:
            counters = decode_counters(None)
            report.index_problems.append("counters record corrupt")
        ns_raw = {bytes(k): bytes(v) for k, v in txn.cursor(db=idx.namespaces)}
        report.quarantined_total = txn.stat(idx.quarantine)["entries"]
    if have_children != children:
        report.index_problems.append(f"children index differs in {len(have_children ^ children)} entries")
    if have_leaves != leaves:
        report.index_problems.append(f"leaf index differs in {len(have_leaves ^ leaves)} entries")
    expect = {"blocks": len(keep), "payload_bytes": sum(c[1] for c in ns_counts.values()),
              "logical_bytes": sum(r.raw_size for r in keep.values())}
    for name, value in expect.items():
        if counters[name] != value:
            report.index_problems.append(f"counter {name} is {counters[name]}, records say {value}")
    ns_records: dict[bytes, NamespaceRecord] = {}
    for k, v in ns_raw.items():
        try:
            ns_records[k] = NamespaceRecord.decode(v)
        except RecordError:
            report.index_problems.append(f"namespace record {k.hex()[:16]} corrupt")
    for ns in set(ns_counts) | set(ns_records):
        want = ns_counts.get(ns, [0, 0])
        r = ns_records.get(ns)
        if r is None:
            report.index_problems.append(f"namespace {ns.hex()[:16]} has blocks but no record")
        elif [r.blocks, r.bytes] != want:
            report.index_problems.append(f"namespace {ns.hex()[:16]} counts {[r.blocks, r.bytes]}, records say {want}")

    if repair and not report.ok:
        _repair(idx, blocks_dir, report, raws, bad, keep, children, leaves, ns_counts, ns_records,
                counters, expect, now)
    return report


def _repair(idx: Index, blocks_dir: str, report: CheckReport, raws: dict[bytes, bytes],
            bad: dict[bytes, str], keep: dict[bytes, BlockRecord], children: set, leaves: set,
            ns_counts: dict, ns_records: dict, counters: dict, expect: dict,
            now: Callable[[], int]) -> None:
    drop = [k for k in raws if k not in keep]
    with idx.env.begin(write=True) as txn:
        for k in drop:
            txn.delete(k, db=idx.blocks)
            if k in bad:
                idx.quarantine_record(txn, k, bad[k], now(), raws[k])
        txn.drop(idx.children, delete=False)
        for parent, child in sorted(children):
            txn.put(parent, child, db=idx.children, dupdata=True)
        txn.drop(idx.leaves, delete=False)
        for lk in sorted(leaves):
            txn.put(lk, b"", db=idx.leaves)
        for ns, rec in ns_records.items():
            rec.blocks, rec.bytes = ns_counts.get(ns, [0, 0])
            txn.put(ns, rec.encode(), db=idx.namespaces)
        counters.update(expect)
        counters["quarantined"] = counters.get("quarantined", 0) + len(bad)
        txn.put(COUNTERS_KEY, encode_counters(counters), db=idx.meta)
        report.quarantined_total = txn.stat(idx.quarantine)["entries"]
    for name in [k.hex() + ".blk" for k in drop] + report.orphan_files:
        path = os.path.join(blocks_dir, name)
        if entry_untrusted(path):
            continue  # not ours (see ignored_files): never deleted
        try:
            os.unlink(path)
        except OSError:
            pass
    pl.fsync_dir(blocks_dir)
    report.repaired = True
