"""Eviction: least recently used leaves first.

A leaf is a block with no stored children; the leaves database is ordered by (last access, hash),
so the victim is the first entry that the current put does not protect. Removing a leaf can turn
its parent into a leaf, which then competes by its own last access (a chain therefore shrinks from
its tail, never orphaning a child). Ties in last access are broken by hash bytes, so the order is
exact and testable. Last access is persisted (batched, see StoreConfig), so the order survives a
restart.
"""

from __future__ import annotations

from dataclasses import dataclass

import lmdb

from tqstore.ssd.index import Index, leaf_key
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
