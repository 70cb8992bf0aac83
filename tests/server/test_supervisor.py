"""`tqstore serve` under its supervisor (tqstore/supervisor.py), as real processes: a worker
killed by damage under it (SIGBUS) or by any signal is started again and serves the same blocks;
SIGTERM drains and exits 0; the worker dies with its supervisor; exit 2 is not restarted."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tqstore.client import KvStoreClient
from tqstore.config import ClientConfig
from tqstore.errors import Unavailable
from tqstore.ssd.store import BlockStore
from tqstore.supervisor import EXIT_RESTART, RestartPolicy, Supervisor, describe_exit

from tests.server.conftest import random_blocks

WORKER = re.compile(r"supervising daemon worker pid (\d+)")
SERVING = re.compile(r"serving \S+ on (\S+)")


class Served:
    """A supervised `tqstore serve` whose log goes to a file (a pipe nobody drains blocks)."""

    def __init__(self, tmp_path: Path, listen: str, *extra: str) -> None:
        self.log = tmp_path / "serve.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tqstore.cli", "serve", "--path", str(tmp_path / "kv"),
                 "--listen", listen, "--max-gib", "1", "--drain-seconds", "1", *extra],
                stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self, count: int = 1, timeout_s: float = 60) -> list[int]:
        """The pids of the first `count` workers that served (waits for them)."""
        deadline = time.monotonic() + timeout_s
        while len(pids := [int(p) for p in WORKER.findall(self.text())]) < count:
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.05)
        return pids

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def served(tmp_path):
    made: list[Served] = []

    def start(listen: str, *extra: str) -> Served:
        made.append(Served(tmp_path, listen, *extra))
        return made[-1]

    yield start
    for s in made:
        s.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet whose other threads have ended too (the
    main thread turns zombie while the rest still hold the process's files and locks)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            zombie = any(line.split()[:2] == ["State:", "Z"] for line in status)
        return zombie and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except FileNotFoundError:
        return True


def _bound(sock: socket.socket, address: tuple[str, int]) -> bool:
    try:
        sock.bind(address)
        return True
    except OSError:
        return False


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _lookup_until_hit(client: KvStoreClient, namespace, tokens, want: int, timeout_s: float):
    """Lookups until `want` blocks hit: UNAVAILABLE while the worker dies and restarts."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            hit = client.lookup(namespace, tokens).hit_blocks
            if hit == want:
                return hit
        except Unavailable:
            hit = None
        if time.monotonic() > deadline:
            return hit
        time.sleep(0.1)


def test_index_truncated_under_the_daemon_is_a_sigbus_a_restart_and_a_rebuild(
        served, tmp_path, namespace, rng):
    address = f"127.0.0.1:{_free_port()}"  # a restart rebinds the same port
    daemon = served(address)
    first = daemon.workers()[0]
    tokens = rng.integers(0, 5000, 16 * 3).tolist()
    blocks = random_blocks(namespace, 3, rng)
    with KvStoreClient(ClientConfig(address, direct_reads="off")) as client:
        assert client.put(namespace, tokens, 0, blocks) == 3
        # Pages past the file's new end are unmapped: LMDB's next read of one is a SIGBUS.
        os.truncate(tmp_path / "kv" / "index" / "data.mdb", 8192)
        assert _lookup_until_hit(client, namespace, tokens, 3, timeout_s=20) == 3, daemon.text()
        got = client.fetch_fp16(namespace, tokens, 0, 3)
    assert [(g.keys.tobytes(), g.values.tobytes()) for g in got] == \
        [(b.keys.tobytes(), b.values.tobytes()) for b in blocks]
    log = daemon.text()
    assert f"daemon worker pid {first} died of SIGBUS; restarting it" in log, log
    assert "damaged or missing" in log and "rebuilding from payload files" in log, log
    assert "3 blocks recovered, 0 lost" in log, log
    second = daemon.workers(2)[1]
    assert second != first and _gone(first)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0, daemon.text()
    assert _gone(second)


