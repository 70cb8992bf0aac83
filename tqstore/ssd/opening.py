"""What a writer does when it opens a store (tqstore/ssd/store.py), before it serves anything:
make sure the index is sound (or rebuild it from the payload files), remove crash leftovers, make
the store's files private, and give the store a fresh identity for same-host readers.

Opening the index (issue 17: damage to any file of the store must not crash anything, and
nothing acknowledged may be lost):
1. probe.py walks the index in a child process, and for the writer also runs one aborted write
   txn (a broken free list fails only there); a signal, error or timeout there means damage. A
   probe killed from outside (SIGKILL/SIGTERM/SIGINT) is no evidence: the index opens as is.
2. A daemon that finds the index damaged while serving (a put failing MDB_CORRUPTED, ...) calls
   mark_index_suspect before it exits for a restart: the marker file index.suspect makes the
   next writer open rebuild even if the probe passes, so the restart does not reopen the same
   broken index forever. `check` reports the marker.
3. A damaged, missing or marked index is moved aside (index.damaged-<UTC time>; only the newest
   such copy is kept, for forensics) and rebuilt from the payload files (rebuild.py) into
   index.rebuilding/, which is renamed to index/ only after the last commit and an fsync of the
   store directory. So index/ is always complete: a rebuild killed midway (SIGTERM from systemd,
   OOM, Ctrl-C) leaves index.rebuilding/, which the next open discards before rebuilding again.
   This matters because remove_orphans deletes payload files the index lacks: run against a
   partial index it would delete the store (a reviewer lost 20,000 of 20,000 blocks that way).
4. The lock file is never deleted: a reader such as `tqstore inspect` may hold it, and a new one
   would give the writer a private reader table. One the write probe cannot use (MDB_INVALID
   while a reader holds it), or one that is not a regular file, is damage (3): the index moves
   aside whole, with the reader's lock file, so the writer's new index is another environment.
   If LMDB refuses an index whose probe passed, the writer raises Unavailable.
The outcome of each rebuild is added to rebuilds.json beside the index (outside it: the next
damage must not erase the history); StoreStats shows it.

File modes: the store's files and directories are 0600/0700 whatever the umask (KV caches hold
the content of prompts), set before a rebuild reads blocks/ so that nobody else can plant files
during it. Only entries owned by the effective uid are changed, never through a symlink (a
symlinked rebuilds.json must not make root chmod /etc/passwd). Readonly openers change nothing.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass

import lmdb

from tqstore.errors import Unavailable
from tqstore.ssd import payload as pl
from tqstore.ssd.index import Index
from tqstore.ssd.nospace import RESERVE_FILE, SpaceReserve
from tqstore.ssd.payload import DIR_MODE, FILE_MODE
from tqstore.ssd.probe import ProbeResult, probe_index
from tqstore.ssd.rebuild import RebuildOutcome, rebuild_index
from tqstore.ssd.selfdesc import entry_untrusted, read_description

log = logging.getLogger("tqstore.ssd.opening")
REBUILDS_FILE = "rebuilds.json"
DAMAGED_PREFIX = "index.damaged-"
REBUILDING_DIR = "index.rebuilding"  # a rebuild in progress; never trusted (see the docstring)
SUSPECT_FILE = "index.suspect"  # written by mark_index_suspect; forces the next writer to rebuild


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
    """Write a small file atomically, mode 0600 (payload.write_atomically)."""
    pl.write_atomically(final, [data])


def _chmod_own(path: str, mode: int, want_dir: bool) -> None:
    """chmod path if it is ours and of the expected type; never follows a symlink."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    is_dir = stat.S_ISDIR(st.st_mode)
    if st.st_uid != os.geteuid() or is_dir != want_dir or not (is_dir or stat.S_ISREG(st.st_mode)):
        log.warning("store entry %s is not ours or not a plain %s: left as is", path,
                    "directory" if want_dir else "file")
        return
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode, follow_symlinks=False) if not is_dir else os.chmod(path, mode)


def make_private(path: str) -> None:
    """0700 on the store's directories, 0600 on its files (not recursive into damaged copies).
    Only entries owned by the effective uid, never through a symlink (see the docstring)."""
    for d in (path, os.path.join(path, "blocks"), os.path.join(path, "index")):
        _chmod_own(d, DIR_MODE, True)
    for name in ("data.mdb", "lock.mdb"):
        _chmod_own(os.path.join(path, "index", name), FILE_MODE, False)
    for name in ("writer.lock", "store.id", REBUILDS_FILE, RESERVE_FILE, SUSPECT_FILE):
        _chmod_own(os.path.join(path, name), FILE_MODE, False)


def mark_index_suspect(store_path: str, reason: str) -> None:
    """Record that the writer found the index damaged while serving (e.g. a put failed with
    MDB_CORRUPTED): the next writer open moves the index aside and rebuilds it from the payload
    files, whatever the probe says. Called by the daemon before it exits for a restart. Never
    raises (best effort on a full or failing disk: an empty marker is enough)."""
    final = os.path.join(store_path, SUSPECT_FILE)
    try:
        write_private(final, reason.encode("utf-8", "replace")[:4096])
    except OSError:
        try:  # no room for data: an empty file needs only an inode
            os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE))
        except OSError as exc:
            log.error("cannot mark the index of %s for a rebuild: %s", store_path, exc)
            return
    try:
        pl.fsync_dir(store_path)
    except OSError:
        pass
    log.error("index of %s marked for a rebuild at the next open: %s", store_path, reason)


def suspect_reason(store_path: str) -> str:
    """Why the index was marked damaged ("" if it was not)."""
    final = os.path.join(store_path, SUSPECT_FILE)
    if not os.path.lexists(final):
        return ""
    try:
        with open(final, "rb") as f:
            why = f.read(4096).decode("utf-8", "replace").strip()
    except OSError:
        why = ""
    return why or "marked damaged while serving"


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
    """The index opened if its probe passes, else (None, why); Unavailable if it cannot be
    verified or LMDB refuses an index that walked clean (see the module docstring)."""
    lock_file = os.path.join(index_dir, "lock.mdb")
    if os.path.lexists(lock_file) and entry_untrusted(lock_file):
        return None, f"index lock file is {entry_untrusted(lock_file)}"
    probe = probe_index(index_dir, lock=False, write=True)
    if probe.killed:  # no evidence either way: open as is (an external kill is not damage)
        log.warning("store index at %s not verified (%s): opening it unchecked", index_dir,
                    probe.reason)
    elif not probe.ran:  # no evidence: refuse rather than rebuild (or risk a signal)
        raise Unavailable(f"cannot verify the store index: {probe.reason}")
    elif not probe.ok:
        return None, probe.reason
    try:
        return Index.open(index_dir, map_size, False), ""
    except lmdb.Error as exc:
        raise Unavailable(f"LMDB refuses to open the store index at {index_dir} although it walked "
                          f"clean ({type(exc).__name__}: {exc}); if no other process uses the "
                          f"store, move {index_dir} aside and the next open rebuilds it") from exc


def _discard_interrupted(path: str) -> None:
    """Remove index.rebuilding/ left by a rebuild that was killed (never trusted)."""
    tmp = os.path.join(path, REBUILDING_DIR)
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        log.warning("discarding %s: an interrupted index rebuild (it restarts)", tmp)
        shutil.rmtree(tmp)
    elif os.path.lexists(tmp):
        os.unlink(tmp)


def _rebuild(path: str, map_size: int, reason: str) -> RebuildOutcome:
    """Rebuild into index.rebuilding/, then rename it to index/ (see the module docstring)."""
    tmp = os.path.join(path, REBUILDING_DIR)
    try:
        os.makedirs(tmp, mode=DIR_MODE)
        idx = Index.open(tmp, map_size, False)
    except (lmdb.Error, OSError) as exc:
        raise Unavailable(f"cannot create a store index at {tmp}: {exc}") from exc
    try:
        outcome = rebuild_index(idx, os.path.join(path, "blocks"), reason)
        idx.env.sync(True)
    finally:
        idx.env.close()
    os.rename(tmp, os.path.join(path, "index"))
    pl.fsync_dir(path)  # the rename is durable before anything trusts index/
    return outcome


