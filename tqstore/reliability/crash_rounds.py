"""Crash rounds: writers Put chains while the daemon is SIGKILLed at a random moment.

A round: start the daemon over the store; 4 writer processes extend prompt chains with put(),
each printing "ACK family first count" only after put() returned (the daemon acknowledges a
Put once the blocks are durable) and "TRY family first count" before it; SIGKILL the daemon at a
random moment; the writers end on the first failed call. Then restart the daemon on the same
store and verify, over gRPC:
- every block ever acknowledged is found by Lookup and fetches bitwise right ("lost", "wrong"),
- every block Lookup shows of any family a writer tried (acknowledged or not) fetches whole and
  right: a Put cut by the crash left whole blocks or nothing ("wrong" otherwise),
- the daemon exits 0 on SIGTERM and `tqstore check` then finds the store clean.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqstore.reliability.daemon_proc import DaemonProcess, run_check
from tqstore.reliability.workload import (LOAD_NAMESPACE, MAX_BLOCKS, WorkerProcess, block_hashes,
                                          family_tokens, payloads_for, status_name,
                                          worker_handshake, wrong_blocks)

SHARED_FAMILIES = 12  # writers race to extend these; the rest of their puts start fresh chains


def writer_main(address: str, seed: int, writer: int) -> None:
    from tqstore.client import KvStoreClient
    from tqstore.config import ClientConfig

    ns = LOAD_NAMESPACE
    rnd = random.Random(seed * 1_000_003 + writer)
    fresh = 0
    with KvStoreClient(ClientConfig(address=address, direct_reads="off",
                                    rpc_timeout_s=60)) as client:
        if not client.is_serving(timeout=60):
            sys.exit(f"daemon at {address} not serving")
        worker_handshake()
        try:
            while True:
                if rnd.random() < 0.5:
                    fam = rnd.randrange(SHARED_FAMILIES)
                else:
                    fam, fresh = 1_000_000 + (seed * 16 + writer) * 100_000 + fresh, fresh + 1
                tokens = family_tokens(fam)
                have = client.lookup(ns, tokens).hit_blocks
                if have >= MAX_BLOCKS:
                    continue
                count = min(rnd.randint(1, 4), MAX_BLOCKS - have)
                payloads = payloads_for(ns, tokens, have, count)
                print(f"TRY {fam} {have} {count}", flush=True)
                client.put(ns, tokens[: (have + count) * ns.block_size], have, payloads)
                print(f"ACK {fam} {have} {count}", flush=True)
        except Exception as exc:  # noqa: BLE001 - the daemon died under us: the round's point
            print(f"END {status_name(exc)}", flush=True)
        # close() below may wait on nothing: put() is synchronous, no upload is pending.


@dataclass
class CrashResult:
    rounds: int = 0
    acked_blocks: int = 0  # distinct (family, block) acknowledged over all rounds
    verified_blocks: int = 0  # block fetches compared bitwise (every round re-verifies all)
    unacked_visible: int = 0  # distinct blocks found that no ACK covered (stored, then the
    # crash came before the reply): allowed, and verified whole like every other
    lost: int = 0
    wrong: int = 0
    writer_ends: dict[str, int] = field(default_factory=dict)  # how writers' last calls failed
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _parse(lines: str, tag: str) -> list[tuple[int, int, int]]:
    out = []
    for line in lines.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == tag:
            out.append((int(parts[1]), int(parts[2]), int(parts[3])))
    return out


def _writers_round(daemon: DaemonProcess, writers: int, seed: int, rnd: random.Random,
                   max_run_s: float, res: CrashResult) -> tuple[list, list]:
    """Run the writers, SIGKILL the daemon at a random moment; (acks, tries) of the round."""
    procs = [WorkerProcess("tqstore.reliability.crash_rounds", [daemon.address, seed, w])
             for w in range(writers)]
    try:
        for p in procs:
            p.wait_ready()
        for p in procs:
            p.go()
        time.sleep(rnd.uniform(0.05, max_run_s))
        daemon.kill()
        acks, tries = [], []
        for p in procs:
            out, err = p.proc.communicate(timeout=120)
            if p.proc.returncode != 0:
                res.failures.append(f"writer exited {p.proc.returncode}: {err[-500:]}")
            acks += _parse(out, "ACK")
            tries += _parse(out, "TRY")
            for line in out.splitlines():
                if line.startswith("END "):
                    res.writer_ends[line[4:]] = res.writer_ends.get(line[4:], 0) + 1
        return acks, tries
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()


def _verify(address: str, acked: dict[int, set[int]], tried: set[int], res: CrashResult,
            round_no: int) -> None:
    """Every acknowledged block present and right; every visible block of a tried family right."""
    from tqstore.client import KvStoreClient
    from tqstore.config import ClientConfig
    from tqstore.errors import NotFound

    ns = LOAD_NAMESPACE
    acked_hashes: set[bytes] = set()  # families share prefix blocks: acknowledged by content
    visible: set[bytes] = set()
    with KvStoreClient(ClientConfig(address=address, direct_reads="off")) as client:
        for fam in sorted(tried | set(acked)):
            tokens = family_tokens(fam)
            hashes = block_hashes(ns, tokens, MAX_BLOCKS)
            acked_hashes.update(hashes[i] for i in acked.get(fam, ()))
            hit = client.lookup(ns, tokens).hit_blocks
            visible.update(hashes[:hit])
            want = max(acked.get(fam, {-1})) + 1
            if hit < want:
                res.lost += want - hit
                res.failures.append(f"round {round_no}: family {fam} lookup {hit} < acked {want}")
            if not hit:
                continue
            try:
                prefix = client.fetch_fp16_prefix(ns, tokens[: hit * ns.block_size], 0, hit)
            except NotFound:
                prefix = None
            got = len(prefix) if prefix is not None else 0
            if got < hit:
                res.lost += sum(1 for i in acked.get(fam, ()) if i >= got)
                res.failures.append(f"round {round_no}: family {fam} fetched {got} of {hit}")
            if prefix is not None:
                bad = wrong_blocks(ns, tokens, 0, prefix)
                res.wrong += len(bad)
                res.verified_blocks += got
                if bad:
                    res.failures.append(f"round {round_no}: family {fam} wrong blocks {bad}")
    res.unacked_visible = len(visible - acked_hashes)


def run_crash_rounds(root: str | Path, rounds: int = 20, writers: int = 4, seed: int = 0,
                     max_run_s: float = 2.0) -> CrashResult:
    root = Path(root)
    rnd = random.Random(seed)
    res = CrashResult()
    acked: dict[int, set[int]] = {}
    tried: set[int] = set()
    daemon = DaemonProcess(root / "store", root / "daemon.log", max_gib=16.0)
    t0 = time.perf_counter()
    try:
        for r in range(rounds):
            daemon.start()
            acks, tries = _writers_round(daemon, writers, seed * 10_007 + r, rnd, max_run_s, res)
            for fam, first, count in acks:
                acked.setdefault(fam, set()).update(range(first, first + count))
            tried.update(fam for fam, _, _ in tries)
            daemon.start()  # the same store, after the crash
            _verify(daemon.address, acked, tried, res, r)
            code = daemon.stop()
            if code != 0:
                res.failures.append(f"round {r}: daemon exited {code} on SIGTERM")
            check_rc, report = run_check(str(root / "store"))
            if check_rc != 0:
                res.failures.append(f"round {r}: check exited {check_rc}: {report[:500]}")
            res.rounds += 1
            res.acked_blocks = sum(len(v) for v in acked.values())
    finally:
        daemon.kill()
        res.seconds = time.perf_counter() - t0
    return res


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "worker":
        import tqstore  # noqa: F401  (entry point: project convention)

        writer_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: python -m tqstore.reliability.crash_rounds worker ADDRESS SEED WRITER")
