"""The remote tier's connections and health: who may talk to Redis, when, and what an error does.

- Two clients per connection: `fast` (socket timeout near the Lookup deadline) for presence
  checks and `data` (timeout_s, 4 MiB socket reads) for block values, so a large read never
  holds up a Lookup's connection.
- A set of clients carries a generation number. A connection-type error (refused, reset,
  timed out, cluster down, authentication) closes the set it came from and backs the remote
  off (0.1 s doubling to max_backoff_s); the next user after the backoff builds a new set,
  which also picks up a cluster's new slot owners after a failover. An error from a set that
  was already replaced only counts: many in-flight calls failing on one outage back off once,
  not once each. Other errors (an OOM reply, a bad reply) back off without closing anything.
- A missed Lookup deadline backs off Lookups alone (`lookups_available`): reads and uploads of
  values, which have their own timeout, go on.
- Lookups never connect (`snapshot`); reads and uploads may (`clients`). After `close` nobody
  connects again.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from tqstore.config import RemoteConfig
from tqstore.remote.address import RemoteAddress

log = logging.getLogger("tqstore.remote")
_FIRST_BACKOFF_S = 0.1
_READ_SIZE = 4 << 20  # redis-py's 64 KiB default read MB-size values several times slower


class RemoteClosed(RuntimeError):
    """The tier was closed: no new connections."""


def is_connection_error(exc: BaseException) -> bool:
    import redis.exceptions as rx

    return isinstance(exc, (rx.ConnectionError, rx.TimeoutError, rx.ClusterDownError,
                            rx.ClusterError, rx.RedisClusterException, OSError, TimeoutError))


class Connection:
    def __init__(self, config: RemoteConfig, address: RemoteAddress, counters) -> None:
        self.config = config
        self.address = address
        self.counters = counters  # the tier's Counter, updated under self.lock
        self.lock = threading.Lock()
        self._clients: tuple[int, Any, Any] | None = None  # (generation, fast, data)
        self._generation = 0
        self._connecting = False
        self._connected = threading.Condition(self.lock)
        self._failures = 0
        self._down_until = 0.0
        self._lookup_failures = 0
        self._lookup_down_until = 0.0
        self._closed = False
        self.last_error = ""

    # -- building clients -------------------------------------------------------------------------
    def _make(self) -> tuple[Any, Any]:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        a, cfg = self.address, self.config
        common: dict[str, Any] = dict(username=a.username, password=a.password, ssl=a.tls,
                                      socket_connect_timeout=cfg.timeout_s,
                                      retry=Retry(NoBackoff(), 0))
        if a.tls and cfg.tls_ca_file:
            common["ssl_ca_certs"] = cfg.tls_ca_file
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
        fast = make(max(4 * cfg.lookup_deadline_s, 0.2))
        try:
            data = make(cfg.timeout_s, socket_read_size=_READ_SIZE)
        except BaseException:
            _close((fast,))
            raise
        return fast, data

    def _open(self) -> tuple[int, Any, Any]:
        """Build and open a new set (a cluster client discovers the slot map; every primary
        answers a PING), unless another thread did meanwhile."""
        fast, data = self._make()  # outside the lock: it connects
        try:
            for c in (fast, data):
                if self.address.cluster:
                    c.ping(target_nodes=c.__class__.PRIMARIES)
                else:
                    c.ping()
        except BaseException:
            _close((fast, data))
            raise
        with self.lock:
            if self._closed or self._clients is not None:
                current = self._clients
                closed = self._closed
            else:
                self._generation += 1
                self._clients = (self._generation, fast, data)
                self._connected.notify_all()
                return self._clients
        _close((fast, data))
        if closed or current is None:
            raise RemoteClosed("the remote tier is closed")
        return current

    def snapshot(self) -> tuple[int, Any, Any] | None:
        """The current set, or None: never connects (the Lookup path)."""
        with self.lock:
            return None if self._closed else self._clients

    def clients(self) -> tuple[int, Any, Any]:
        """The current set, connecting if there is none (reads and uploads)."""
        with self.lock:
            if self._closed:
                raise RemoteClosed("the remote tier is closed")
            current = self._clients
        return current if current is not None else self._open()

    def connect(self) -> bool:
        """Connect now; False (counted, backed off) if the remote cannot be reached."""
        try:
            self.clients()
        except RemoteClosed:
            return False
        except Exception as exc:  # noqa: BLE001
            self.failed("connect", exc, None)
            return False
        self.succeeded()
        self._check_eviction_policy()
        return True

    def connect_in_background(self) -> None:
        with self.lock:
            if self._connecting or self._clients is not None or self._closed:
                return
            self._connecting = True

        def run() -> None:
            try:
                self.connect()
            finally:
                with self.lock:
                    self._connecting = False
                    self._connected.notify_all()

        threading.Thread(target=run, name="tqstore-remote-connect", daemon=True).start()

    def wait_connected(self, timeout: float) -> bool:
        """Start connecting in the background and wait up to timeout (daemon start-up: a
        remote that drops packets must not hold the daemon's start for timeout_s per node)."""
        self.connect_in_background()
        with self.lock:
            return self._connected.wait_for(
                lambda: self._clients is not None or not self._connecting or self._closed, timeout) \
                and self._clients is not None

    def _check_eviction_policy(self) -> None:
        """The tier relies on Redis evicting (maxmemory + allkeys-lru): say so if it will not."""
        try:
            _, _, data = self.clients()
            policy = data.config_get("maxmemory-policy")
            values = ([v.get("maxmemory-policy") for v in policy.values()]
                      if self.address.cluster else [policy.get("maxmemory-policy")])
        except Exception:  # noqa: BLE001 - CONFIG may be renamed or refused: nothing to say
            return
        if any(v and not str(v).startswith("allkeys") for v in values):
            log.warning("remote %s has maxmemory-policy %s: blocks carry no TTL, so Redis will "
                        "refuse writes or never evict them when full; use allkeys-lru",
                        self.address.redacted, sorted(set(map(str, values))))

    # -- health -----------------------------------------------------------------------------------
    def available(self) -> bool:
        """False while backing off after an error (reads, uploads, Lookups)."""
        return time.monotonic() >= self._down_until and not self._closed

    def lookups_available(self) -> bool:
        return self.available() and time.monotonic() >= self._lookup_down_until

    def failed(self, what: str, exc: BaseException, generation: int | None) -> None:
        """Count an error of a call made with set `generation` (None: no set) and back off;
        see the module docstring for which errors close the set."""
        reconnect = is_connection_error(exc)
        with self.lock:
            self.counters["errors"] += 1
            if generation is not None and (self._clients is None
                                           or self._clients[0] != generation):
                return  # that set is gone already: this outage has been answered
            self._failures += 1
            backoff = min(_FIRST_BACKOFF_S * 2 ** (self._failures - 1), self.config.max_backoff_s)
            self._down_until = time.monotonic() + backoff
            self.last_error = f"{what}: {type(exc).__name__}: {exc}"[:300]
            doomed = self._clients if reconnect else None
            if reconnect:
                self._clients = None
            first = self._failures == 1
        if doomed is not None:
            _close(doomed[1:])
        if first:  # one line per outage, not one per call
            log.warning("remote %s unavailable (%s); serving from the local tier, retrying "
                        "with backoff", self.address.redacted, self.last_error)

    def lookup_timed_out(self) -> None:
        with self.lock:
            self.counters["errors"] += 1
            self.counters["lookup_timeouts"] += 1
            self._lookup_failures += 1
            backoff = min(_FIRST_BACKOFF_S * 2 ** (self._lookup_failures - 1),
                          self.config.max_backoff_s)
            self._lookup_down_until = time.monotonic() + backoff
            self.last_error = (f"lookup: no answer within "
                               f"{self.config.lookup_deadline_s * 1000:.0f} ms")

    def succeeded(self, lookup: bool = False) -> None:
        if self._failures or (lookup and self._lookup_failures):
            with self.lock:
                was, self._failures = self._failures, 0
                if lookup:
                    self._lookup_failures = 0
            if was:
                log.info("remote %s is back", self.address.redacted)

    @property
    def state(self) -> str:
        if self._closed:
            return "closed"
        return "up" if self._failures == 0 and self._lookup_failures == 0 else "backing off"

    def close(self) -> None:
        with self.lock:
            self._closed = True
            doomed, self._clients = self._clients, None
            self._connected.notify_all()
        if doomed is not None:
            _close(doomed[1:])


def _close(clients) -> None:
    for c in clients:
        try:
            c.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass
