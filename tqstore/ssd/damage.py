"""Damage harness: break one file of a real store, then prove nothing crashes or lies.

A round copies a small base store, applies one damage (a file of the store x a kind: flip
random bytes, zero a range, truncate, delete; or delete the whole index directory) and then, each
in a child process so that a signal is seen as a failure rather than killing the harness:
1. `tqstore check --json` readonly (the way an operator would run it beside a stopped daemon):
   must exit 0 or 1 with a JSON report, never a signal or a traceback;
2. the writer opens the store (rebuilding the index if it must), looks up and gets every chain,
   compares every served block bitwise with its expected content (a function of its hash, as in
   soak.py), then runs check and, if that is not clean, check --repair, which must be clean.

Expectations checked per round: no crash, no wrong byte served, and every block whose own payload
file and ancestors' files were untouched is still served. A record whose CRC fails inside an index
that survived is healed from its intact payload file (heal.py): served, so not a loss, and counted
as `healed`. What data.mdb damage can still cost with intact files (a flipped key, so the record
is simply absent and its subtree dangling; damage that check --repair resolves by quarantine) is
a real loss, counted apart as lost_with_intact_files and listed per round, not a failure of the
round.

Used by tests/ssd/test_index_damage.py and tools/store_damage.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tqstore.prefix_hash import Namespace
from tqstore.ssd.chain import chain_hashes, token_array
from tqstore.ssd.probe import _child_env
from tqstore.ssd.soak import expected_payload

DAMAGE_NAMESPACE = Namespace("damage-model", num_layers=2, num_kv_heads=2, head_dim=32,
                             block_size=16)
TARGETS = ("data.mdb", "lock.mdb", "payload", "store.id", "writer.lock", "index/")
KINDS = ("flip", "zero", "truncate", "delete")
_CHILD_TIMEOUT_S = 180


def family_tokens(family: int, chain: int) -> np.ndarray:
    """A prompt family; families share their first block in pairs (the index has branches)."""
    bs = DAMAGE_NAMESPACE.block_size
    toks = np.random.default_rng(family).integers(0, 49152, chain * bs)
    toks[:bs] = np.random.default_rng(10_000 + family // 2).integers(0, 49152, bs)
    return token_array(toks)


def build_store(path: str, families: int, chain: int) -> None:
    from tqstore.ssd.store import BlockStore

    ns = DAMAGE_NAMESPACE
    with BlockStore(path) as store:
        for fam in range(families):
            toks = family_tokens(fam, chain)
            hashes = chain_hashes(ns, toks)
            have = store.lookup(ns, toks)
            store.put_blocks(ns, toks, have, [expected_payload(ns, h) for h in hashes[have:]])
            for i in range(0, chain, 2):  # some access-time writes, as a daemon would
                store.get_block(ns, toks, i)


def _damage_file(path: str, kind: str, rnd: random.Random) -> None:
    size = os.path.getsize(path)
    if kind == "delete":
        os.unlink(path)
    elif kind == "truncate":
        os.truncate(path, rnd.randrange(size) if size else 0)
    elif size:
        with open(path, "r+b") as f:
            if kind == "flip":
                for _ in range(rnd.randint(1, 8)):
                    at = rnd.randrange(size)
                    f.seek(at)
                    b = f.read(1)[0]
                    f.seek(at)
                    f.write(bytes([b ^ (1 << rnd.randrange(8))]))
            else:  # zero
                at = rnd.randrange(size)
                f.seek(at)
                f.write(bytes(min(rnd.randint(1, 4096), size - at)))


def apply_damage(store: str, target: str, kind: str, rnd: random.Random) -> set[str]:
    """Damage one file (or the index dir); returns the payload file names touched."""
    if target == "index/":
        shutil.rmtree(os.path.join(store, "index"))
        return set()
    if target == "payload":
        names = sorted(os.listdir(os.path.join(store, "blocks")))
        name = rnd.choice(names)
        _damage_file(os.path.join(store, "blocks", name), kind, rnd)
        return {name}
    where = os.path.join(store, "index", target) if target.endswith(".mdb") else os.path.join(store, target)
    if os.path.exists(where):
        _damage_file(where, kind, rnd)
    return set()


def serve_all(path: str, families: int, chain: int) -> dict:
    """The writer child's work: open, lookup/get every chain, verify bytes, check (+repair)."""
    import tqstore  # noqa: F401  (entry point convention)
    from tqstore.errors import NotFound
    from tqstore.ssd.store import BlockStore

    ns = DAMAGE_NAMESPACE
    served: list[str] = []
    wrong = 0
    with BlockStore(path) as store:
        rebuild = store.rebuild
        for fam in range(families):
            toks = family_tokens(fam, chain)
            hashes = chain_hashes(ns, toks)
            for i in range(store.lookup(ns, toks)):
                try:
                    got = store.get_block(ns, toks, i)
                except NotFound:
                    break
                want = expected_payload(ns, hashes[i])
                if not (np.array_equal(got.keys.view(np.uint16), want.keys.view(np.uint16)) and
                        np.array_equal(got.values.view(np.uint16), want.values.view(np.uint16))):
                    wrong += 1
                    break
                served.append(hashes[i].hex())
        healed = store.stats().healed_records
        first = store.check()
        repaired_ok = first.ok or (store.check(repair=True).repaired and store.check().ok)
    return {"served": sorted(set(served)), "wrong": wrong, "check_ok": first.ok, "healed": healed,
            "repaired_ok": repaired_ok,
            "rebuild": None if rebuild is None else
            {"reason": rebuild.reason, "recovered": rebuild.recovered, "lost": rebuild.lost}}


