"""Crash-consistency harness: a writer process killed with SIGKILL at random moments.

The writer (`python -m tqstore.ssd.soak writer PATH SEED`) extends prompt chains with put_blocks
and prints "ACK family first count" only after put_blocks returned (i.e. after the block is durable).
The parent kills it at a random moment, reopens the store (which removes crash orphans) and
asserts: every acknowledged block reads back bitwise equal to its expected content, lookup covers
every acknowledged prefix, no temp file survives, and `check` finds nothing. Payload content is a
function of the block hash, so any process can recompute what a block must hold.

Used by tests/ssd/test_crash.py (>= 20 kills) and tools/ssd_crash_soak.py (many more).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from tqstore.blocks import BlockPayload
from tqstore.prefix_hash import Namespace
from tqstore.ssd.chain import chain_hashes, token_array
from tqstore.config import StoreConfig

SOAK_NAMESPACE = Namespace("soak-model", num_layers=8, num_kv_heads=4, head_dim=64, block_size=32)
MAX_BLOCKS = 24
FAMILIES = 12


def family_tokens(family: int) -> np.ndarray:
    """Token ids of a prompt family; families share their first block in pairs (branching)."""
    rng = np.random.default_rng(family)
    toks = rng.integers(0, 49152, MAX_BLOCKS * SOAK_NAMESPACE.block_size)
    toks[: SOAK_NAMESPACE.block_size] = np.random.default_rng(10_000 + family // 2).integers(
        0, 49152, SOAK_NAMESPACE.block_size)
    return token_array(toks)


def expected_payload(ns: Namespace, block_hash: bytes) -> BlockPayload:
    """The content a block must hold: a function of its hash only."""
    rng = np.random.default_rng(int.from_bytes(block_hash[:8], "little"))
    shape = (ns.num_layers, ns.num_kv_heads, ns.block_size, ns.head_dim)
    return BlockPayload(rng.standard_normal(shape).astype(np.float16),
                        rng.standard_normal(shape).astype(np.float16))


def writer_main(path: str, seed: int) -> None:
    import tqstore  # noqa: F401  (entry point: project convention)
    from tqstore.ssd.store import BlockStore

    rnd = random.Random(seed)
    ns = SOAK_NAMESPACE
    with BlockStore(path, StoreConfig(access_flush_count=8)) as store:
        print("READY", flush=True)
        fresh = 0
        while True:
            # Half the puts extend shared families (prefix hits, idempotent re-puts), half start
            # fresh ones so the store keeps growing however long the soak runs.
            if rnd.random() < 0.5:
                fam = rnd.randrange(FAMILIES)
            else:
                fam, fresh = 1000 * (seed + 1) + fresh, fresh + 1
            toks = family_tokens(fam)
            have = store.lookup(ns, toks)
            if have >= MAX_BLOCKS:
                if have:
                    store.get_block(ns, toks, rnd.randrange(have))  # access-time writes too
                continue
            count = min(rnd.randint(1, 4), MAX_BLOCKS - have)
            hashes = chain_hashes(ns, toks, have + count)
            payloads = [expected_payload(ns, hashes[i]) for i in range(have, have + count)]
            store.put_blocks(ns, toks, have, payloads)
            print(f"ACK {fam} {have} {count}", flush=True)


@dataclass
class SoakResult:
    iterations: int = 0
    acked_blocks: int = 0
    verified_blocks: int = 0
    orphans_removed: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _kill_once(path: str, seed: int, rnd: random.Random, max_run_s: float) -> list[tuple[int, int, int]]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "tqstore.ssd.soak", "writer", path, str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise RuntimeError(f"writer did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    time.sleep(rnd.uniform(0.0, max_run_s))
    os.kill(proc.pid, signal.SIGKILL)
    out, _err = proc.communicate(timeout=30)
    acks = []
    for ln in out.splitlines():
        parts = ln.split()
        if len(parts) == 4 and parts[0] == "ACK":  # a torn last line is not an acknowledgement
            acks.append((int(parts[1]), int(parts[2]), int(parts[3])))
    return acks


def run_soak(path: str, iterations: int, seed: int = 0, max_run_s: float = 0.4,
             deep_check_every: int = 1, sample_old: int | None = None) -> SoakResult:
    """Kill a writer `iterations` times; verify the store after each kill: every block acked by
    the last writer, plus all older acks (or `sample_old` random ones of them, for long soaks)."""
    from tqstore.errors import NotFound
    from tqstore.ssd.store import BlockStore

    rnd = random.Random(seed)
    res = SoakResult()
    acked: set[tuple[int, int]] = set()
    t0 = time.perf_counter()
    ns = SOAK_NAMESPACE
    for it in range(iterations):
        new: set[tuple[int, int]] = set()
        for fam, first, count in _kill_once(path, seed * 100_003 + it, rnd, max_run_s):
            new.update((fam, i) for i in range(first, first + count))
        old = acked - new
        if sample_old is not None and len(old) > sample_old:
            old = set(rnd.sample(sorted(old), sample_old))
        acked |= new
        to_verify = new | old
        res.acked_blocks = len(acked)
        res.iterations += 1
        with BlockStore(path) as store:
            res.orphans_removed += store.recovered_orphans
            leftovers = [n for n in os.listdir(store.blocks_dir) if not n.endswith(".blk")]
            if leftovers:
                res.failures.append(f"iter {it}: temp files survived reopen: {leftovers[:3]}")
            by_fam: dict[int, int] = {}
            for fam, idx in to_verify:
                by_fam[fam] = max(by_fam.get(fam, -1), idx)
            for fam, last in by_fam.items():
                toks = family_tokens(fam)
                if store.lookup(ns, toks) < last + 1:
                    res.failures.append(f"iter {it}: family {fam} lookup below acknowledged {last + 1}")
            for fam, idx in sorted(to_verify):
                toks = family_tokens(fam)
                want = expected_payload(ns, chain_hashes(ns, toks, idx + 1)[idx])
                try:
                    got = store.get_block(ns, toks, idx)
                except NotFound as exc:
                    res.failures.append(f"iter {it}: acknowledged block {fam}/{idx} lost: {exc}")
                    continue
                if not (np.array_equal(got.keys.view(np.uint16), want.keys.view(np.uint16))
                        and np.array_equal(got.values.view(np.uint16), want.values.view(np.uint16))):
                    res.failures.append(f"iter {it}: block {fam}/{idx} content differs")
                else:
                    res.verified_blocks += 1
            if deep_check_every and (it % deep_check_every == 0 or it == iterations - 1):
                report = store.check()
                if not report.ok:
                    res.failures.append(f"iter {it}: check: {report.summary()}")
    res.seconds = time.perf_counter() - t0
    return res


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "writer":
        writer_main(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m tqstore.ssd.soak writer PATH SEED")
