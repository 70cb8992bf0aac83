"""Real Redis servers for the tests, started from Python: the remote tier is tested against the
server it talks to in production (Debian's redis-server 7), not a mock whose failure modes (a
killed master, a paused node, a full maxmemory, a cluster failover) would be ours, not Redis's.

Servers listen on 127.0.0.1 on free ports (never 6379: a packaged redis-server may run a system
service there) and keep nothing on disk. Every process started is killed at exit even if a test
forgets to stop it, so the suite never leaves servers behind."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import redis
from redis.cluster import ClusterNode, RedisCluster

_LIVE: set[subprocess.Popen] = set()  # every process started and not yet reaped


@atexit.register
def _kill_survivors() -> None:
    for proc in list(_LIVE):
        proc.kill()
        proc.wait()
    _LIVE.clear()


def _binary(name: str) -> str:
    """Missing Redis is a broken setup, not a reason to skip: the remote tier would go untested."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name} not found: run tools/setup.sh (it installs Debian's redis-server)")
    return path


def free_port() -> int:
    """A port the kernel just reported free on 127.0.0.1 (racy in principle, fine on a test box)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(timeout: float, what: str, check: Callable[[], str | None]) -> None:
    """Poll check() (None: done, else why not yet; a Redis error counts as not yet) until
    timeout, then raise with the last reason: a hung test says what it waited for."""
    deadline, why = time.monotonic() + timeout, "not checked"
    while time.monotonic() < deadline:
        try:
            if (why := check()) is None:
                return
        except redis.RedisError as e:
            why = repr(e)
        time.sleep(0.05)
    raise TimeoutError(f"{what} not within {timeout:g} s: {why}")


class RedisServer:
    """One redis-server process on 127.0.0.1:port, its working dir and log in `directory`. No
    persistence (a restart comes back empty, as a cache node does) and an LRU maxmemory: the
    settings the remote tier is deployed against."""

    def __init__(self, directory: str | os.PathLike, *, port: int | None = None,
                 maxmemory: str = "256mb", password: str | None = None,
                 extra_args: list[str] | tuple[str, ...] = ()) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.password = password
        self.log = self.directory / f"redis-{self.port}.log"
        self._args = [_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(self.port),
                      "--dir", str(self.directory), "--save", "", "--appendonly", "no",
                      "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru",
                      # stop() must not wait (10 s by default) for a lagging or paused replica
                      "--shutdown-timeout", "0",
                      *(["--requirepass", password] if password else []), *extra_args]
        self._proc: subprocess.Popen | None = None
        self._clients: list[redis.Redis] = []
        self._admin: redis.Redis | None = None
        self.paused = False
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, **kwargs) -> redis.Redis:
        """A plain client to this node alone (bytes in and out; closed by stop())."""
        c = redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                        decode_responses=False, **kwargs)
        self._clients.append(c)
        return c

    def admin(self) -> redis.Redis:
        """One short-timeout client kept for the helpers' own polling (not a socket per poll)."""
        if self._admin is None:
            self._admin = self.client(socket_timeout=1, socket_connect_timeout=1)
        return self._admin

    def start(self, timeout: float = 10.0) -> None:
        """Start the process (output to the log) and wait until it answers; on failure stop
        it and raise with the log's tail, the only place redis-server says why."""
        if self.alive:
            return
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(self._args, cwd=self.directory, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _LIVE.add(self._proc)
        self.paused = False
        proc = self._proc

        def answers() -> str | None:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with code {proc.returncode}")
            pid = self.admin().info("server")["process_id"]  # ours, not a port-stealer's
            return None if pid == proc.pid else f"port {self.port} answered by pid {pid}"

        try:
            _until(timeout, "PING", answers)
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"redis-server on port {self.port}: {e}; {self.log}:\n{tail}"
                               ) from None

    def restart(self) -> None:
        """Start again on the same port (after kill() or stop()). A plain server comes back
        empty; a cluster node rejoins from its nodes-PORT.conf (as a replica if failed over)."""
        self.start()

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill: no shutdown, clients see the connection drop."""
        self._end(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers, as a hung or partitioned node."""
        if self.alive:
            self._proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.alive:
            self._proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """Terminate (idempotent) and close the clients handed out."""
        self._end(signal.SIGTERM)
        for c in self._clients:
            c.close()
        self._clients.clear()
        self._admin = None

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc, self.paused = self._proc, None, False
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only once resumed
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _LIVE.discard(proc)
        if self._admin is not None:
            self._admin.connection_pool.disconnect()  # its sockets went with the process