def test_index_zeroed_under_the_daemon_is_an_lmdb_error_a_restart_and_a_rebuild(
        served, tmp_path, namespace, rng):
    """Zeros over data.mdb's pages past the meta pages: no signal, LMDB reports MDB_CORRUPTED
    (or a bad txn). The worker drains, exits EXIT_RESTART, and the restart rebuilds."""
    address = f"127.0.0.1:{_free_port()}"
    daemon = served(address)
    first = daemon.workers()[0]
    tokens = rng.integers(0, 5000, 16 * 3).tolist()
    blocks = random_blocks(namespace, 3, rng)
    with KvStoreClient(ClientConfig(address, direct_reads="off")) as client:
        assert client.put(namespace, tokens, 0, blocks) == 3
        data = tmp_path / "kv" / "index" / "data.mdb"
        size = data.stat().st_size
        with open(data, "r+b") as f:  # every data page; the two meta pages stay
            f.seek(8192)
            f.write(bytes(size - 8192))
        assert _lookup_until_hit(client, namespace, tokens, 3, timeout_s=20) == 3, daemon.text()
        got = client.fetch_fp16(namespace, tokens, 0, 3)
    assert [(g.keys.tobytes(), g.values.tobytes()) for g in got] == \
        [(b.keys.tobytes(), b.values.tobytes()) for b in blocks]
    log = daemon.text()
    assert "index is damaged under the running daemon" in log, log
    assert f"daemon worker pid {first} asked for a restart" in log, log
    assert "3 blocks recovered, 0 lost" in log, log
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0, daemon.text()


def test_sigterm_drains_the_worker_and_both_exit_0(served, tmp_path, namespace, rng):
    sock = f"unix:{tmp_path}/kv.sock"
    daemon = served(sock)
    worker = daemon.workers()[0]
    # The worker's own start-up line stays the first line of the log (test_daemon_process).
    assert "serving" in daemon.text().splitlines()[0], daemon.text()
    with KvStoreClient(sock) as client:
        assert client.put(namespace, rng.integers(0, 5000, 32).tolist(), 0,
                          random_blocks(namespace, 2, rng)) == 2
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0, daemon.text()
    assert _gone(worker)
    log = daemon.text()
    assert "tqstore.server stopped" in log and "restarting" not in log, log


def test_the_worker_dies_with_a_killed_supervisor(served, tmp_path):
    daemon = served(f"unix:{tmp_path}/kv.sock")
    worker = daemon.workers()[0]
    daemon.proc.kill()
    daemon.proc.wait()
    # PR_SET_PDEATHSIG: the worker gets SIGTERM, drains (1 s at most) and exits.
    assert _wait(lambda: _gone(worker), timeout_s=15), daemon.text()
    with BlockStore(tmp_path / "kv"):  # no orphan holds the store's writer lock
        pass


def test_a_segfaulted_worker_restarts_on_the_same_port(served, namespace, rng):
    daemon = served("127.0.0.1:0")
    first = daemon.workers()[0]
    address = SERVING.search(daemon.text())[1]
    os.kill(first, signal.SIGSEGV)
    second = daemon.workers(2)[1]
    log = daemon.text()
    assert f"daemon worker pid {first} died of SIGSEGV; restarting it in 0.5 s" in log, log
    assert SERVING.findall(log) == [address, address], log  # port 0: the port is kept
    with KvStoreClient(ClientConfig(address, direct_reads="off")) as client:
        tokens = rng.integers(0, 5000, 16).tolist()
        assert client.put(namespace, tokens, 0, random_blocks(namespace, 1, rng)) == 1
    os.kill(second, signal.SIGTERM)  # the worker itself told to stop: it drains, no restart
    assert daemon.proc.wait(timeout=30) == 0, daemon.text()
    assert len(WORKER.findall(daemon.text())) == 2


def test_a_restart_whose_kept_port_was_taken_moves_to_a_new_port(served):
    daemon = served("127.0.0.1:0")
    first = daemon.workers()[0]
    host, port = SERVING.search(daemon.text())[1].rsplit(":", 1)
    try:
        os.kill(first, signal.SIGSEGV)
    except ProcessLookupError:
        raise AssertionError(daemon.text()) from None
    with socket.socket() as thief:  # takes the port during the 0.5 s backoff
        # The port is free once the worker's last thread is gone (its main thread is a zombie
        # earlier). SO_REUSEADDR: an earlier connection may hold the port in TIME_WAIT.
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        assert _wait(lambda: _bound(thief, (host, int(port))), timeout_s=0.4), daemon.text()
        thief.listen()
        daemon.workers(2)
        log = daemon.text()
    assert f"port of {host}:{port} is taken: restarting on a new port" in log, log
    assert "clients must re-resolve the address" in log, log
    addresses = SERVING.findall(log)
    assert addresses[0] == f"{host}:{port}" and len(addresses) == 2 and addresses[1] != addresses[0]
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0, daemon.text()