def _run_child(args: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=_CHILD_TIMEOUT_S, env=_child_env(), stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


@dataclass
class DamageReport:
    rounds: int = 0
    by_target_kind: Counter = field(default_factory=Counter)
    rebuilds: int = 0
    recovered: int = 0  # blocks re-indexed by rebuilds
    lost: int = 0  # blocks no longer served after the damage (all causes)
    healed: int = 0  # damaged index records rewritten from intact payload files: not lost
    # of the lost: blocks whose payload file (and every ancestor's) was intact, lost because
    # data.mdb damage removed or quarantined their index record or an ancestor's, which no heal
    # could undo. A loss the rebuild could have prevented: reported as such, never hidden.
    lost_with_intact_files: int = 0
    rounds_losing_intact_files: list[str] = field(default_factory=list)
    wrong_bytes_served: int = 0
    crashes: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.crashes and not self.wrong_bytes_served


def _expected_served(families: int, chain: int, touched: set[str]) -> set[str]:
    """Blocks whose own file and every ancestor's file were untouched."""
    out: set[str] = set()
    for fam in range(families):
        for h in chain_hashes(DAMAGE_NAMESPACE, family_tokens(fam, chain)):
            if h.hex() + ".blk" in touched:
                break
            out.add(h.hex())
    return out


def run_round(base: str, work: str, target: str, kind: str, rnd: random.Random,
              families: int, chain: int, report: DamageReport) -> None:
    store = os.path.join(work, "store")
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(base, store)
    touched = apply_damage(store, target, kind, rnd)
    tag = f"round {report.rounds} {target}/{kind}"
    report.rounds += 1
    report.by_target_kind[f"{target}/{kind}"] += 1
    rc, out, err = _run_child(["-m", "tqstore.cli", "check", store, "--json"])
    if rc < 0 or rc not in (0, 1) or "Traceback" in err:
        report.crashes += 1
        report.failures.append(f"{tag}: readonly check rc={rc}: {err.strip()[-300:]}")
    rc, out, err = _run_child(["-m", "tqstore.ssd.damage", "child", store, str(families), str(chain)])
    if rc != 0:
        report.crashes += 1
        report.failures.append(f"{tag}: writer child rc={rc}: {err.strip()[-300:]}")
        return
    res = json.loads(out.strip().splitlines()[-1])
    report.wrong_bytes_served += res["wrong"]
    report.healed += res["healed"]
    if res["rebuild"] is not None:
        report.rebuilds += 1
        report.recovered += res["rebuild"]["recovered"]
    all_blocks = _expected_served(families, chain, set())
    want = _expected_served(families, chain, touched)
    got = set(res["served"])
    report.lost += len(all_blocks - got)
    missing = want - got
    if missing and target == "data.mdb" and res["rebuild"] is None:
        report.lost_with_intact_files += len(missing)
        report.rounds_losing_intact_files.append(f"{tag}: {len(missing)} blocks")
    elif missing:
        report.failures.append(f"{tag}: {len(missing)} blocks with untouched files not served")
    if not res["repaired_ok"]:
        report.failures.append(f"{tag}: check not clean after repair")


def run_damage(work: str, rounds: int, seed: int, families: int = 6, chain: int = 6,
               cases: list[tuple[str, str]] | None = None,
               targets: tuple[str, ...] = TARGETS) -> DamageReport:
    """`rounds` seeded rounds over `targets` (or exactly `cases`, a list of (target, kind))."""
    rnd = random.Random(seed)
    base = os.path.join(work, "base")
    build_store(base, families, chain)
    report = DamageReport()
    plan = cases or [("index/", "delete") if (t := rnd.choice(targets)) == "index/" else
                     (t, rnd.choice(KINDS)) for _ in range(rounds)]
    for target, kind in plan:
        run_round(base, work, target, kind, rnd, families, chain, report)
    return report


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "child":
        print(json.dumps(serve_all(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        sys.exit("usage: python -m tqstore.ssd.damage child PATH FAMILIES CHAIN")
