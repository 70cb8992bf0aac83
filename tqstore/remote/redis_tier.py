"""RedisTier: block values in Redis or Redis Cluster, shared by the daemons of many hosts.

What the daemon may rely on, and what it may not:
- Nothing stays: Redis evicts by its own policy (maxmemory + allkeys-lru) and any part of any
  block may be gone at any time. Presence is checked per block (all parts), a chain's hit ends
  at its first absent block, and a block whose parts do not verify is a counted miss and is
  deleted (value_format.py). A hit can only be shorter than Lookup said, never wrong.
- The remote is never on the critical path of correctness and never blocks for long: a Lookup
  waits at most `lookup_deadline_s` for it, reads and writes at most `timeout_s`; errors back
  it off and reconnect it (connection.py). The daemon serves from its local tier meanwhile.
- Uploads run on one background thread from a queue bounded in bytes; a block is acknowledged
  to the generator when it is durable locally, before any of this (tiers.py).
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
from tqstore.remote.connection import Connection
from tqstore.remote.value_format import (BlockIdentity, RemoteValueError, block_keys,
                                         decode_block, encode_block, part_count)

log = logging.getLogger("tqstore.remote")


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
    """What block `index` of the chain (hashes, tokens) is: what its value must claim."""
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
        self.address = parse_remote(config.url, _password_from_file(config.password_file))
        self.counters: collections.Counter[str] = collections.Counter()
        self.conn = Connection(config, self.address, self.counters)
        self._lock = self.conn.lock  # one lock for the counters, the queue and the clients
        self.latency = {name: _Latency() for name in ("lookup", "get", "put")}
        self._lookups = ThreadPoolExecutor(4, "tqstore-remote-lookup")
        self._uploads: collections.deque[UploadJob] = collections.deque()
        self._upload_bytes = 0
        self._uploading = 0  # jobs taken off the queue and not finished
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._uploader = threading.Thread(target=self._upload_loop, name="tqstore-remote-upload",
                                          daemon=True)
        self._uploader.start()

    def connect(self, wait_s: float) -> bool:
        """Connect in the background, waiting up to wait_s (the daemon's start-up); the
        daemon serves either way."""
        return self.conn.wait_connected(wait_s)

    # -- presence (Lookup) ----------------------------------------------------------------------
    def present(self, ns: Namespace, hashes: list[bytes], start: int) -> int:
        """How many blocks from `start` on are present in full (every part), contiguous; 0 when
        the remote is down, not connected yet, or does not answer within the Lookup deadline.
        Never connects (connection.py): a Lookup never waits for a connect."""
        end = min(len(hashes), start + self.config.max_lookup_blocks)
        if start >= end or not self.conn.lookups_available():
            return 0
        snap = self.conn.snapshot()
        if snap is None:
            self.conn.connect_in_background()
            with self._lock:
                self.counters["lookups_while_connecting"] += 1
            return 0
        generation, fast, _ = snap
        began = time.monotonic()
        try:
            future = self._lookups.submit(_count_present, fast, ns, hashes[start:end])
            found = future.result(timeout=self.config.lookup_deadline_s)
        except FutureTimeout:
            future.cancel()  # if still queued; a running one ends on its socket timeout
            self.conn.lookup_timed_out()
            return 0
        except RuntimeError:  # the executor is shut down: the tier is closing
            return 0
        except Exception as exc:  # noqa: BLE001 - any remote failure: answer from local alone
            self.conn.failed("lookup", exc, generation)
            return 0
        self.conn.succeeded(lookup=True)
        self.latency["lookup"].add(time.monotonic() - began)
        return found

    # -- reads (Fetch) ---------------------------------------------------------------------------
    def get_blocks(self, ns: Namespace, hashes: list[bytes], tokens: np.ndarray, start: int,
                   count: int) -> Iterator[tuple[int, BlockPayload]]:
        """Verified blocks start .. start+count-1, in order, until the first one that is absent,
        fails verification (counted, deleted) or cannot be read (remote error)."""
        # One MGET per block (its parts, one slot), not pipelined: measured (docs/BENCHMARKS.md),
        # a pipeline of MGETs ran at a third of plain GETs' GB/s with multi-MB values (the
        # server buffers the whole reply), one MGET at a time at 0.9x of them.
        snap = self.conn.snapshot()  # Lookup saw the blocks: a set exists unless it just failed
        if snap is None:
            return
        generation, _, data = snap
        for i in range(start, start + count):
            if not self.conn.available():
                return
            began = time.monotonic()
            try:
                parts = data.execute_command("MGET", *block_keys(ns, hashes[i]))
            except Exception as exc:  # noqa: BLE001
                self.conn.failed("get", exc, generation)
                return
            self.conn.succeeded()
            self.latency["get"].add(time.monotonic() - began)
            if all(p is None for p in parts):
                return  # evicted (or never there): the hit ends here
            try:
                payload = decode_block(ns, identity(ns, hashes, tokens, i), parts)
            except RemoteValueError as exc:
                self._discard(data, generation, ns, hashes[i],
                              "incomplete" if None in parts else "verification_failures", exc)
                return
            with self._lock:
                self.counters["hit_blocks"] += 1
                self.counters["bytes_in"] += sum(len(p) for p in parts)
            yield i, payload

    def _discard(self, data, generation: int, ns: Namespace, chain_hash: bytes, counter: str,
                 why: Exception) -> None:
        with self._lock:
            self.counters[counter] += 1
        log.warning("remote block %s… rejected (%s): deleted", chain_hash.hex()[:16], why)
        try:
            data.delete(*block_keys(ns, chain_hash))
        except Exception as exc:  # noqa: BLE001 - a later reader rejects it again
            self.conn.failed("delete", exc, generation)

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
            while self._uploads or self._uploading:
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
                self._uploading += 1
            try:
                for _attempt in range(3):
                    while not self.conn.available() and not self._stopping:
                        time.sleep(0.02)
                    if self._stopping:
                        break
                    generation = None
                    try:
                        generation, _, data = self.conn.clients()
                        self._upload(data, job)
                        self.conn.succeeded()
                        break
                    except Exception as exc:  # noqa: BLE001 - retried, then dropped (still local)
                        self.conn.failed("put", exc, generation)
                else:
                    with self._lock:
                        self.counters["uploads_failed"] += len(job.payloads)
            finally:
                with self._wake:
                    self._upload_bytes -= job.nbytes
                    self._uploading -= 1
                    self._wake.notify_all()

    def _upload(self, client, job: UploadJob) -> None:
        ns, parts = job.ns, part_count(job.ns)
        indices = range(job.first, job.first + len(job.payloads))
        pipe = client.pipeline(transaction=False)
        for i in indices:
            pipe.exists(*block_keys(ns, job.hashes[i]))
        there = pipe.execute()
        for i, count in zip(indices, there):
            if self._stopping:
                return  # shutting down: the rest stays local
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
            out: dict[str, object] = dict(self.counters)
            out["upload_queue_bytes"] = self._upload_bytes
            out["last_error"] = self.conn.last_error
        out["state"] = self.conn.state
        out["address"] = self.address.redacted
        for name, lat in self.latency.items():
            out[f"{name}_ms_p50"], out[f"{name}_ms_p99"] = lat.quantiles()
        return out

    def close(self, drain_s: float = 5.0) -> None:
        """Give queued uploads up to drain_s (they are durable locally either way), then stop:
        connections closed first (an upload in flight fails at once), no reconnects after."""
        if drain_s > 0:
            self.wait_uploads(drain_s)
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self.conn.close()
        self._uploader.join(timeout=max(self.config.timeout_s, 1.0) + 1)
        self._lookups.shutdown(wait=False, cancel_futures=True)


def _count_present(fast, ns: Namespace, hashes: list[bytes]) -> int:
    """Leading blocks of `hashes` with every part present (one pipelined EXISTS per block)."""
    parts = part_count(ns)
    pipe = fast.pipeline(transaction=False)
    for h in hashes:
        pipe.exists(*block_keys(ns, h))
    found = 0
    for count in pipe.execute():
        if count != parts:
            break
        found += 1
    return found


def _password_from_file(path: str | None) -> str | None:
    """--remote-password-file: the password out of the URL (and so out of the process list)."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip() or None
