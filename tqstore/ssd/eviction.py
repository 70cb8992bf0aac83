"""Eviction: least recently used leaves first.

A leaf is a block with no stored children; the leaves database is ordered by (last access, hash),
so the victim is the first entry that the current put does not protect. Removing a leaf can turn
its parent into a leaf, which then competes by its own last access (a chain therefore shrinks from
its tail, never orphaning a child). Ties in last access are broken by hash bytes, so the order is
exact and testable. Last access is persisted (batched, see StoreConfig), so the order survives a
restart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import lmdb

from tqstore.ssd.index import Index, leaf_key
from tqstore.ssd.nospace import SpaceReserve, out_of_space
from tqstore.ssd.payload import allocated
from tqstore.ssd.records import BlockRecord, RecordError


@dataclass(frozen=True)
class Evicted:
    key: bytes
    freed: int  # allocated payload bytes


def evict_lru(idx: Index, txn: lmdb.Transaction, bytes_to_free: int,
              protect: frozenset[bytes] = frozenset()) -> list[Evicted]:
    """Remove LRU leaves (not in `protect`) inside `txn` until `bytes_to_free` payload bytes are
    freed or no candidate is left. The caller unlinks the payload files after the commit."""
    out: list[Evicted] = []
    freed = 0
    while freed < bytes_to_free:
        victim = None
        for access, key in idx.iter_leaves(txn):
            if key not in protect:
                victim = (access, key)
                break
        if victim is None:
            break
        access, key = victim
        raw = txn.get(key, db=idx.blocks)
        if raw is None:  # stale leaf entry: drop it and go on
            txn.delete(leaf_key(access, key), db=idx.leaves)
            continue
        try:
            rec = BlockRecord.decode(raw)
        except RecordError:
            # Undecodable: we cannot know its parent; drop it (check finds the dangling edge).
            txn.delete(leaf_key(access, key), db=idx.leaves)
            idx.remove(txn, key, None, None)
            out.append(Evicted(key, 0))
            continue
        idx.remove(txn, key, rec, rec.parent)
        size = allocated(rec.file_size)
        freed += size
        out.append(Evicted(key, size))
    if out:
        idx.add_counters(txn, {"evictions": len(out)})
    return out


def evict_in_steps(bytes_to_free: int, evict_txn: Callable[[int], list[Evicted]], blocks_dir: str,
                   reserve: SpaceReserve) -> int:
    """Run evict_txn (one write txn evicting at least n bytes, returning what it removed) and
    unlink the evicted payload files; returns the bytes freed. Normally one txn. On a full disk
    LMDB needs new pages even to free some: then one leaf per txn, growing 4x per step as files
    are freed, and the space reserve is given back once if even one leaf does not fit."""
    store_path = os.path.dirname(blocks_dir)
    freed, step = 0, 0  # step 0: everything in one txn
    while freed < bytes_to_free:
        try:
            gone = evict_txn(step or bytes_to_free - freed)
        except lmdb.Error as exc:
            if not out_of_space(exc, store_path) or (step and not reserve.release()):
                raise
            step = 1
            continue
        step *= 4
        for e in gone:
            try:
                os.unlink(os.path.join(blocks_dir, e.key.hex() + ".blk"))
            except FileNotFoundError:
                pass
        freed += sum(e.freed for e in gone)
        if not gone:
            break
    if freed:
        reserve.ensure()
    return freed
