"""`tqstore serve` as a real process: Unix socket, SIGTERM drains and exits 0, data survives."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tqstore.client import KvStoreClient
from tqstore.ssd.store import BlockStore

from tests.server.conftest import random_blocks


def _start(tmp_path, listen):
    proc = subprocess.Popen([sys.executable, "-m", "tqstore.cli", "serve", "--path", str(tmp_path / "kv"),
                             "--listen", listen, "--max-gib", "1", "--drain-seconds", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert "serving" in line, line
    return proc


def test_unix_socket_sigterm_drains_and_data_persists(rng, tmp_path, namespace):
    sock = f"unix:{tmp_path}/kv.sock"
    proc = _start(tmp_path, sock)
    try:
        tokens = rng.integers(0, 1000, 48).tolist()
        blocks = random_blocks(namespace, 3)
        with KvStoreClient(sock) as client:
            assert client.is_serving(timeout=10)
            # Start an upload and signal the daemon while it may still be in flight: the
            # acknowledged put must be durable, and the daemon must exit 0.
            future = client.put_async(namespace, tokens, 0, blocks)
            time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert future.result(timeout=30) == 3
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with BlockStore(tmp_path / "kv", readonly=True) as store:
        assert store.lookup(namespace, tokens) == 3
        got = store.get_block(namespace, tokens, 2)
        assert got.keys.tobytes() == blocks[2].keys.tobytes()


# A daemon in its own process whose main thread, once its SIGTERM handler is installed,
# receives SIGTERM from inside the first threading.Condition it enters (the handler then runs
# while that thread holds the Condition's lock), or from a timer 1 s after the handler is
# installed if it enters none (today's loop enters none while it waits).
_SIGTERM_UNDER_A_LOCK = """
import signal, sys, threading, time
from tqstore.config import ServerConfig
from tqstore.daemon import Daemon

daemon = Daemon(ServerConfig(path=sys.argv[1], listen="127.0.0.1:0", drain_seconds=1)).start()
main, fired = threading.main_thread(), []
enter = threading.Condition.__enter__

def enter_then_signal(cond):
    held = enter(cond)
    installed = callable(signal.getsignal(signal.SIGTERM))  # serve_until_signal's handler
    if installed and threading.get_ident() == main.ident and not fired:
        fired.append("under a lock")
        signal.raise_signal(signal.SIGTERM)
    return held

def timer():
    while not callable(signal.getsignal(signal.SIGTERM)):
        time.sleep(0.01)
    time.sleep(1.0)
    if not fired:
        fired.append("timer")
        signal.pthread_kill(main.ident, signal.SIGTERM)

threading.Condition.__enter__ = enter_then_signal
threading.Thread(target=timer, daemon=True).start()
code = daemon.serve_until_signal()
print("exit", code, fired[0], flush=True)
"""


def test_sigterm_stops_the_daemon_even_landing_inside_a_lock_of_its_main_thread(tmp_path):
    """The signal handler must take no lock: Python runs it in the main thread between two
    bytecodes, and the wait loop's Event.wait held its Condition's lock while the handler's
    Event.set wanted it. That deadlocked a worker on the GPU machine under load (it outlived
    its killed supervisor, holding the store's writer lock). That loop hangs here until the
    timeout; today's loop waits without a Condition, so the timer's SIGTERM stops it."""
    try:
        proc = subprocess.run([sys.executable, "-c", _SIGTERM_UNDER_A_LOCK, str(tmp_path / "kv")],
                              capture_output=True, text=True, timeout=45)
    except subprocess.TimeoutExpired:
        pytest.fail("the daemon did not stop within 45 s of SIGTERM: its handler deadlocked")
    assert proc.returncode == 0 and "exit 0" in proc.stdout, proc.stdout + proc.stderr
    with BlockStore(tmp_path / "kv"):  # stopped cleanly: the writer lock is free
        pass


def test_refuses_a_bad_listen_address(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tqstore.cli", "serve", "--path", str(tmp_path / "kv"),
                          "--listen", "nonsense"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--listen" in out.stderr
