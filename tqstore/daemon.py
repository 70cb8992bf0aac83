"""The running daemon: binds the address, opens the store (and the remote tier), serves the
KvStore service (tqstore.server) and the gRPC health service, flushes periodically, and drains
on SIGTERM/SIGINT.

- One daemon per address: a second one on the same TCP port or live Unix socket refuses to
  start (AddressInUse) instead of sharing or stealing the first one's clients.
- SIGTERM/SIGINT: stop accepting, drain in-flight calls (drain_seconds), flush, close, exit 0.
- Who may connect (token, TLS, the Unix socket's mode) is tqstore.access: its checks run
  before the bind, so a daemon refused by them binds nothing and leaves the store untouched.
- Interceptors, outermost first: RpcLog (every call logged and counted, refused ones too),
  the token check, StreamGuard (stream slots and the stream watchdog, tqstore.request_limits).
  gRPC's maximum_concurrent_rpcs refuses calls past max_concurrent_rpcs before any of them.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tqstore.access import ServerAccess
from tqstore.config import ServerConfig
from tqstore.remote.tiers import Tiers
from tqstore.request_limits import StreamGuard, StreamWatch, stream_slots
from tqstore.rpc_log import RpcLog
from tqstore.server import SERVICE_NAME, KvStoreService, add_service
from tqstore.ssd.store import BlockStore

log = logging.getLogger("tqstore.server")

class AddressInUse(OSError):
    """Another process listens on the daemon's address."""


