"""`tqstore serve` as a real process: Unix socket, SIGTERM drains and exits 0, data survives."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

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


def test_refuses_a_bad_listen_address(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tqstore.cli", "serve", "--path", str(tmp_path / "kv"),
                          "--listen", "nonsense"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--listen" in out.stderr
