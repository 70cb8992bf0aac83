"""The LMDB index: its named databases and the structural operations that keep them consistent.

Databases (all keys raw bytes):
- blocks:     block hash -> BlockRecord frame
- children:   parent hash (or namespace root) -> child hash (dupsort)
- leaves:     u64 big-endian last access ns || block hash -> b"" ; exactly the blocks with no
              children, ordered least recently used first, so eviction is a cursor.first()
- namespaces: namespace root hash -> NamespaceRecord frame (model, layout, live blocks/bytes)
- quarantine: block hash -> why it was pulled (with the raw index value, for forensics)
- meta:       b"counters" -> counters frame

Invariants (check.py verifies each, `check --repair` rebuilds the derived ones):
- Prefix closure: a block's parent is present (or is its namespace root). Eviction only removes
  leaves; quarantining a block removes its whole subtree (descendants are unreachable through a
  prefix lookup anyway). This is what makes lookup a binary search over the chain. A record
  that fails its checksum while its payload file verifies is rewritten from the file's
  self-description instead (heal.py): only a block whose bytes are bad is quarantined.
- The whole index is derived from the payload files' self-descriptions (rebuild.py).
- children and leaves are exactly derived from blocks; counters equal sums over blocks.
All mutations happen in one write txn together with the counters they change.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

import lmdb

from tqstore.ssd.payload import allocated
from tqstore.ssd.records import (
    BlockRecord,
    NamespaceRecord,
    RecordError,
    decode_counters,
    encode_counters,
    encode_quarantine,
)

_ACCESS = struct.Struct(">Q")
COUNTERS_KEY = b"counters"


def leaf_key(access: int, key: bytes) -> bytes:
    return _ACCESS.pack(access) + key


@dataclass
class Index:
    """Handles of one LMDB environment and its databases."""

    env: lmdb.Environment
    blocks: object
    children: object
    leaves: object
    namespaces: object
    quarantine: object
    meta: object

    @classmethod
    def open(cls, path: str, map_size: int, readonly: bool) -> "Index":
        env = lmdb.open(path, map_size=map_size, max_dbs=8, subdir=True, readonly=readonly,
                        lock=True, sync=True, metasync=True, readahead=False, max_readers=256,
                        create=not readonly, mode=0o600)
        kw = {} if readonly else {"create": True}
        return cls(
            env=env,
            blocks=env.open_db(b"blocks", **kw),
            children=env.open_db(b"children", dupsort=True, **kw),
            leaves=env.open_db(b"leaves", **kw),
            namespaces=env.open_db(b"namespaces", **kw),
            quarantine=env.open_db(b"quarantine", **kw),
            meta=env.open_db(b"meta", **kw),
        )

    def used_bytes(self) -> int:
        """LMDB pages in use (the file may be a larger sparse reservation)."""
        info = self.env.info()
        return (info["last_pgno"] + 1) * self.env.stat()["psize"]

    # -- counters -------------------------------------------------------------------------------
    def counters(self, txn: lmdb.Transaction) -> dict[str, int]:
        try:
            return decode_counters(txn.get(COUNTERS_KEY, db=self.meta))
        except RecordError:  # a corrupt counters record is rebuilt by check --repair
            return decode_counters(None)

    def add_counters(self, txn: lmdb.Transaction, delta: dict[str, int]) -> None:
        if not any(delta.values()):
            return
        c = self.counters(txn)
        for k, v in delta.items():
            c[k] = c.get(k, 0) + v
        txn.put(COUNTERS_KEY, encode_counters(c), db=self.meta)

    def _ns_add(self, txn: lmdb.Transaction, ns: bytes, blocks: int, nbytes: int) -> None:
        raw = txn.get(ns, db=self.namespaces)
        if raw is None:
            return
        try:
            rec = NamespaceRecord.decode(raw)
        except RecordError:
            return
        rec.blocks += blocks
        rec.bytes += nbytes
        txn.put(ns, rec.encode(), db=self.namespaces)

    # -- structure ------------------------------------------------------------------------------
    def has_children(self, txn: lmdb.Transaction, key: bytes) -> bool:
        cur = txn.cursor(db=self.children)
        return cur.set_key(key)

    def children_of(self, txn: lmdb.Transaction, key: bytes) -> list[bytes]:
        cur = txn.cursor(db=self.children)
        if not cur.set_key(key):
            return []
        return [bytes(v) for v in cur.iternext_dup()]

    def insert(self, txn: lmdb.Transaction, key: bytes, rec: BlockRecord) -> None:
        """Add a new block whose parent is present (caller checked). The parent stops being a
        leaf; the new block is one."""
        parent_raw = txn.get(rec.parent, db=self.blocks)
        if parent_raw is not None and not self.has_children(txn, rec.parent):
            try:
                parent = BlockRecord.decode(parent_raw)
                txn.delete(leaf_key(parent.access, rec.parent), db=self.leaves)
            except RecordError:
                pass  # a corrupt parent is found and quarantined by its next read or by check
        txn.put(key, rec.encode(), db=self.blocks)
        txn.put(rec.parent, key, db=self.children, dupdata=True)
        if not self.has_children(txn, key):
            txn.put(leaf_key(rec.access, key), b"", db=self.leaves)
        size = allocated(rec.file_size)
        self._ns_add(txn, rec.ns, 1, size)
        self.add_counters(txn, {"blocks": 1, "payload_bytes": size, "logical_bytes": rec.raw_size})

    def remove(self, txn: lmdb.Transaction, key: bytes, rec: BlockRecord | None,
               parent: bytes | None, sizes: tuple[bytes, int, int] | None = None) -> None:
        """Remove one block's index entries. `rec` is None when the record is undecodable: then
        `parent` (known to the caller from the chain) unlinks it, the leaf index is scanned, and
        `sizes` (namespace root, allocated file bytes, logical bytes; the caller knows them from
        the namespace and the file) keep the counters exact. The parent becomes a leaf when this
        was its last child."""
        txn.delete(key, db=self.blocks)
        if rec is not None:
            parent = rec.parent
            txn.delete(leaf_key(rec.access, key), db=self.leaves)
            size = allocated(rec.file_size)
            self._ns_add(txn, rec.ns, -1, -size)
            self.add_counters(txn, {"blocks": -1, "payload_bytes": -size,
                                    "logical_bytes": -rec.raw_size})
        else:
            cur = txn.cursor(db=self.leaves)
            stale = [bytes(k) for k in cur.iternext(keys=True, values=False) if bytes(k)[8:] == key]
            for k in stale:
                txn.delete(k, db=self.leaves)
            ns, size, logical = sizes if sizes is not None else (b"", 0, 0)
            self._ns_add(txn, ns, -1, -size)
            self.add_counters(txn, {"blocks": -1, "payload_bytes": -size, "logical_bytes": -logical})
        if parent is None:
            return
        txn.delete(parent, key, db=self.children)
        if not self.has_children(txn, parent):
            praw = txn.get(parent, db=self.blocks)
            if praw is not None:
                try:
                    prec = BlockRecord.decode(praw)
                    txn.put(leaf_key(prec.access, parent), b"", db=self.leaves)
                except RecordError:
                    pass

    def touch(self, txn: lmdb.Transaction, key: bytes, access: int, hits: int) -> None:
        """Set last access (never backwards) and add hits; re-key the leaf entry."""
        raw = txn.get(key, db=self.blocks)
        if raw is None:
            return
        try:
            rec = BlockRecord.decode(raw)
        except RecordError:
            return
        if access > rec.access:
            if txn.delete(leaf_key(rec.access, key), db=self.leaves):
                txn.put(leaf_key(access, key), b"", db=self.leaves)
            rec.access = access
        rec.hits += hits
        txn.put(key, rec.encode(), db=self.blocks)

    def subtree(self, txn: lmdb.Transaction, key: bytes) -> list[bytes]:
        """The descendants of `key`, deepest first (safe removal order)."""
        order: list[bytes] = []
        stack = list(self.children_of(txn, key))
        while stack:
            k = stack.pop()
            order.append(k)
            stack.extend(self.children_of(txn, k))
        return order[::-1]

    def quarantine_record(self, txn: lmdb.Transaction, key: bytes, reason: str, when: int,
                          raw: bytes | None) -> None:
        txn.put(key, encode_quarantine(key, reason, when, raw), db=self.quarantine)

    def iter_leaves(self, txn: lmdb.Transaction) -> Iterator[tuple[int, bytes]]:
        cur = txn.cursor(db=self.leaves)
        for k in cur.iternext(keys=True, values=False):
            k = bytes(k)
            yield _ACCESS.unpack_from(k)[0], k[8:]
