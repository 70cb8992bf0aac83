"""What a writer does when it opens a store (tqstore/ssd/store.py), before it serves anything:
make sure the index is sound (or rebuild it from the payload files), remove crash leftovers, make
the store's files private, and give the store a fresh identity for same-host readers.

Opening the index (issue 17: damage to the index must not crash anything):
1. probe.py walks the index in a child process; a signal, error or timeout there means damage.
2. If LMDB refuses to open in this process, the lock file is the suspect: the writer holds
   writer.lock, so no other writer uses it; it is removed and the open retried once.
3. A damaged, missing or unopenable index is moved aside (index.damaged-<UTC time>; only the
   newest such copy is kept, for forensics) and rebuilt from the payload files (rebuild.py).
The outcome of each rebuild is added to rebuilds.json beside the index (outside it: the next
damage must not erase the history); StoreStats shows it.

File modes: the store's files and directories are 0600/0700 whatever the umask (KV caches hold
the content of prompts). Readonly openers change nothing.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass

import lmdb

from tqstore.errors import Unavailable
from tqstore.ssd import payload as pl
from tqstore.ssd.index import Index
from tqstore.ssd.nospace import RESERVE_FILE, SpaceReserve
from tqstore.ssd.probe import probe_index
from tqstore.ssd.rebuild import RebuildOutcome, rebuild_index

log = logging.getLogger("tqstore.ssd.opening")
FILE_MODE = 0o600
DIR_MODE = 0o700
REBUILDS_FILE = "rebuilds.json"
DAMAGED_PREFIX = "index.damaged-"


class IndexDamaged(Unavailable):
    """A readonly opener found the index damaged (only the writer may rebuild it)."""


@dataclass(frozen=True)
class RebuildHistory:
    """Every rebuild of this store's index (persisted in rebuilds.json)."""

    index_rebuilds: int = 0
    rebuild_recovered_blocks: int = 0
    rebuild_lost_blocks: int = 0
    last_rebuild_time_ns: int = 0
    last_rebuild_reason: str = ""
    last_rebuild_seconds: float = 0.0