def _bind_failure(listen: str) -> OSError:
    """Why gRPC could not bind ``listen``, found by binding a plain socket there: gRPC itself
    only says "Failed to bind"."""
    if listen.startswith("unix:"):
        folder = os.path.dirname(os.path.abspath(listen[len("unix:"):]))
        why = "" if os.path.isdir(folder) else f": no directory {folder}"
        return OSError(f"cannot listen on {listen}{why}")
    host, _, port = listen.rpartition(":")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]") or None, int(port),
                                                          type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(addr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return AddressInUse(f"cannot listen on {listen}: the address is in use (another "
                                f"`tqstore serve`?); stop it or pick another --listen")
        return OSError(f"cannot listen on {listen}: {exc.strerror or exc}")
    except ValueError:
        pass
    return OSError(f"cannot listen on {listen}")


def _check_unix_socket_free(listen: str) -> None:
    """gRPC replaces an existing socket file, so a second daemon would silently take a running
    one's Unix socket: refuse if something accepts connections there (a stale file is fine)."""
    path = listen[len("unix:"):]
    if not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return  # nobody listens: gRPC replaces the stale file
    raise AddressInUse(f"cannot listen on {listen}: a server already listens on that socket "
                       f"(another `tqstore serve`?); stop it or pick another --listen")


class Daemon:
    """A running server: start() binds and serves; stop() drains and closes the store."""

    def __init__(self, config: ServerConfig) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.config = config
        if config.listen.startswith("unix:"):
            _check_unix_socket_free(config.listen)
        self.access = ServerAccess.from_config(config)
        # gRPC sets SO_REUSEPORT by default: a second daemon on a taken port would bind too and
        # the kernel would split new connections between two stores. Off, the bind fails.
        options = [("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.rpc_log = RpcLog()
        self.stream_watch = StreamWatch(config.stream_idle_s, config.max_stream_s)
        guard = StreamGuard(stream_slots(config.workers, config.max_streams), self.stream_watch)
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=config.workers), options=options,
            interceptors=[self.rpc_log] + self.access.interceptors + [guard],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs or 2 * config.workers)
        try:
            self.port = self.access.add_port(self.server, config.listen)
        except RuntimeError:  # gRPC's "Failed to bind to address"
            raise _bind_failure(config.listen) from None
        except BaseException:  # bound, but the socket's group could not be set
            self.server.stop(None)
            raise
        if self.port == 0 and not config.listen.startswith("unix:"):
            self.server.stop(None)
            raise _bind_failure(config.listen)
        # The store opens after the bind: a daemon that cannot listen leaves it untouched.
        try:
            self.store = BlockStore(config.path, config.store)
        except BaseException:
            self.server.stop(None)  # releases the bound port
            raise
        self.tiers: Tiers | None = None
        try:
            self._serve_store(config)
        except BaseException:  # nothing started yet: release the port, the store, the remote
            self.server.stop(None)
            if self.tiers is not None:
                self.tiers.close()
            self.store.close()
            raise
        self._stopped = threading.Event()
        self._flusher = threading.Thread(target=self._flush_periodically, name="tqstore-flush",
                                         daemon=True)

    def _serve_store(self, config: ServerConfig) -> None:
        """The tiers, the service, metrics and health over the opened store."""
        remote = None
        if config.remote is not None:
            from tqstore.remote.redis_tier import RedisTier  # imports redis only when asked

            remote = RedisTier(config.remote)
        self.tiers = Tiers(self.store, remote,
                           config.remote.fill_queue_bytes if config.remote else 0)
        self.service = KvStoreService(self.store, config, self.tiers)
        add_service(self.service, self.server)
        # Metrics only when asked (prometheus_client loads only then), fed by the RPC log.
        self.metrics = None
        self.metrics_port: int | None = None
        if config.metrics_port is not None:
            from tqstore.metrics import DaemonMetrics

            self.metrics = DaemonMetrics(self.store, self.tiers)
            self.rpc_log.observers.append(self.metrics.observe_rpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    def _flush_periodically(self) -> None:
        # The store batches last-access times and counters in memory; an idle daemon must still
        # publish them so `tqstore inspect --path` (another process) sees current figures.
        interval = self.config.store.access_flush_interval_s
        while not self._stopped.wait(interval):
            try:
                self.store.flush()
            except Exception:  # noqa: BLE001 - keep serving; the next put/close flushes again
                log.exception("periodic flush failed")

    @property
    def address(self) -> str:
        if self.config.listen.startswith("unix:"):
            return self.config.listen
        return f"{self.config.listen.rsplit(':', 1)[0]}:{self.port}"

    def start(self) -> "Daemon":
        if self.metrics is not None:  # first: a taken metrics port fails before anything serves
            try:
                self.metrics_port = self.metrics.start(self.config.metrics_host,
                                                       self.config.metrics_port)
            except BaseException:
                self.server.stop(None)
                self.tiers.close()
                self.store.close()
                raise
        if self.tiers.remote is not None:  # not fatal: the daemon serves from local meanwhile
            self.tiers.remote.connect(wait_s=min(2.0, self.config.remote.timeout_s))
        self.server.start()
        self.stream_watch.start()
        self._flusher.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if not self.config.is_loopback:
            log.warning("listening on %s: reachable from other machines", self.config.listen)
        for warning in self.access.start_warnings(self.config):
            log.warning("%s", warning)
        remote = self.tiers.remote
        log.info("serving %s on %s%s%s%s", self.config.path, self.address,
                 " (TLS)" if self.access.credentials is not None else "",
                 " (token required)" if self.access.token is not None else "",
                 f" with remote tier {remote.address.redacted}" if remote else "")
        return self

    def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(self.config.drain_seconds if grace is None else grace).wait()
        self.stream_watch.stop()
        if self._flusher.is_alive():
            self._flusher.join()
        if self.metrics is not None:  # after the drain, before the store closes
            self.metrics.stop()
        self.tiers.close()
        self.store.close()
        log.info("stopped")

    def serve_until_signal(self) -> int:
        """Block until SIGTERM/SIGINT, then drain and exit cleanly (returns 0). If the store's
        index is found damaged while serving (KvStoreService.index_damaged), drain briefly and
        return EXIT_RESTART: the supervisor (or a service manager) starts a fresh daemon, whose
        open rebuilds the index from the payload files."""
        from tqstore.supervisor import EXIT_RESTART

        # The handler only appends to a list, taking no lock: it runs in the main thread
        # between two bytecodes, possibly while that thread holds one. It was Event.set on an
        # Event this loop waited on: a SIGTERM landing inside Event.wait's hold of the
        # Condition's lock deadlocked the worker (seen once on a loaded GPU machine: it
        # outlived its killed supervisor, holding the store's writer lock).
        signals: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda sig, _frame: signals.append(sig))
        while not signals:
            time.sleep(0.2)  # the handler runs during it (then the sleep finishes its 0.2 s)
            if not signals and self.service.index_damaged.is_set():
                self.stop(grace=min(self.config.drain_seconds, 2.0))
                return EXIT_RESTART
        self.stop()
        return 0