def open_writer_index(path: str, map_size: int) -> tuple[Index, RebuildOutcome | None]:
    """Open (or create, or rebuild) the index of the store at path for its writer. The caller
    holds writer.lock. Raises Unavailable only when even a fresh index cannot be created."""
    index_dir = os.path.join(path, "index")
    blocks_dir = os.path.join(path, "blocks")
    _discard_interrupted(path)
    suspect = suspect_reason(path)
    if not os.path.lexists(index_dir) and not _has_payloads(blocks_dir):
        reason = ""  # a new store: an empty index is complete
    elif suspect:
        reason = f"marked damaged while serving: {suspect}"
    elif not os.path.isfile(os.path.join(index_dir, "data.mdb")):
        reason = "index missing"
    else:
        idx, reason = _open_sound(index_dir, map_size)
        if idx is not None:
            return idx, None
    outcome = None
    if reason:
        log.warning("store index at %s is damaged or missing (%s): rebuilding from payload files",
                    index_dir, reason)
        make_private(path)  # before the scan: nobody else may plant files during it
        _move_aside(path)
        outcome = _rebuild(path, map_size, reason)
        _record_rebuild(path, outcome)
    if suspect:
        os.unlink(os.path.join(path, SUSPECT_FILE))  # only after index/ is complete again
    try:
        os.makedirs(index_dir, mode=DIR_MODE, exist_ok=True)
        return Index.open(index_dir, map_size, False), outcome
    except (lmdb.Error, OSError) as exc:
        raise Unavailable(f"cannot open the store index at {index_dir}: {exc}") from exc


def open_reader_index(path: str, map_size: int) -> Index:
    """Open the index readonly after a walk in a child (a damaged index is a clear Unavailable,
    never a signal in this process). Changes nothing on disk."""
    index_dir = os.path.join(path, "index")
    _raise_if_damaged(index_dir, suspect_reason(path), probe_index(index_dir, lock=True))
    try:
        return Index.open(index_dir, map_size, True)
    except lmdb.Error as exc:
        raise Unavailable(f"cannot open store index: {exc}") from exc


def verify_for_check(path: str) -> None:
    """What `check` adds to a readonly open: the marker and, when this user may write the index,
    the write probe (an aborted txn: changes nothing) that finds a broken free list."""
    index_dir = os.path.join(path, "index")
    data = os.path.join(index_dir, "data.mdb")
    writable = os.access(data, os.W_OK) and os.access(index_dir, os.W_OK)
    probe = probe_index(index_dir, lock=True, write=True) if writable else None
    _raise_if_damaged(index_dir, suspect_reason(path), probe)


def _raise_if_damaged(index_dir: str, suspect: str, probe: ProbeResult | None) -> None:
    why = f"marked damaged while serving: {suspect}" if suspect else ""
    if not why and probe is not None:
        if not probe.ran:
            raise Unavailable(f"cannot verify the store index: {probe.reason}")
        why = "" if probe.ok else probe.reason
    if why:
        raise IndexDamaged(f"store index at {index_dir} is damaged ({why}); the writer rebuilds "
                           f"it from the payload files when it opens (tqstore serve, or tqstore "
                           f"check --repair with the daemon stopped)")


def remove_orphans(idx: Index, blocks_dir: str) -> int:
    """Crash cleanup: temp files and payload files with no index record (a put that crashed
    between the file's rename and the index commit was never acknowledged). Runs only against a
    complete index (see the module docstring). Never touches what is not ours (entry_untrusted)
    and keeps a file it cannot read (EIO, EMFILE: no proof it is a crash leftover)."""
    removed = 0
    with idx.env.begin(db=idx.blocks) as txn:
        for name in os.listdir(blocks_dir):
            path = os.path.join(blocks_dir, name)
            if entry_untrusted(path):
                continue
            stem, _, ext = name.partition(".")
            try:
                key = bytes.fromhex(stem) if ext == "blk" else b""
            except ValueError:
                key = b""
            if len(key) == 32 and (txn.get(key) is not None or not _safe_to_drop(path, key)):
                continue
            try:
                os.unlink(path)
                removed += 1
            except OSError as exc:
                log.warning("cannot remove crash leftover %s: %s", path, exc)
    if removed:
        pl.fsync_dir(blocks_dir)
    return removed


def _safe_to_drop(path: str, key: bytes) -> bool:
    """An orphan payload file may go unless reading it fails for a reason other than damage."""
    try:
        read_description(path, key)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("orphan payload %s kept, unreadable: %s", path, exc)
        return False
    except ValueError:
        pass
    return True


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
