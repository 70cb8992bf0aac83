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

What the walk does not cover: LMDB's free-page list (not reachable through py-lmdb) and the lock
file while another process holds it. The writer holds writer.lock, so it removes a lock file
that LMDB refuses and opens again (opening.py).

Cost (measured on the 2-core dev box, warm page cache): 0.21 s for an index of 2,048 blocks,
0.37 s for 100,000 blocks (203k entries, 69 MiB data.mdb); interpreter start and imports are
most of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import lmdb

from tqstore.ssd.records import KIND_BLOCK, KIND_NAMESPACE, RecordError, check_frame

EXIT_OK = 0
EXIT_LMDB_ERROR = 2
EXIT_STRUCTURE = 3
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


def probe_index(index_dir: str, *, lock: bool, timeout_s: float = 120.0) -> ProbeResult:
    """Run `walk` in a child process; never raises for a damaged index."""
    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(index_dir, "data.mdb")):
        return ProbeResult(False, "index data file missing", 0.0)
    cmd = [sys.executable, "-m", "tqstore.ssd.probe", index_dir] + (["--lock"] if lock else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, env=_child_env())
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"index walk timed out after {timeout_s:.0f} s",
                           time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
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
        print("usage: python -m tqstore.ssd.probe INDEX_DIR [--lock]", file=sys.stderr)
        return 64
    try:
        out = walk(argv[0], lock="--lock" in argv[1:])
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
