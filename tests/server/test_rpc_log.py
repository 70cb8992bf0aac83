"""The daemon's log, read from a real `tqstore serve` process: the start-up line once, then one
line per RPC with method, peer, status, duration, blocks and bytes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from tqstore.client import KvStoreClient
from tqstore.config import ClientConfig
from tqstore.errors import InvalidArgument, NotFound
from tqstore.prefix_hash import Namespace

from tests.server.conftest import random_blocks

LINE = re.compile(r"tqstore\.rpc (?P<method>\S+) (?P<peer>\S+) (?P<code>[A-Z_]+) "
                  r"(?P<ms>[\d.]+) ms(?: blocks=(?P<blocks>\d+))? in=(?P<bytes_in>[\d.]+ \S+) "
                  r"out=(?P<bytes_out>[\d.]+ \S+)$")


def test_start_up_line_once_and_one_line_per_rpc(tmp_path, namespace, rng):
    sock = f"unix:{tmp_path}/kv.sock"
    proc = subprocess.Popen([sys.executable, "-m", "tqstore.cli", "serve", "--path",
                             str(tmp_path / "kv"), "--listen", sock, "--drain-seconds", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        tokens = rng.integers(0, 5000, 16 * 3).tolist()
        with KvStoreClient(ClientConfig(sock, direct_reads="off")) as client:
            assert client.is_serving(timeout=30)                              # Health/Check
            assert client.put(namespace, tokens, 0, random_blocks(namespace, 3, rng)) == 3
            assert client.lookup(namespace, tokens).hit_blocks == 3
            assert len(client.fetch_fp16(namespace, tokens, 1, 2)) == 2
            with pytest.raises(InvalidArgument):
                client.lookup(Namespace("m", 5000, 1, 64, 16), tokens)     # layout out of range
            with pytest.raises(NotFound):
                client.fetch_fp16(Namespace("other", 4, 2, 64, 16), tokens)
            client.stats()
        with KvStoreClient(sock) as local:  # same host: Locate, then the files are read here
            assert local.fetch_fp16_prefix(namespace, tokens, 0, 3).source == "direct"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert len(re.findall(r"serving \S+ on unix:", output)) == 1, output
    rows = [m.groupdict() for m in map(LINE.search, output.splitlines()) if m]
    calls = [(r["method"], r["code"], r["blocks"]) for r in rows]
    assert calls == [("Health/Check", "OK", None), ("KvStore/Put", "OK", "3"),
                     ("KvStore/Lookup", "OK", "3"), ("KvStore/Fetch", "OK", "2"),
                     ("KvStore/Lookup", "INVALID_ARGUMENT", None),
                     ("KvStore/Fetch", "NOT_FOUND", None), ("KvStore/Stats", "OK", None),
                     ("KvStore/Locate", "OK", "3")], output
    put, fetch = rows[1], rows[3]
    block_bytes = 2 * namespace.num_layers * namespace.num_kv_heads * 16 * 64 * 2
    assert put["bytes_in"].endswith("KiB")
    assert float(put["bytes_in"].split()[0]) * 1024 > 3 * block_bytes
    assert float(fetch["bytes_out"].split()[0]) * 1024 > 2 * block_bytes
    assert all(r["peer"].startswith("unix:") and float(r["ms"]) >= 0 for r in rows)
