"""Load: N client processes mix Lookup / Fetch / Put on one daemon for T seconds.

Each worker (`python -m tqstore.reliability.load worker ...`) draws its calls from a seeded
generator over shared prompt families (several workers extend and read the same chains, so
puts of one block race and prefixes are shared) and fresh families of its own (the store keeps
growing). It remembers how many blocks of each family are known stored (acknowledged by its own
put, or seen by a lookup) and asserts, with nothing ever evicted (the store's budget is far
above what a run writes):
- a Lookup never reports fewer blocks than known stored ("lost"),
- a Fetch of known blocks returns all of them ("short") with the right bytes ("wrong"),
- no call fails (errors counted by gRPC status code).
Half the workers fetch over gRPC, half read the daemon's files directly (Locate + pread), the
two ways a same-host generator fetches.
"""

from __future__ import annotations

import collections
import random
import sys
import time
from pathlib import Path

from tqstore.reliability.daemon_proc import DaemonProcess, RssSampler, run_check
from tqstore.reliability.workload import (LOAD_NAMESPACE, MAX_BLOCKS, WorkerProcess, family_tokens,
                                          payloads_for, percentiles_ms, status_name,
                                          worker_handshake, wrong_blocks)

SHARED_FAMILIES = 48
CALLS = ("lookup", "fetch", "put")


