"""One daemon per address: a second `tqstore serve` on a taken TCP port or a live Unix socket
refuses to start, with a clear message and a non-zero exit, and the first keeps serving."""

from __future__ import annotations

import subprocess
import sys

from tqstore.client import KvStoreClient
from tqstore.config import ServerConfig, StoreConfig
from tqstore.daemon import Daemon


def _serve(path, listen: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tqstore.cli", "serve", "--path", str(path),
                           "--listen", listen], capture_output=True, text=True, timeout=120)


def test_a_second_daemon_on_a_taken_tcp_port_refuses(daemon, tmp_path):
    out = _serve(tmp_path / "second", daemon.address)
    assert out.returncode == 2
    assert f"tqstore: error: cannot listen on {daemon.address}: the address is in use" in out.stderr
    assert "serving" not in out.stdout + out.stderr
    assert not (tmp_path / "second").exists()  # it never opened its store
    with KvStoreClient(daemon.address) as client:
        assert client.is_serving(timeout=5) and client.stats().blocks == 0


def test_a_second_daemon_on_a_live_unix_socket_refuses(tmp_path):
    sock = f"unix:{tmp_path}/kv.sock"
    first = Daemon(ServerConfig(path=str(tmp_path / "first"), listen=sock,
                                store=StoreConfig(max_bytes=1 << 28, map_size=1 << 26))).start()
    try:
        out = _serve(tmp_path / "second", sock)
        assert out.returncode == 2
        assert f"cannot listen on {sock}: a server already listens on that socket" in out.stderr
        with KvStoreClient(sock) as client:
            assert client.is_serving(timeout=5)
    finally:
        first.stop(grace=1)
