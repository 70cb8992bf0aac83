"""Walk an LMDB index in a child process before trusting it in this one.

Why a child: LMDB reads pages through mmap, so a damaged page pointer in index/data.mdb is a
SIGBUS or SIGSEGV in whatever process follows it, not an exception (found by an independent
tester: one flipped byte killed both `tqstore serve` and `tqstore check`). The child
(`python -m tqstore.ssd.probe INDEX_DIR [--lock]`) opens the environment readonly, opens every
named database and walks every key and value, the pages a later open will touch. A signal, a
non-zero exit or a timeout means "structurally damaged": the writer then rebuilds the index from
the payload files (rebuild.py), a readonly opener reports it (store.py, cli/check.py).

What counts as structural (exit 3): a named database missing, keys out of order, a key of the
wrong length, a walk that disagrees with the database's entry count, or any lmdb.Error. A record
whose frame CRC fails is NOT structural: the store's readers quarantine such a record (a counted
miss), as before; the child only counts them.

The free-page list is not reachable through py-lmdb's readers, so a `--write` probe (the writer's,
and `check`'s when it may write the index) also runs one write transaction that puts and deletes
a key in the meta database and is then aborted: page allocation reads the free list, so a broken
one fails here (MDB_CORRUPTED: a reviewer zeroed its root page and every put failed while the walk
passed) and nothing on disk changes. The lock file is LMDB's: a damaged one is reinitialised by
the first opener (it takes the lock file exclusively), so it is not probed.

Inconclusive runs: a probe killed by SIGKILL, SIGTERM or SIGINT (the OOM killer, a stop of the
service, Ctrl-C) proves nothing about the index, so it is reported as not run (`ran=False`), not
as damage: moving a sound index aside would cost a rebuild for nothing. The timeout scales with
data.mdb's size (a cold walk reads all of it); a walk that runs past it is taken as damage (a page
cycle loops forever).

Cost (measured on the 2-core dev box, warm page cache): 0.21 s for an index of 2,048 blocks,
0.37 s for 100,000 blocks (203k entries, 69 MiB data.mdb); interpreter start and imports are
most of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import lmdb

from tqstore.ssd.records import KIND_BLOCK, KIND_NAMESPACE, RecordError, check_frame

EXIT_OK = 0
EXIT_LMDB_ERROR = 2
EXIT_STRUCTURE = 3
_PROBE_KEY = b"\x00probe"  # put and deleted by the write probe, never committed
_INCONCLUSIVE = {signal.SIGKILL, signal.SIGTERM, signal.SIGINT}
_BASE_TIMEOUT_S = 120.0
_SLOWEST_READ_BPS = 20 << 20  # a slow disk, cold: the walk may read all of data.mdb
# (database, dupsort, key length or 0 for any, value frame kind or 0 for none)
_DATABASES = (
    (b"blocks", False, 32, KIND_BLOCK),
    (b"children", True, 32, 0),
    (b"leaves", False, 40, 0),
    (b"namespaces", False, 32, KIND_NAMESPACE),
    (b"quarantine", False, 0, 0),
    (b"meta", False, 0, 0),
)


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str  # why it is not ok ("" when ok)
    seconds: float
    entries: int = 0
    bad_frames: int = 0
    ran: bool = True  # False: the child itself could not run (not evidence of damage)
    killed: bool = False  # the child was killed from outside (see the module docstring)


def _child_env() -> dict[str, str]:
    """The child imports this package from where this process did, whatever the cwd."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _walk_db(txn: lmdb.Transaction, db, name: bytes, key_len: int, kind: int) -> tuple[int, int]:
    """(entries, bad frames) of one database; raises ValueError on structural damage."""
    count = bad = 0
    prev: bytes | None = None
    for k, v in txn.cursor(db=db):
        k = bytes(k)
        if key_len and len(k) != key_len:
            raise ValueError(f"{name.decode()}: key of length {len(k)}")
        if prev is not None and k < prev:
            raise ValueError(f"{name.decode()}: keys out of order")
        prev = k
        if kind:
            try:
                check_frame(kind, v)
            except RecordError:
                bad += 1
        else:
            len(v)  # touch the value's pages
        count += 1
    if count != txn.stat(db)["entries"]:
        raise ValueError(f"{name.decode()}: walked {count} entries, header says "
                         f"{txn.stat(db)['entries']}")
    return count, bad