def test_exit_2_is_not_restarted(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tqstore.cli", "serve", "--path",
                          str(tmp_path / "kv"), "--listen", "nonsense"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("tqstore: error: --listen must be") == 1, out.stderr
    assert "restarting" not in out.stdout + out.stderr


def test_quick_failures_in_a_row_give_up(caplog):
    """A worker that always dies at once: restarted with backoff, then an ERROR and exit 1."""
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGABRT)"]
    policy = RestartPolicy(first_delay_s=0.01, max_quick_failures=3)
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    try:
        with caplog.at_level(logging.INFO, logger="tqstore.supervisor"):
            assert Supervisor(lambda listen: crash, "127.0.0.1:0", policy).run() == 1
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["WARNING", "WARNING", "ERROR"], lines
    assert all("died of SIGABRT" in text for _, text in lines), lines
    assert "3 quick failures in a row: giving up" in lines[-1][1]
    assert [policy.delay_s(n) for n in (1, 2, 3)] == [0.01, 0.02, 0.04]


def test_backoff_doubles_up_to_its_cap_and_ends_are_named():
    policy = RestartPolicy()
    assert [policy.delay_s(n) for n in (1, 2, 3, 7, 8, 20)] == [0.5, 1, 2, 30, 30, 30]
    assert [describe_exit(s) for s in (-signal.SIGBUS, 1, EXIT_RESTART)] == \
        ["died of SIGBUS", "exited with status 1", "asked for a restart (status 75)"]


def test_the_supervisor_loads_no_grpc_store_or_mlx():
    code = ("import sys\nfrom tqstore.cli import build_parser\nimport tqstore.supervisor\n"
            "argv = ['serve', '--path', 'unused']\nbuild_parser(argv).parse_args(argv)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('grpc', 'lmdb', 'mlx', 'mlx_lm', 'numpy') or m.startswith('tqstore.ssd')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_the_worker_gets_every_option_it_was_given(tmp_path):
    """Each daemon option, set away from its default, reaches the worker unchanged (the worker's
    command line is rebuilt from the parsed options); only --listen is replaced."""
    from tqstore.cli import build_parser
    from tqstore.cli.serve import _worker_argv

    given = ["serve", "--path", "-odd path", "--listen", "127.0.0.1:0", "--max-gib", "1.5",
             "--compression", "zstd", "--workers", "3", "--drain-seconds", "0.25",
             "--remote", "redis://h:1", "--remote-deadline-ms", "7", "--remote-timeout-s", "2",
             "--remote-ca-file", "ca", "--token-file", "t", "--tls-cert", "c", "--tls-key", "k",
             "--socket-group", "g", "--metrics-port", "0", "--metrics-host", "::1",
             "--remote-password-file", "pw"]
    args = build_parser(given).parse_args(given)
    argv = _worker_argv(args, "127.0.0.1:4567")
    assert argv[:4] == [sys.executable, "-m", "tqstore.cli", "serve"]
    again = build_parser(argv[3:]).parse_args(argv[3:])
    expected = dict(vars(args), listen="127.0.0.1:4567")
    assert {k: v for k, v in vars(again).items() if k != "run"} == \
        {k: v for k, v in expected.items() if k != "run"}
    assert len(argv) == 4 + 17  # every option given (none at its default), nothing else


def test_worker_of_from_a_user_is_refused(tmp_path):
    """--worker-of names the supervisor's pid and its pipe: a process whose parent is not that
    pid (or that runs --no-supervise) is refused before it writes to any descriptor."""
    for extra in (["--worker-of", "1:5"], ["--worker-of", f"{os.getpid()}:5", "--no-supervise"]):
        out = subprocess.run([sys.executable, "-m", "tqstore.cli", "serve", "--path",
                              str(tmp_path / "kv"), *extra], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and "--worker-of is set by the supervisor" in out.stderr, out
    assert not (tmp_path / "kv").exists()
