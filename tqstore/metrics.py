"""Prometheus metrics of a running daemon, opt-in: `tqstore serve --metrics-port N` serves them on
http://metrics_host:N/metrics (ServerConfig.metrics_port / metrics_host; off by default).

Two sources, so nothing is counted twice in the request path:
- Per RPC, fed by tqstore.rpc_log when each call ends (DaemonMetrics.observe_rpc is an RpcLog
  observer): a latency histogram per method, calls by method and status code (errors are the
  codes other than OK), message bytes in and out and blocks per method.
- Store and tiers, read at scrape time by StoreCollector from BlockStore.stats() (one short LMDB
  read transaction; the store's lock is held only to copy its pending counters, so a scrape never
  holds up the RPC threads) and Tiers.stats(). Counters named tqstore_store_* are the store's
  persisted counters (since the store was created: they survive restarts); the tier counters
  (tqstore_hit_tokens_total{tier}, tqstore_remote_*, local copies) count since the daemon started.

Each DaemonMetrics owns a private CollectorRegistry: several daemons in one process (tests) must
not collide in prometheus_client's global one. Label values are bounded sets: method (the
server's registered handlers), code (gRPC status codes), tier, outcome, reason. Model
fingerprints and namespaces never become labels (unbounded, and they are client strings):
namespaces are aggregated into the store totals.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tqstore.config import is_local_address
from tqstore.remote.tiers import Tiers
from tqstore.rpc_log import RpcRecord
from tqstore.ssd.store import BlockStore

log = logging.getLogger("tqstore.metrics")

# 0.1 ms (a local Lookup) .. 10 s (a large Fetch or Put); roughly 1-2.5-5 per decade.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# StoreStats field -> (metric name without _total, HELP), read at scrape time.
_STORE_COUNTERS = (
    ("lookups", "tqstore_store_lookups", "Lookups answered by the store (persisted)."),
    ("lookup_tokens", "tqstore_store_lookup_tokens", "Tokens looked up (persisted)."),
    ("hit_tokens", "tqstore_store_hit_tokens",
     "Tokens found in full blocks of either tier, counted by Lookup (persisted)."),
    ("gets", "tqstore_store_block_reads", "Blocks read from the local store (persisted)."),
    ("evictions", "tqstore_store_evictions", "Blocks evicted to keep the store within its "
                                             "budget (persisted)."),
    ("verification_failures", "tqstore_store_verification_failures",
     "Block reads that failed verification: served as misses (persisted)."),
    ("quarantined", "tqstore_store_quarantined",
     "Blocks quarantined after a verification failure (persisted)."),
    ("healed_records", "tqstore_store_healed_records",
     "Index records that failed their checksum, rewritten from their intact payload file."),
    # The usage counters above restart from zero when the index is rebuilt (a counter reset).
    ("index_rebuilds", "tqstore_index_rebuilds", "Index rebuilds from the payload files."),
    ("rebuild_recovered_blocks", "tqstore_index_rebuild_recovered_blocks",
     "Blocks an index rebuild recovered from their payload files."),
    ("rebuild_lost_blocks", "tqstore_index_rebuild_lost_blocks",
     "Blocks an index rebuild could not recover."),
)
_STORE_GAUGES = (
    ("blocks", "tqstore_store_blocks", "Blocks in the local store."),
    ("bytes_on_disk", "tqstore_store_bytes",
     "Payload plus index bytes: what the budget (tqstore_store_budget_bytes) bounds."),
    ("max_bytes", "tqstore_store_budget_bytes", "The store's byte budget (max_bytes)."),
    ("payload_bytes", "tqstore_store_payload_bytes", "Allocated payload file bytes."),
    ("index_bytes", "tqstore_store_index_bytes", "LMDB index pages in use, in bytes."),
    ("logical_bytes", "tqstore_store_logical_bytes", "fp16 K+V bytes of the stored blocks."),
)
# Tiers.stats() key (remote_ prefix included) -> (metric, HELP, extra label or None).
_REMOTE_COUNTERS = (
    ("remote_hit_blocks", "tqstore_remote_hit_blocks", "Blocks served from the remote tier."),
    ("remote_bytes_in", "tqstore_remote_received_bytes", "Bytes read from the remote tier."),
    ("remote_bytes_out", "tqstore_remote_sent_bytes", "Bytes uploaded to the remote tier."),
    ("remote_uploaded_blocks", "tqstore_remote_uploaded_blocks",
     "Blocks uploaded to the remote tier."),
    ("remote_uploads_skipped", "tqstore_remote_uploads_skipped",
     "Uploads skipped: another host stored the block first."),
    ("remote_uploads_dropped", "tqstore_remote_uploads_dropped",
     "Blocks not uploaded: the upload queue was full (they stay local)."),
    ("remote_uploads_failed", "tqstore_remote_uploads_failed",
     "Blocks whose upload failed (they stay local)."),
    ("remote_errors", "tqstore_remote_errors", "Errors talking to the remote tier."),
    ("remote_lookup_timeouts", "tqstore_remote_lookup_timeouts",
     "Remote lookups that missed their deadline (answered from the local tier alone)."),
)


def _number(stats: dict[str, object], key: str) -> float:
    value = stats.get(key, 0)
    return float(value) if isinstance(value, (int, float)) else 0.0


class StoreCollector(Collector):
    """Store and tier figures, read when Prometheus scrapes (see the module docstring)."""

    def __init__(self, store: BlockStore, tiers: Tiers) -> None:
        self.store = store
        self.tiers = tiers

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tqstore_store_up", "1 if the store's stats could be read.")
        try:
            stats = self.store.stats()
        except Exception:  # noqa: BLE001 - a closed or failing store: say so, keep the rest
            log.warning("metrics scrape: store stats unavailable", exc_info=True)
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            yield from self._store(stats)
        yield from self._tiers(self.tiers.stats())

    @staticmethod
    def _store(stats) -> Iterator[Metric]:
        for field, name, help_text in _STORE_GAUGES:
            yield GaugeMetricFamily(name, help_text, value=getattr(stats, field))
        yield GaugeMetricFamily("tqstore_store_namespaces", "Namespaces with stored blocks.",
                                value=len(stats.namespaces))
        for field, name, help_text in _STORE_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=getattr(stats, field))
        yield GaugeMetricFamily("tqstore_index_last_rebuild_timestamp_seconds", "When the index "
                                "was last rebuilt (Unix time; 0: never).",
                                value=stats.last_rebuild_time_ns / 1e9)
        yield GaugeMetricFamily("tqstore_index_last_rebuild_duration_seconds", "How long the "
                                "last index rebuild took.",
                                value=stats.last_rebuild_seconds)

    @staticmethod
    def _tiers(stats: dict[str, object]) -> Iterator[Metric]:
        local, remote = _number(stats, "local_hit_tokens"), _number(stats, "remote_hit_tokens")
        looked = _number(stats, "lookup_tokens")
        yield CounterMetricFamily("tqstore_lookup_tokens",
                                  "Tokens looked up since the daemon started.", value=looked)
        hits = CounterMetricFamily("tqstore_hit_tokens", "Tokens hit since the daemon started, "
                                   "by the tier that holds them.", labels=["tier"])
        hits.add_metric(["local"], local)
        hits.add_metric(["remote"], remote)
        yield hits
        # Full blocks only are hits: the partial tail of a prompt always counts as a miss.
        yield CounterMetricFamily("tqstore_miss_tokens", "Tokens looked up that neither tier "
                                  "held, since the daemon started.", value=looked - local - remote)
        copies = CounterMetricFamily("tqstore_local_copies", "Remote blocks copied into the "
                                     "local tier, by outcome.", labels=["outcome"])
        for key, outcome in (("fills", "ok"), ("fills_failed", "failed"),
                             ("fills_dropped", "dropped")):
            copies.add_metric([outcome], _number(stats, key))
        yield copies
        yield GaugeMetricFamily("tqstore_local_copy_queue_bytes", "Remote blocks waiting to be "
                                "copied into the local tier, in bytes.",
                                value=_number(stats, "fill_queue_bytes"))
        if "remote_state" not in stats:
            return  # no remote tier configured
        yield GaugeMetricFamily("tqstore_remote_up", "1 while the remote tier answers (not "
                                "backing off after errors, not closed).",
                                value=1 if stats["remote_state"] == "up" else 0)
        yield GaugeMetricFamily("tqstore_remote_upload_queue_bytes", "Blocks waiting to be "
                                "uploaded to the remote tier, in bytes.",
                                value=_number(stats, "remote_upload_queue_bytes"))
        for key, name, help_text in _REMOTE_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=_number(stats, key))
        rejected = CounterMetricFamily("tqstore_remote_rejected_blocks", "Remote blocks "
                                       "rejected and deleted, by reason.", labels=["reason"])
        for reason in ("incomplete", "verification_failures"):
            rejected.add_metric([reason], _number(stats, f"remote_{reason}"))
        yield rejected


class DaemonMetrics:
    """The daemon's metrics: register observe_rpc with the server's RpcLog, then start()."""

    def __init__(self, store: BlockStore, tiers: Tiers) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(StoreCollector(store, tiers))
        ProcessCollector(namespace="tqstore", registry=self.registry)  # RSS, CPU, fds (Linux)
        self._duration = Histogram(
            "tqstore_rpc_duration_seconds", "Time to answer an RPC, by method (a streaming "
            "call until its last message).", ["method"], buckets=LATENCY_BUCKETS_S,
            registry=self.registry)
        self._calls = Counter("tqstore_rpcs", "RPCs answered, by method and gRPC status code.",
                              ["method", "code"], registry=self.registry)
        self._bytes_in = Counter("tqstore_rpc_received_bytes", "Serialized request bytes "
                                 "received, by method.", ["method"], registry=self.registry)
        self._bytes_out = Counter("tqstore_rpc_sent_bytes", "Serialized response bytes sent, "
                                  "by method.", ["method"], registry=self.registry)
        self._blocks = Counter("tqstore_rpc_blocks", "Blocks hit (Lookup), streamed (Fetch), "
                               "stored (Put) or located (Locate), by method.", ["method"],
                               registry=self.registry)
        # method -> its label children (duration, bytes in, bytes out, blocks); racing first
        # calls may both fill it: labels() returns the same child, so that is harmless.
        self._children: dict[str, tuple] = {}
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_rpc(self, record: RpcRecord) -> None:
        """tqstore.rpc_log observer: runs on the RPC's thread as the call ends (a few µs)."""
        per_method = self._children.get(record.method)
        if per_method is None:  # first call of this method: labels() takes the metric's lock
            m = record.method
            per_method = self._children[m] = (
                self._duration.labels(m), self._bytes_in.labels(m), self._bytes_out.labels(m),
                self._blocks.labels(m))
        duration, bytes_in, bytes_out, blocks = per_method
        duration.observe(record.seconds)
        self._calls.labels(record.method, record.code.name).inc()
        bytes_in.inc(record.bytes_in)
        bytes_out.inc(record.bytes_out)
        if record.blocks:
            blocks.inc(record.blocks)

    def start(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: any free port) from a daemon thread; returns the
        bound port."""
        if self._http is not None:
            raise RuntimeError("metrics server already started")
        try:
            self._http, self._thread = start_http_server(port, host, self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: "
                          f"{exc.strerror or exc}") from exc
        bound = self._http.server_address[1]
        if not is_local_address(f"{host}:{bound}"):  # no auth on /metrics: say it is exposed
            log.warning("metrics on %s:%d: reachable from other machines", host, bound)
        log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]",
                 bound)
        return bound

    def stop(self) -> None:
        """Stop serving and free the port (idempotent). Call before the store closes."""
        if self._http is None:
            return
        self._http.shutdown()  # returns once serve_forever has left its loop
        self._http.server_close()
        if self._thread is not None:
            self._thread.join()
        self._http = self._thread = None