def walk(index_dir: str, lock: bool) -> dict:
    """The child's work: open readonly and walk everything. Raises on any damage."""
    env = lmdb.open(index_dir, readonly=True, lock=lock, subdir=True, max_dbs=8,
                    readahead=False, create=False)
    try:
        entries = bad = 0
        with env.begin() as txn:
            names = {bytes(k) for k, _ in txn.cursor()}
        for name, dupsort, key_len, kind in _DATABASES:
            if name not in names:
                raise ValueError(f"database {name.decode()} missing")
            db = env.open_db(name, dupsort=dupsort, create=False)
            with env.begin() as txn:
                n, b = _walk_db(txn, db, name, key_len, kind)
            entries, bad = entries + n, bad + b
        return {"entries": entries, "bad_frames": bad}
    finally:
        env.close()


def write_probe(index_dir: str) -> None:
    """One aborted write txn: allocating a page reads the free list (see the module docstring)."""
    env = lmdb.open(index_dir, lock=True, subdir=True, max_dbs=8, readahead=False, create=False)
    try:
        meta = env.open_db(b"meta", create=False)
        txn = env.begin(write=True)
        try:
            txn.put(_PROBE_KEY, b"x" * 64, db=meta)
            txn.delete(_PROBE_KEY, db=meta)
        finally:
            txn.abort()
    finally:
        env.close()


def probe_timeout(index_dir: str) -> float:
    """120 s plus the time to read data.mdb at a slow disk's cold rate."""
    try:
        size = os.path.getsize(os.path.join(index_dir, "data.mdb"))
    except OSError:
        size = 0
    return _BASE_TIMEOUT_S + size / _SLOWEST_READ_BPS


def probe_index(index_dir: str, *, lock: bool, write: bool = False,
                timeout_s: float | None = None) -> ProbeResult:
    """Run `walk` (and with write=True `write_probe`) in a child process; never raises for a
    damaged index."""
    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(index_dir, "data.mdb")):
        return ProbeResult(False, "index data file missing", 0.0)
    timeout_s = probe_timeout(index_dir) if timeout_s is None else timeout_s
    cmd = [sys.executable, "-m", "tqstore.ssd.probe", index_dir] + (["--lock"] if lock else [])
    cmd += ["--write"] if write else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, env=_child_env())
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"index walk timed out after {timeout_s:.0f} s",
                           time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if -proc.returncode in _INCONCLUSIVE:
        return ProbeResult(False, f"index walk was killed (signal {-proc.returncode})", seconds,
                           ran=False, killed=True)
    if proc.returncode < 0:
        return ProbeResult(False, f"index walk died of signal {-proc.returncode}", seconds)
    lines = proc.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        out = {}
    if proc.returncode not in (EXIT_OK, EXIT_LMDB_ERROR, EXIT_STRUCTURE):
        why = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return ProbeResult(False, f"index walk could not run (exit {proc.returncode}): {why}",
                           seconds, ran=False)
    if proc.returncode != EXIT_OK:
        return ProbeResult(False, f"index walk failed: {out.get('error', '?')}", seconds)
    return ProbeResult(True, "", seconds, int(out.get("entries", 0)), int(out.get("bad_frames", 0)))


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print("usage: python -m tqstore.ssd.probe INDEX_DIR [--lock] [--write]", file=sys.stderr)
        return 64
    try:
        out = walk(argv[0], lock="--lock" in argv[1:])
        if "--write" in argv[1:]:
            write_probe(argv[0])
    except lmdb.Error as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return EXIT_LMDB_ERROR
    except Exception as exc:  # noqa: BLE001  (anything else the walk hits is damage too)
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return EXIT_STRUCTURE
    print(json.dumps(out))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
