"""Rebuild the LMDB index from the payload files alone (the index is a derived structure).

Used when the writer finds the index damaged or missing (opening.py) and by `check --repair` on a
damaged index. Every payload file is verified in full before it is re-indexed: its header and
self-description (CRCs, chain hash, namespace root, header agreement: selfdesc.py) and then every
body chunk checksum and the layout (payload.read_file/decode), exactly what a get would check.

Order and closure: blocks are inserted parent before child, breadth first from the namespace
roots, so prefix closure (index.py) holds in the new index. A verified block whose parent is
missing or failed is lost too (unreachable through a prefix lookup anyway), and so are version 2
files, which cannot describe themselves. Files that fail verification and unreachable ones are
deleted after the commit; temp files (crash leftovers) are deleted without being counted.

Trust: only regular files owned by the effective uid are read (lstat, then O_NOFOLLOW and fstat:
selfdesc.open_owned). A symlink or another user's file in blocks/ (planted while the directory was
writable by others; opening.py makes the store 0700 before a rebuild) is counted as lost
("not a regular file", "foreign") and left in place: we do not delete what we do not own. A file
that cannot be read (EACCES, EMFILE, EIO) is no proof of damage: counted ("unreadable"), kept.

Atomicity: the caller (opening.py) rebuilds into a temporary index directory and renames it into
place only after the last commit, so an interrupted rebuild never leaves a partial index/ that a
later open would trust (and whose missing blocks it would then delete as orphans).

What a rebuild cannot restore: last access times (the file mtime, i.e. the put time, stands in,
so LRU order stays sane), hit counts and the usage counters (lookups, gets, ...), which restart
from zero. The outcome is kept outside the index (rebuilds.json, opening.py) so that a later
rebuild does not lose the history of earlier ones.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass

from tqstore.ssd import payload as pl
from tqstore.ssd.chain import closure_order
from tqstore.ssd.index import Index
from tqstore.ssd.selfdesc import Description, DescriptionError, entry_untrusted, read_description

log = logging.getLogger("tqstore.ssd.rebuild")
_TXN_BLOCKS = 2048  # inserts per write txn: bounded txn size on a 100k-block store


@dataclass(frozen=True)
class RebuildOutcome:
    reason: str
    recovered: int  # blocks re-indexed
    lost: int  # payload files dropped (damaged, version 2, or parent lost)
    seconds: float
    when: int  # ns since epoch
    lost_by_reason: tuple[tuple[str, int], ...] = ()  # ("foreign", 2), ("parent lost", 5), ...


def _verify(path: str, key: bytes, executor: Executor | None) -> Description:
    desc = read_description(path, key)
    rec = desc.record
    raw = pl.read_file(path, key, rec.file_size, rec.stored_size, rec.raw_size, rec.compression,
                       rec.chunks, executor)
    pl.decode(raw, rec.layout)
    return desc


def _scan(blocks_dir: str, executor: Executor | None) -> tuple[dict[bytes, Description],
                                                                 list[str], dict[str, str]]:
    """Verified self-descriptions by key, the names of files that failed verification (deleted
    later), and the files left in place with why (foreign, not a regular file, unreadable)."""
    good: dict[bytes, Description] = {}
    failed: list[str] = []
    left: dict[str, str] = {}
    for name in sorted(os.listdir(blocks_dir)):
        path = os.path.join(blocks_dir, name)
        stem, _, ext = name.partition(".")
        try:
            key = bytes.fromhex(stem) if ext == "blk" else b""
        except ValueError:
            key = b""
        why = entry_untrusted(path)
        if why:  # never read, never deleted: not ours (see the module docstring)
            if len(key) == 32:
                left[name] = why
            continue
        if len(key) != 32:
            _unlink(path)  # our temp file or junk: never a block
            continue
        try:
            desc = _verify(path, key, executor)
            desc.record.access = os.stat(path).st_mtime_ns
            desc.record.hits = 0
            good[key] = desc
        except (DescriptionError, pl.PayloadError, ValueError) as exc:
            log.debug("payload %s not recoverable: %s", name, exc)
            failed.append(name)
        except OSError as exc:  # EACCES, EMFILE, EIO: not proof the file is bad; keep it
            log.warning("payload %s left in place, unreadable: %s", name, exc)
            left[name] = f"unreadable: {exc.strerror or exc}"
    return good, failed, left


def rebuild_index(idx: Index, blocks_dir: str, reason: str,
                  executor: Executor | None = None) -> RebuildOutcome:
    """Fill an empty index from the payload files of blocks_dir (see the module docstring)."""
    t0 = time.perf_counter()
    good, failed, left = _scan(blocks_dir, executor)
    order = closure_order({k: d.record for k, d in good.items()})
    kept = set(order)
    unreachable = [k.hex() + ".blk" for k in good if k not in kept]
    for start in range(0, len(order), _TXN_BLOCKS):
        with idx.env.begin(write=True) as txn:
            for key in order[start:start + _TXN_BLOCKS]:
                d = good[key]
                if txn.get(d.record.ns, db=idx.namespaces) is None:
                    txn.put(d.record.ns, d.namespace.encode(), db=idx.namespaces)
                idx.insert(txn, key, d.record)
    for name in failed + unreachable:
        _unlink(os.path.join(blocks_dir, name))
    pl.fsync_dir(blocks_dir)
    reasons = Counter(["failed verification"] * len(failed) + ["parent lost"] * len(unreachable)
                      + [why.split(":")[0] for why in left.values()])
    outcome = RebuildOutcome(reason, len(order), len(failed) + len(unreachable) + len(left),
                             time.perf_counter() - t0, time.time_ns(),
                             tuple(sorted(reasons.items())))
    log.warning("index rebuilt from payload files (%s): %d blocks recovered, %d lost (%s), "
                "%.1f s", reason, outcome.recovered, outcome.lost,
                ", ".join(f"{n} {why}" for why, n in outcome.lost_by_reason) or "none",
                outcome.seconds)
    for name, why in sorted(left.items())[:10]:
        log.warning("payload %s left in place, not recovered: %s", name, why)
    return outcome


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except IsADirectoryError:
        pass
    except FileNotFoundError:
        pass