def _cluster_nodes(client: redis.Redis) -> list[tuple[int, set[str], list[tuple[int, int]]]]:
    """CLUSTER NODES as (port, flags, slot ranges) per node, from the raw text (redis-py's parsed
    form has changed across versions)."""
    out = []
    for line in client.execute_command("CLUSTER", "NODES").decode().splitlines():
        f = line.split()
        port = int(f[1].split("@")[0].rsplit(":", 1)[1])
        ranges = [tuple(map(int, (s.split("-") * 2)[:2])) for s in f[8:] if not s.startswith("[")]
        out.append((port, set(f[2].split(",")), ranges))
    return out


class RedisClusterNodes:
    """A real Redis Cluster: `masters` masters with `replicas` replicas each (6 processes by
    default). The node timeout is 1 s, so a killed master's replica is promoted in ~2 s rather
    than the default 15+ s: failover tests stay quick."""

    def __init__(self, directory: str | os.PathLike, *, masters: int = 3, replicas: int = 1,
                 maxmemory: str = "256mb", timeout: float = 30.0) -> None:
        cli = _binary("redis-cli")
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(masters * (1 + replicas)):
                # An explicit bus port: the default port+10000 fails for ports above 55535.
                port, bus = free_port(), free_port()
                self.nodes.append(RedisServer(
                    Path(directory) / f"node-{port}", port=port, maxmemory=maxmemory,
                    extra_args=["--cluster-enabled", "yes", "--cluster-port", str(bus),
                                "--cluster-config-file", f"nodes-{port}.conf",
                                "--cluster-node-timeout", "1000",
                                # by default a master waits 5 s for more replicas to sync at once
                                "--repl-diskless-sync-delay", "0"]))
            done = subprocess.run([cli, "--cluster", "create",
                                   *(f"127.0.0.1:{n.port}" for n in self.nodes),
                                   "--cluster-replicas", str(replicas), "--cluster-yes"],
                                  capture_output=True, text=True, timeout=timeout)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}):\n"
                                   f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
            self.wait_ok(timeout)
            self._initial_masters = [n.port for n in self.masters()]
            self._wait_synced(replicas, timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in self._initial_masters)

    def _live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.alive and not n.paused]

    def _node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def client(self, **kwargs) -> RedisCluster:
        """A fresh cluster client seeded with every live node (a dead seed only slows it)."""
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in self._live()],
                            decode_responses=False, **kwargs)

    def masters(self) -> list[RedisServer]:
        """The nodes that a live node now sees as masters serving slots."""
        view = _cluster_nodes(self._live()[0].admin())
        return [self._node(p) for p, flags, ranges in view if "master" in flags and ranges]

    def master_for_key(self, key: bytes) -> RedisServer:
        c = self._live()[0].admin()
        slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
        for port, flags, ranges in _cluster_nodes(c):
            if "master" in flags and any(lo <= slot <= hi for lo, hi in ranges):
                return self._node(port)
        raise RuntimeError(f"no master serves slot {slot}")

    def kill_master_for_key(self, key: bytes) -> RedisServer:
        node = self.master_for_key(key)
        node.kill()
        return node

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Until every live node reports cluster_state:ok with all 16384 slots and sees each slot
        served by a live master: right after a kill the survivors still say ok (the master is
        not yet marked failed), so cluster_state alone would return before the failover."""
        def all_ok() -> str | None:
            live = self._live()
            for n in live:
                info = n.admin().execute_command("CLUSTER", "INFO").decode()
                owners = {p for p, flags, r in _cluster_nodes(n.admin()) if r and "master" in flags}
                if ("cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info
                        or not owners <= {m.port for m in live}):
                    return f"node {n.port}: {info!r}, slots on {sorted(owners)}"
            return None

        _until(timeout, "cluster_state:ok", all_ok)

    def _wait_synced(self, replicas: int, timeout: float) -> None:
        """Until every master has its replicas online: cluster_state:ok comes before their first
        full sync, and a WAIT or a failover before it would find no copy."""
        def synced() -> str | None:
            infos = [self._node(p).admin().info("replication") for p in self._initial_masters]
            online = [sum(isinstance(v, dict) and v.get("state") == "online" for v in i.values())
                      for i in infos]
            return None if min(online) >= replicas else f"replicas online per master: {online}"

        _until(timeout, "replicas online", synced)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