def read_history(path: str) -> RebuildHistory:
    """The rebuild history; a missing or damaged file reads as no rebuilds (never raises)."""
    try:
        with open(os.path.join(path, REBUILDS_FILE)) as f:
            d = json.load(f)
        return RebuildHistory(int(d["index_rebuilds"]), int(d["rebuild_recovered_blocks"]),
                              int(d["rebuild_lost_blocks"]), int(d["last_rebuild_time_ns"]),
                              str(d["last_rebuild_reason"]), float(d["last_rebuild_seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return RebuildHistory()


def _record_rebuild(path: str, outcome: RebuildOutcome) -> None:
    h = read_history(path)
    new = RebuildHistory(h.index_rebuilds + 1, h.rebuild_recovered_blocks + outcome.recovered,
                         h.rebuild_lost_blocks + outcome.lost, outcome.when, outcome.reason,
                         round(outcome.seconds, 3))
    write_private(os.path.join(path, REBUILDS_FILE), json.dumps(new.__dict__).encode())


def write_private(final: str, data: bytes) -> None:
    """Write a small file atomically (temp name, fsync, rename), mode 0600."""
    tmp = f"{final}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)


def make_private(path: str) -> None:
    """0700 on the store's directories, 0600 on its files (not recursive into damaged copies)."""
    for d in (path, os.path.join(path, "blocks"), os.path.join(path, "index")):
        if os.path.isdir(d):
            os.chmod(d, DIR_MODE)
    index_dir = os.path.join(path, "index")
    for name in ("data.mdb", "lock.mdb"):
        f = os.path.join(index_dir, name)
        if os.path.isfile(f):
            os.chmod(f, FILE_MODE)
    for name in ("writer.lock", "store.id", REBUILDS_FILE, RESERVE_FILE):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            os.chmod(f, FILE_MODE)


def _has_payloads(blocks_dir: str) -> bool:
    return any(n.endswith(".blk") for n in os.listdir(blocks_dir))


def _move_aside(path: str) -> None:
    """index -> index.damaged-<UTC time>; older damaged copies are removed (keep one)."""
    index_dir = os.path.join(path, "index")
    for name in os.listdir(path):
        if name.startswith(DAMAGED_PREFIX):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)
    if os.path.isdir(index_dir) and not os.path.islink(index_dir):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        os.rename(index_dir, os.path.join(path, DAMAGED_PREFIX + stamp))
    elif os.path.lexists(index_dir):
        os.unlink(index_dir)


def _open_sound(index_dir: str, map_size: int) -> tuple[Index | None, str]:
    """The index opened if its walk passes and LMDB accepts it, else (None, why)."""
    probe = probe_index(index_dir, lock=False)
    if not probe.ran:  # no evidence either way: refuse rather than rebuild (or risk a signal)
        raise Unavailable(f"cannot verify the store index: {probe.reason}")
    if not probe.ok:
        return None, probe.reason
    try:
        return Index.open(index_dir, map_size, False), ""
    except lmdb.Error as exc:
        first = f"{type(exc).__name__}: {exc}"
    try:  # the data file walked clean, so suspect the lock file (see the module docstring)
        os.unlink(os.path.join(index_dir, "lock.mdb"))
    except FileNotFoundError:
        pass
    try:
        idx = Index.open(index_dir, map_size, False)
        log.warning("index lock file was unusable (%s); recreated it", first)
        return idx, ""
    except lmdb.Error as exc:
        return None, f"LMDB refuses to open the index: {type(exc).__name__}: {exc}"


def open_writer_index(path: str, map_size: int) -> tuple[Index, RebuildOutcome | None]:
    """Open (or create, or rebuild) the index of the store at path for its writer. The caller
    holds writer.lock. Raises Unavailable only when even a fresh index cannot be created."""
    index_dir = os.path.join(path, "index")
    blocks_dir = os.path.join(path, "blocks")
    if not os.path.lexists(index_dir) and not _has_payloads(blocks_dir):
        reason = ""  # a new store
    elif not os.path.isfile(os.path.join(index_dir, "data.mdb")):
        reason = "index missing"
    else:
        idx, reason = _open_sound(index_dir, map_size)
        if idx is not None:
            return idx, None
    if reason:
        log.warning("store index at %s is damaged or missing (%s): rebuilding from payload files",
                    index_dir, reason)
        _move_aside(path)
    try:
        os.makedirs(index_dir, mode=DIR_MODE, exist_ok=True)
        idx = Index.open(index_dir, map_size, False)
    except (lmdb.Error, OSError) as exc:
        raise Unavailable(f"cannot create the store index at {index_dir}: {exc}") from exc
    if not reason:
        return idx, None
    outcome = rebuild_index(idx, blocks_dir, reason)
    _record_rebuild(path, outcome)
    return idx, outcome


def open_reader_index(path: str, map_size: int) -> Index:
    """Open the index readonly after a walk in a child (a damaged index is a clear Unavailable,
    never a signal in this process). Changes nothing on disk."""
    index_dir = os.path.join(path, "index")
    probe = probe_index(index_dir, lock=True)
    if not probe.ran:
        raise Unavailable(f"cannot verify the store index: {probe.reason}")
    if not probe.ok:
        raise IndexDamaged(f"store index at {index_dir} is damaged ({probe.reason}); the writer "
                          f"rebuilds it from the payload files when it opens (tqstore serve, or "
                          f"tqstore check --repair with the daemon stopped)")
    try:
        return Index.open(index_dir, map_size, True)
    except lmdb.Error as exc:
        raise Unavailable(f"cannot open store index: {exc}") from exc


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


def prepare_writer(path: str, idx: Index, reserve: SpaceReserve) -> tuple[int, str]:
    """After the index opened: private modes, the space reserve, crash leftovers removed, a
    fresh store id. Returns (orphans removed, store id)."""
    make_private(path)
    reserve.ensure()
    return remove_orphans(idx, os.path.join(path, "blocks")), write_store_id(path)


def write_store_id(path: str) -> str:
    """A random id in <path>/store.id (replaced atomically). The daemon sends it with Locate; a
    client that reads the same id there shares the daemon's file system (tqstore/direct_read.py)."""
    store_id = secrets.token_hex(16)
    try:
        write_private(os.path.join(path, "store.id"), store_id.encode())
    except OSError as exc:  # e.g. a full disk: serve anyway, same-host reads stay off
        log.warning("cannot write %s/store.id (%s): same-host direct reads are off", path, exc)
        return ""
    return store_id
