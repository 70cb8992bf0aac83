"""What a writer does when it opens a store (tqstore/ssd/store.py), before it serves anything:
remove crash leftovers, and give the store a fresh identity for same-host readers."""

from __future__ import annotations

import os
import secrets

from tqstore.ssd import payload as pl
from tqstore.ssd.index import Index


def remove_orphans(idx: Index, blocks_dir: str) -> int:
    """Crash cleanup: temp files and payload files with no index record (a put that crashed
    between the file's rename and the index commit was never acknowledged)."""
    removed = 0
    with idx.env.begin(db=idx.blocks) as txn:
        for name in os.listdir(blocks_dir):
            stem, _, ext = name.partition(".")
            orphan = ext != "blk"
            if not orphan:
                try:
                    orphan = txn.get(bytes.fromhex(stem)) is None
                except ValueError:
                    orphan = True
            if orphan:
                os.unlink(os.path.join(blocks_dir, name))
                removed += 1
    if removed:
        pl.fsync_dir(blocks_dir)
    return removed


def write_store_id(path: str) -> str:
    """A random id in <path>/store.id (replaced atomically). The daemon sends it with Locate; a
    client that reads the same id there shares the daemon's file system (tqstore/direct_read.py)."""
    store_id = secrets.token_hex(16)
    final = os.path.join(path, "store.id")
    tmp = f"{final}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(store_id)
    os.replace(tmp, final)
    return store_id