class LoadWorker:
    """One client's loop; counters and latencies end up in result()."""

    def __init__(self, client, seed: int, worker: int) -> None:
        self.client = client
        self.rnd = random.Random(seed * 1_000_003 + worker)
        self.worker = worker
        self.ns = LOAD_NAMESPACE
        self.known: dict[int, int] = {}  # family -> blocks known to be stored
        self.fresh = 0
        self.latency: dict[str, list[float]] = {c: [] for c in CALLS}
        self.errors: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []  # lost / short / wrong, with the family and block
        self.bytes = {"fetched": 0, "put": 0}
        self.sources: collections.Counter[str] = collections.Counter()

    def run(self, seconds: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            r = self.rnd.random()
            try:
                if r < 0.4:
                    self.lookup()
                elif r < 0.75 and self.known:
                    self.fetch()
                else:
                    self.put()
            except Exception as exc:  # noqa: BLE001 - every failure is counted, the run goes on
                self.errors[status_name(exc)] += 1
                if len(self.problems) < 20:
                    self.problems.append(f"{type(exc).__name__}: {exc}"[:300])
        return time.monotonic() - t0

    def _timed(self, call: str, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        self.latency[call].append(time.perf_counter() - t)
        return out

    def lookup(self) -> None:
        fam = self.rnd.randrange(SHARED_FAMILIES) if self.rnd.random() < 0.8 or not self.known \
            else self.rnd.choice(list(self.known))
        hit = self._timed("lookup", self.client.lookup, self.ns, family_tokens(fam)).hit_blocks
        if hit < self.known.get(fam, 0):
            self.problems.append(f"lost: family {fam} lookup {hit} < known {self.known[fam]}")
        self.known[fam] = max(self.known.get(fam, 0), hit)
        if not self.known[fam]:
            del self.known[fam]

    def fetch(self) -> None:
        fam = self.rnd.choice(list(self.known))
        have = self.known[fam]
        first = 0 if self.rnd.random() < 0.7 else self.rnd.randrange(have)
        tokens = family_tokens(fam)[: have * self.ns.block_size]
        prefix = self._timed("fetch", self.client.fetch_fp16_prefix, self.ns, tokens, first,
                             have - first)
        self.sources[prefix.source] += 1
        self.bytes["fetched"] += prefix.keys.nbytes + prefix.values.nbytes
        if len(prefix) != have - first:
            self.problems.append(f"short: family {fam} fetched {len(prefix)} of {have - first}")
        for index in wrong_blocks(self.ns, tokens, first, prefix):
            self.problems.append(f"wrong: family {fam} block {index}")

    def put(self) -> None:
        fam = self.rnd.randrange(SHARED_FAMILIES)
        if self.rnd.random() < 0.5 or self.known.get(fam, 0) >= MAX_BLOCKS:
            fam = 1_000_000 + self.worker * 100_000 + self.fresh  # a new prompt of this client
            self.fresh += 1
        have = self.known.get(fam, 0)  # stored, so the parent of block `have` is there
        count = min(self.rnd.randint(1, 4), MAX_BLOCKS - have)
        tokens = family_tokens(fam)[: (have + count) * self.ns.block_size]
        payloads = payloads_for(self.ns, tokens, have, count)
        stored = self._timed("put", self.client.put, self.ns, tokens, have, payloads)
        if stored != count:
            self.problems.append(f"short: family {fam} put stored {stored} of {count}")
        self.bytes["put"] += sum(p.keys.nbytes + p.values.nbytes for p in payloads)
        self.known[fam] = have + count

    def result(self, elapsed: float) -> dict:
        return {"worker": self.worker, "elapsed_s": elapsed,
                "latency": {c: [round(x, 6) for x in v] for c, v in self.latency.items()},
                "errors": dict(self.errors), "problems": self.problems, "bytes": self.bytes,
                "sources": dict(self.sources)}


def worker_main(address: str, seed: int, worker: int, seconds: float, direct_reads: str) -> None:
    import json

    from tqstore.client import KvStoreClient
    from tqstore.config import ClientConfig

    config = ClientConfig(address=address, direct_reads=direct_reads, rpc_timeout_s=300)
    with KvStoreClient(config) as client:
        if not client.is_serving(timeout=60):
            sys.exit(f"daemon at {address} not serving")
        worker_handshake()
        w = LoadWorker(client, seed, worker)
        elapsed = w.run(seconds)
    print(json.dumps(w.result(elapsed)), flush=True)


def run_load(root: str | Path, clients: int = 32, seconds: float = 60.0, seed: int = 0,
             max_gib: float = 16.0, workers: int = 32) -> dict:
    """Start a daemon over root/store, run the clients, stop it, check the store; the summary
    (ok is False on any error, lost, short or wrong block, bad exit or unclean check)."""
    root = Path(root)
    daemon = DaemonProcess(root / "store", root / "daemon.log", max_gib=max_gib,
                           workers=workers).start()
    procs: list[WorkerProcess] = []
    try:
        procs = [WorkerProcess("tqstore.reliability.load",
                               [daemon.address, seed, i, seconds, "off" if i % 2 == 0 else "auto"])
                 for i in range(clients)]
        for p in procs:
            p.wait_ready()
        fds_before = daemon.fd_count()
        with RssSampler(daemon) as rss:
            for p in procs:
                p.go()
            results = [p.result(timeout_s=seconds + 300) for p in procs]
        serving = daemon.alive()
        fds_after = daemon.fd_count() if serving else -1
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
        exit_code = daemon.stop() if daemon.alive() else daemon.proc.returncode
    check_rc, check_report = run_check(str(root / "store"))
    summary = summarize(results, clients, seconds)
    summary.update(rss.summary(), daemon_serving=serving, daemon_exit=exit_code,
                   fds_before=fds_before, fds_after=fds_after, check_exit=check_rc,
                   check=check_report.splitlines()[0] if check_report else "")
    summary["ok"] = (serving and exit_code == 0 and check_rc == 0 and not summary["errors"]
                     and not summary["problems"])
    return summary


def summarize(results: list[dict], clients: int, seconds: float) -> dict:
    wall = max(r["elapsed_s"] for r in results)
    errors: collections.Counter[str] = collections.Counter()
    sources: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    for r in results:
        errors.update(r["errors"])
        sources.update(r["sources"])
        problems += r["problems"]
    calls = {c: percentiles_ms([x for r in results for x in r["latency"][c]]) for c in CALLS}
    total_calls = sum(v["n"] for v in calls.values())
    fetched = sum(r["bytes"]["fetched"] for r in results)
    put = sum(r["bytes"]["put"] for r in results)
    for c in CALLS:
        calls[c]["per_s"] = round(calls[c]["n"] / wall, 1)
    return {"clients": clients, "seconds": seconds, "wall_s": round(wall, 1), "calls": calls,
            "calls_per_s": round(total_calls / wall, 1),
            "mb_per_s": round((fetched + put) / wall / 1e6, 1),
            "fetched_mb": round(fetched / 1e6, 1), "put_mb": round(put / 1e6, 1),
            "fetch_sources": dict(sources), "errors": dict(errors),
            "lost": sum(p.startswith("lost") for p in problems),
            "short": sum(p.startswith("short") for p in problems),
            "wrong": sum(p.startswith("wrong") for p in problems),
            "problems": problems[:20]}


def format_table(s: dict) -> str:
    rows = [f"{'call':8} {'n':>8} {'per s':>8} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}"]
    for c in CALLS:
        v = s["calls"][c]
        rows.append(f"{c:8} {v['n']:>8} {v['per_s']:>8} {v.get('p50_ms', '-'):>9} "
                    f"{v.get('p99_ms', '-'):>9} {v.get('max_ms', '-'):>9}")
    rows.append(f"{s['clients']} clients, {s['wall_s']} s: {s['calls_per_s']} calls/s, "
                f"{s['mb_per_s']} MB/s (fetched {s['fetched_mb']} MB, put {s['put_mb']} MB)")
    rows.append(f"errors {s['errors'] or 0}, lost {s['lost']}, short {s['short']}, wrong "
                f"{s['wrong']}; daemon RSS start {s.get('rss_start_mib')} peak "
                f"{s.get('rss_peak_mib')} end {s.get('rss_end_mib')} MiB; exit "
                f"{s['daemon_exit']}, check exit {s['check_exit']}")
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "worker":
        import tqstore  # noqa: F401  (entry point: project convention)

        worker_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]),
                    sys.argv[6])
    else:
        sys.exit("usage: python -m tqstore.reliability.load worker ADDRESS SEED N SECONDS "
                 "DIRECT_READS")
