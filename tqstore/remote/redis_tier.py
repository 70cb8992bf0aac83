"""RedisTier: block values in Redis or Redis Cluster, shared by the daemons of many hosts.

What the daemon may rely on, and what it may not:
- Nothing stays: Redis evicts by its own policy (maxmemory + allkeys-lru) and any part of any
  block may be gone at any time. Presence is checked per block (all parts), a chain's hit ends
  at its first absent block, and a block whose parts do not verify is a counted miss and is
  deleted (value_format.py). A hit can only be shorter than Lookup said, never wrong.
- The remote is never on the critical path of correctness and never blocks for long: a Lookup
  waits at most `lookup_deadline_s` for it, reads and writes at most `timeout_s`. After an error
  or a timeout the remote is skipped for a backoff (0.1 s doubling to `max_backoff_s`) and the
  clients are rebuilt on the next try, so a Redis that restarts or a cluster that fails over
  (new slot owners) is picked up again; the daemon serves from its local tier meanwhile.
- Uploads run on one background thread from a queue bounded in bytes; a block is acknowledged
  to the generator when it is durable locally, before any of this (tiers.py).

Two client objects: `fast` (socket timeout near the Lookup deadline) for presence checks, and
`data` (timeout_s) for values, so a large read never holds up a Lookup's connection.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from tqstore.blocks import BlockPayload
from tqstore.config import RemoteConfig
from tqstore.prefix_hash import Namespace
from tqstore.remote.address import parse_remote
from tqstore.remote.value_format import (BlockIdentity, RemoteValueError, block_keys,
                                         decode_block, encode_block, part_count)

log = logging.getLogger("tqstore.remote")
_FIRST_BACKOFF_S = 0.1
_READ_SIZE = 4 << 20


@dataclass
class UploadJob:
    ns: Namespace
    hashes: list[bytes]  # chain hashes of blocks 0 .. first + len(payloads) - 1
    tokens: np.ndarray  # uint32 token ids covering those blocks
    first: int
    payloads: list[BlockPayload]

    @property
    def nbytes(self) -> int:
        return sum(p.keys.nbytes + p.values.nbytes for p in self.payloads)


def identity(ns: Namespace, hashes: list[bytes], tokens: np.ndarray, index: int) -> BlockIdentity:
    bs = ns.block_size
    return BlockIdentity(hashes[index], hashes[index - 1] if index else ns.root_hash(), index,
                         tokens[index * bs:(index + 1) * bs].tobytes())


class _Latency:
    """The last 1,024 durations of one kind of remote call, in ms."""

    def __init__(self) -> None:
        self._ms: collections.deque[float] = collections.deque(maxlen=1024)

    def add(self, seconds: float) -> None:
        self._ms.append(seconds * 1000)

    def quantiles(self) -> tuple[float, float]:
        if not self._ms:
            return 0.0, 0.0
        p50, p99 = np.percentile(np.fromiter(self._ms, float), [50, 99])
        return float(p50), float(p99)


class RedisTier:
    """See the module docstring. Thread-safe; `close()` stops the uploader."""

    def __init__(self, config: RemoteConfig) -> None:
        self.config = config
        self.address = parse_remote(config.url)
        self._lock = threading.Lock()
        self._clients: tuple | None = None
        self._connecting = False
        self._failures = 0
        self._down_until = 0.0
        self.last_error = ""
        self.counters: collections.Counter[str] = collections.Counter()
        self.latency = {name: _Latency() for name in ("lookup", "get", "put")}
        self._lookups = ThreadPoolExecutor(4, "tqstore-remote-lookup")
        self._uploads: collections.deque[UploadJob] = collections.deque()
        self._upload_bytes = 0
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._uploader = threading.Thread(target=self._upload_loop, name="tqstore-remote-upload",
                                          daemon=True)
        self._uploader.start()

    # -- connection state ---------------------------------------------------------------------
    def _make_clients(self) -> tuple:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        a, cfg = self.address, self.config
        common = dict(username=a.username, password=a.password, ssl=a.tls,
                      socket_connect_timeout=cfg.timeout_s, retry=Retry(NoBackoff(), 0))
        if a.tls and cfg.tls_ca_file:
            common["ssl_ca_certs"] = cfg.tls_ca_file
        fast_timeout = max(4 * cfg.lookup_deadline_s, 0.2)
        # Block values are MBs: redis-py reads the socket in socket_read_size pieces, and its
        # 64 KiB default cost a third of the read rate with hiredis (measured, BENCHMARKS.md).
        data_options = dict(socket_read_size=_READ_SIZE)
        if a.cluster:
            from redis.cluster import ClusterNode, RedisCluster

            def make(timeout: float, **extra):
                return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in a.nodes],
                                    socket_timeout=timeout, **common, **extra)
        else:
            (host, port), = a.nodes

            def make(timeout: float, **extra):
                return redis.Redis(host=host, port=port, db=a.db, socket_timeout=timeout,
                                   **common, **extra)
        return make(fast_timeout), make(cfg.timeout_s, **data_options)

    def _client(self, which: int):
        """The fast (0) or data (1) client, built on first use after a failure. Raises the
        connection error (the caller counts it)."""
        with self._lock:
            clients = self._clients
        if clients is None:
            clients = self._connect()
        return clients[which]

    def _connect(self) -> tuple:
        """Build both clients and open their connections (a cluster client discovers the slot
        map; every primary answers a PING), so a Lookup never pays for connecting."""
        clients = self._make_clients()  # outside the lock: it connects
        try:
            for c in clients:
                if self.address.cluster:
                    c.ping(target_nodes=c.__class__.PRIMARIES)
                else:
                    c.ping()
        except BaseException:
            _close(clients)
            raise
        with self._lock:
            if self._clients is None:
                self._clients = clients
                return clients
            current = self._clients
        _close(clients)
        return current

    def connect(self) -> bool:
        """Connect now (the daemon calls this at start-up); False, counted and backed off, if
        the remote cannot be reached. The daemon serves either way."""
        try:
            self._client(0)
        except Exception as exc:  # noqa: BLE001
            self._failed("connect", exc)
            return False
        self._succeeded()
        return True

    def _connect_in_background(self) -> None:
        with self._lock:
            if self._connecting or self._clients is not None:
                return
            self._connecting = True

        def run() -> None:
            try:
                self.connect()
            finally:
                with self._lock:
                    self._connecting = False

        threading.Thread(target=run, name="tqstore-remote-connect", daemon=True).start()

    def available(self) -> bool:
        """False while backing off after an error."""
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self.counters["errors"] += 1
            self._failures += 1
            backoff = min(_FIRST_BACKOFF_S * 2 ** (self._failures - 1), self.config.max_backoff_s)
            self._down_until = time.monotonic() + backoff
            self.last_error = f"{what}: {type(exc).__name__}: {exc}"[:300]
            clients, self._clients = self._clients, None
            first = self._failures == 1
        if clients is not None:
            _close(clients)
        if first:  # one line per outage, not one per call
            log.warning("remote %s unavailable (%s); serving from the local tier, retrying "
                        "with backoff", self.address.redacted, self.last_error)

    def _succeeded(self) -> None:
        if self._failures:
            with self._lock:
                was, self._failures = self._failures, 0
            if was:
                log.info("remote %s is back", self.address.redacted)

    # -- presence (Lookup) ----------------------------------------------------------------------
    def present(self, ns: Namespace, hashes: list[bytes], start: int) -> int:
        """How many blocks from `start` on are present in full (every part), contiguous; 0 when
        the remote is down or does not answer within the Lookup deadline."""
        end = min(len(hashes), start + self.config.max_lookup_blocks)
        if start >= end or not self.available():
            return 0
        if self._clients is None:  # never connect under the deadline: answer from local
            self._connect_in_background()
            with self._lock:
                self.counters["lookups_while_connecting"] += 1
            return 0
        began = time.monotonic()
        future = self._lookups.submit(self._present, ns, hashes[start:end])
        try:
            found = future.result(timeout=self.config.lookup_deadline_s)
        except FutureTimeout:
            future.add_done_callback(lambda f: f.exception())  # it ends on its socket timeout
            with self._lock:
                self.counters["lookup_timeouts"] += 1
            self._failed("lookup", TimeoutError(
                f"no answer within {self.config.lookup_deadline_s * 1000:.0f} ms"))
            return 0
        except Exception as exc:  # noqa: BLE001 - any remote failure: answer from local alone
            self._failed("lookup", exc)
            return 0
        self._succeeded()
        self.latency["lookup"].add(time.monotonic() - began)
        return found

    def _present(self, ns: Namespace, hashes: list[bytes]) -> int:
        parts = part_count(ns)
        pipe = self._client(0).pipeline(transaction=False)
        for h in hashes:
            pipe.exists(*block_keys(ns, h))
        found = 0
        for count in pipe.execute():
            if count != parts:
                break
            found += 1
        return found

    # -- reads (Fetch) ---------------------------------------------------------------------------
    def get_blocks(self, ns: Namespace, hashes: list[bytes], tokens: np.ndarray, start: int,
                   count: int) -> Iterator[tuple[int, BlockPayload]]:
        """Verified blocks start .. start+count-1, in order, until the first one that is absent,
        fails verification (counted, deleted) or cannot be read (remote error)."""
        # One MGET per block (its parts, one slot), not pipelined: measured (docs/BENCHMARKS.md),
        # a pipeline of MGETs ran at a third of plain GETs' GB/s with multi-MB values (the
        # server buffers the whole reply), one MGET at a time at 0.9x of them.
        for i in range(start, start + count):
            if not self.available():
                return
            began = time.monotonic()
            try:
                parts = self._client(1).execute_command("MGET", *block_keys(ns, hashes[i]))
            except Exception as exc:  # noqa: BLE001
                self._failed("get", exc)
                return
            self._succeeded()
            self.latency["get"].add(time.monotonic() - began)
            if all(p is None for p in parts):
                return  # evicted (or never there): the hit ends here
            try:
                payload = decode_block(ns, identity(ns, hashes, tokens, i), parts)
            except RemoteValueError as exc:
                self._discard(ns, hashes[i], "incomplete" if None in parts
                              else "verification_failures", exc)
                return
            with self._lock:
                self.counters["hit_blocks"] += 1
                self.counters["bytes_in"] += sum(len(p) for p in parts)
            yield i, payload

    def _discard(self, ns: Namespace, chain_hash: bytes, counter: str, why: Exception) -> None:
        with self._lock:
            self.counters[counter] += 1
        log.warning("remote block %s… rejected (%s): deleted", chain_hash.hex()[:16], why)
        try:
            self._client(1).delete(*block_keys(ns, chain_hash))
        except Exception as exc:  # noqa: BLE001 - a later reader rejects it again
            self._failed("delete", exc)

    # -- writes (background) ---------------------------------------------------------------------
    def upload(self, job: UploadJob) -> bool:
        """Queue blocks for the remote; False (counted) if the queue is over its byte bound."""
        with self._wake:
            if self._upload_bytes + job.nbytes > self.config.upload_queue_bytes:
                self.counters["uploads_dropped"] += len(job.payloads)
                return False
            self._uploads.append(job)
            self._upload_bytes += job.nbytes
            self._wake.notify()
        return True

    def wait_uploads(self, timeout: float = 30.0) -> bool:
        """Until the upload queue is empty (tests, benchmarks, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._uploads or self.counters["_uploading"]:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, 0.05))
        return True

    def _upload_loop(self) -> None:
        while True:
            with self._wake:
                while not self._uploads and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                job = self._uploads.popleft()
                self.counters["_uploading"] += 1
            try:
                for _attempt in range(3):
                    while not self.available() and not self._stopping:
                        time.sleep(0.02)
                    if self._stopping:
                        break
                    try:
                        self._upload(job)
                        self._succeeded()
                        break
                    except Exception as exc:  # noqa: BLE001 - retried, then dropped (still local)
                        self._failed("put", exc)
                else:
                    with self._lock:
                        self.counters["uploads_failed"] += len(job.payloads)
            finally:
                with self._wake:
                    self._upload_bytes -= job.nbytes
                    self.counters["_uploading"] -= 1
                    self._wake.notify_all()

    def _upload(self, job: UploadJob) -> None:
        ns, parts = job.ns, part_count(job.ns)
        client = self._client(1)
        indices = range(job.first, job.first + len(job.payloads))
        pipe = client.pipeline(transaction=False)
        for i in indices:
            pipe.exists(*block_keys(ns, job.hashes[i]))
        there = pipe.execute()
        for i, count in zip(indices, there):
            if count == parts:
                with self._lock:
                    self.counters["uploads_skipped"] += 1  # another host put it first
                continue
            values = encode_block(ns, identity(ns, job.hashes, job.tokens, i),
                                  job.payloads[i - job.first])
            began = time.monotonic()
            # One transaction per block (its parts share a slot): readers see all or none of
            # one writer's parts, never a mix of two hosts' writes.
            tx = client.pipeline(transaction=True)
            for key, value in zip(block_keys(ns, job.hashes[i]), values):
                tx.set(key, value)
            tx.execute()
            self.latency["put"].add(time.monotonic() - began)
            with self._lock:
                self.counters["uploaded_blocks"] += 1
                self.counters["bytes_out"] += sum(len(v) for v in values)

    # -- lifecycle / stats ----------------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        with self._lock:
            out: dict[str, object] = {k: v for k, v in self.counters.items() if not k.startswith("_")}
            out["upload_queue_bytes"] = self._upload_bytes
            out["state"] = "up" if self._failures == 0 else "backing off"
            out["last_error"] = self.last_error
        out["address"] = self.address.redacted
        for name, lat in self.latency.items():
            out[f"{name}_ms_p50"], out[f"{name}_ms_p99"] = lat.quantiles()
        return out

    def close(self, drain_s: float = 5.0) -> None:
        """Give queued uploads up to drain_s (they are durable locally either way), then stop."""
        if drain_s > 0:
            self.wait_uploads(drain_s)
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._uploader.join(timeout=max(self.config.timeout_s, 1.0) + 1)
        self._lookups.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            clients, self._clients = self._clients, None
        if clients is not None:
            _close(clients)


def _close(clients: tuple) -> None:
    for c in clients:
        try:
            c.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass
