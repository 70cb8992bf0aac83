"""Rebuild the LMDB index from the payload files alone (the index is a derived structure).

Used when the writer finds the index damaged or missing (opening.py) and by `check --repair` on a
damaged index. Every payload file is verified in full before it is re-indexed: its header and
self-description (CRCs, chain hash, namespace root, header agreement: selfdesc.py) and then every
body chunk checksum and the layout (payload.read_file/decode), exactly what a get would check.

Order and closure: blocks are inserted parent before child, breadth first from the namespace
roots, so prefix closure (index.py) holds in the new index. A verified block whose parent is
missing or failed is lost too (unreachable through a prefix lookup anyway), and so are version 2
files, which cannot describe themselves. Lost files are deleted after the commit; temp files
(crash leftovers) are deleted without being counted.

What a rebuild cannot restore: last access times (the file mtime, i.e. the put time, stands in,
so LRU order stays sane), hit counts and the usage counters (lookups, gets, ...), which restart
from zero. The outcome is kept outside the index (rebuilds.json, opening.py) so that a later
rebuild does not lose the history of earlier ones.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass

from tqstore.ssd import payload as pl
from tqstore.ssd.index import Index
from tqstore.ssd.selfdesc import Description, DescriptionError, read_description

log = logging.getLogger("tqstore.ssd.rebuild")
_TXN_BLOCKS = 2048  # inserts per write txn: bounded txn size on a 100k-block store


@dataclass(frozen=True)
class RebuildOutcome:
    reason: str
    recovered: int  # blocks re-indexed
    lost: int  # payload files dropped (damaged, version 2, or parent lost)
    seconds: float
    when: int  # ns since epoch


def _verify(path: str, key: bytes, executor: Executor | None) -> Description:
    desc = read_description(path, key)
    rec = desc.record
    raw = pl.read_file(path, key, rec.file_size, rec.stored_size, rec.raw_size, rec.compression,
                       rec.chunks, executor)
    pl.decode(raw, rec.layout)
    return desc


def _scan(blocks_dir: str, executor: Executor | None) -> tuple[dict[bytes, Description], list[str]]:
    """Verified self-descriptions by key, and the names of files that failed."""
    good: dict[bytes, Description] = {}
    failed: list[str] = []
    for name in sorted(os.listdir(blocks_dir)):
        path = os.path.join(blocks_dir, name)
        stem, _, ext = name.partition(".")
        try:
            key = bytes.fromhex(stem) if ext == "blk" else b""
        except ValueError:
            key = b""
        if len(key) != 32:
            _unlink(path)  # a temp file or junk: never a block
            continue
        try:
            desc = _verify(path, key, executor)
            desc.record.access = os.stat(path).st_mtime_ns
            desc.record.hits = 0
            good[key] = desc
        except (OSError, DescriptionError, pl.PayloadError, ValueError) as exc:
            log.debug("payload %s not recoverable: %s", name, exc)
            failed.append(name)
    return good, failed


def _closure_order(good: dict[bytes, Description]) -> list[bytes]:
    """Keys reachable from a namespace root, parents before children (breadth first)."""
    by_parent: dict[bytes, list[bytes]] = {}
    for key, d in good.items():
        by_parent.setdefault(d.record.parent, []).append(key)
    queue = deque(sorted(k for k, d in good.items() if d.record.index == 0))
    order: list[bytes] = []
    while queue:
        key = queue.popleft()
        order.append(key)
        rec = good[key].record
        for child in sorted(by_parent.get(key, [])):
            crec = good[child].record
            if crec.ns == rec.ns and crec.index == rec.index + 1:
                queue.append(child)
    return order


def rebuild_index(idx: Index, blocks_dir: str, reason: str,
                  executor: Executor | None = None) -> RebuildOutcome:
    """Fill an empty index from the payload files of blocks_dir (see the module docstring)."""
    t0 = time.perf_counter()
    good, failed = _scan(blocks_dir, executor)
    order = _closure_order(good)
    kept = set(order)
    lost_names = failed + [k.hex() + ".blk" for k in good if k not in kept]
    for start in range(0, len(order), _TXN_BLOCKS):
        with idx.env.begin(write=True) as txn:
            for key in order[start:start + _TXN_BLOCKS]:
                d = good[key]
                if txn.get(d.record.ns, db=idx.namespaces) is None:
                    txn.put(d.record.ns, d.namespace.encode(), db=idx.namespaces)
                idx.insert(txn, key, d.record)
    for name in lost_names:
        _unlink(os.path.join(blocks_dir, name))
    pl.fsync_dir(blocks_dir)
    outcome = RebuildOutcome(reason, len(order), len(lost_names), time.perf_counter() - t0,
                             time.time_ns())
    log.warning("index rebuilt from payload files (%s): %d blocks recovered, %d lost, %.1f s",
                reason, outcome.recovered, outcome.lost, outcome.seconds)
    return outcome


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except IsADirectoryError:
        pass
    except FileNotFoundError:
        pass
