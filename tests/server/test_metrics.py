"""Prometheus metrics of a real daemon on loopback (tqstore.metrics), scraped over HTTP and
parsed with prometheus_client's own parser: per-RPC counts, latency histograms and bytes from the
RpcLog observer, store and tier figures read at scrape time, off unless asked for."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tqstore.client import KvStoreClient
from tqstore.config import ClientConfig, RemoteConfig, ServerConfig, StoreConfig
from tqstore.daemon import Daemon
from tqstore.errors import NotFound
from tqstore.metrics import DaemonMetrics
from tqstore.payload_format import HEADER_SIZE
from tqstore.prefix_hash import Namespace
from tqstore.ssd.chain import chain_hashes, token_array

from tests.redis_servers import RedisServer
from tests.server.conftest import MiB, random_blocks

BASE = ServerConfig(path="unused", listen="127.0.0.1:0", drain_seconds=2, max_put_bytes=8 * MiB,
                    store=StoreConfig(max_bytes=512 * MiB, map_size=256 * MiB))


def _start(config: ServerConfig) -> Daemon:
    """A started Daemon; with metrics_port set, Daemon wires its metrics itself."""
    return Daemon(config).start()


def _stop(d: Daemon) -> None:
    d.stop(grace=1)


def _scrape(port: int) -> tuple[str, dict[tuple[str, tuple], float]]:
    """The exposition text and its samples keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def _value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _listening_tcp_ports() -> set[int]:
    """TCP ports this process listens on (Linux /proc): sockets in LISTEN whose inode is one of
    our file descriptors."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="Linux /proc")


@pytest.fixture
def metrics_daemon(tmp_path):
    d = _start(replace(BASE, path=str(tmp_path / "kv"), metrics_port=0))
    yield d
    _stop(d)


def test_scrape_counts_rpcs_tokens_bytes_and_reads_the_store(metrics_daemon, namespace, rng):
    d = metrics_daemon
    bs = namespace.block_size
    tokens = rng.integers(0, 5000, bs * 3).tolist()
    other = rng.integers(5000, 10000, bs * 3).tolist()
    block_bytes = 2 * namespace.num_layers * namespace.num_kv_heads * bs * namespace.head_dim * 2
    with KvStoreClient(ClientConfig(d.address, direct_reads="off")) as client:
        assert client.put(namespace, tokens, 0, random_blocks(namespace, 3, rng)) == 3
        assert client.lookup(namespace, tokens).hit_blocks == 3           # 48 tokens hit
        assert client.lookup(namespace, other).hit_blocks == 0            # 48 missed
        assert client.lookup(namespace, tokens[:2 * bs] + other[:bs]).hit_blocks == 2
        assert len(client.fetch_fp16(namespace, tokens, 1, 2)) == 2
        with pytest.raises(NotFound):
            client.fetch_fp16(Namespace("other-model", 4, 2, 64, 16), tokens)
    d.store.flush()  # nothing pending: the scrape and stats() below read the same index
    text, samples = _scrape(d.metrics_port)
    stats = d.store.stats()

    # Per RPC, from the RpcLog observer.
    calls = {(dict(k[1])["method"], dict(k[1])["code"]): v for k, v in samples.items()
             if k[0] == "tqstore_rpcs_total"}
    assert calls == {("KvStore/Put", "OK"): 1, ("KvStore/Lookup", "OK"): 3,
                     ("KvStore/Fetch", "OK"): 1, ("KvStore/Fetch", "NOT_FOUND"): 1}
    assert _value(samples, "tqstore_rpc_duration_seconds_count", method="KvStore/Lookup") == 3
    assert _value(samples, "tqstore_rpc_duration_seconds_count", method="KvStore/Fetch") == 2
    assert _value(samples, "tqstore_rpc_duration_seconds_bucket", method="KvStore/Lookup",
                  le="+Inf") == 3
    assert _value(samples, "tqstore_rpc_duration_seconds_sum", method="KvStore/Put") > 0
    assert _value(samples, "tqstore_rpc_received_bytes_total", method="KvStore/Put") > \
        3 * block_bytes
    assert _value(samples, "tqstore_rpc_sent_bytes_total", method="KvStore/Fetch") > \
        2 * block_bytes
    assert _value(samples, "tqstore_rpc_blocks_total", method="KvStore/Put") == 3
    assert _value(samples, "tqstore_rpc_blocks_total", method="KvStore/Lookup") == 5
    assert _value(samples, "tqstore_rpc_blocks_total", method="KvStore/Fetch") == 2

    # Tokens by tier since the daemon started (no remote: every hit is local).
    assert _value(samples, "tqstore_lookup_tokens_total") == 9 * bs
    assert _value(samples, "tqstore_hit_tokens_total", tier="local") == 5 * bs
    assert _value(samples, "tqstore_hit_tokens_total", tier="remote") == 0
    assert _value(samples, "tqstore_miss_tokens_total") == 4 * bs

    # The store, read at scrape time: equal to its own stats().
    assert _value(samples, "tqstore_store_up") == 1
    assert _value(samples, "tqstore_store_lookups_total") == stats.lookups == 3
    assert _value(samples, "tqstore_store_lookup_tokens_total") == stats.lookup_tokens == 9 * bs
    assert _value(samples, "tqstore_store_hit_tokens_total") == stats.hit_tokens == 5 * bs
    assert _value(samples, "tqstore_store_blocks") == stats.blocks == 3
    assert _value(samples, "tqstore_store_bytes") == stats.bytes_on_disk > 3 * block_bytes
    assert _value(samples, "tqstore_store_budget_bytes") == stats.max_bytes == 512 * MiB
    assert _value(samples, "tqstore_store_payload_bytes") == stats.payload_bytes
    assert _value(samples, "tqstore_store_namespaces") == 1
    for name in ("evictions", "verification_failures", "quarantined", "index_rebuilds"):
        assert _value(samples, f"tqstore_{'' if 'index' in name else 'store_'}{name}_total") == \
            getattr(stats, name) == 0
    assert _value(samples, "tqstore_index_last_rebuild_timestamp_seconds") == 0  # never
    assert not any(k[0].startswith("tqstore_remote_") for k in samples)  # no remote tier

    # Model fingerprints are client strings: never label values.
    assert "test-model" not in text and "other-model" not in text
    assert "# HELP tqstore_rpc_duration_seconds " in text


def test_a_corrupt_block_counts_a_verification_failure_and_a_quarantine(metrics_daemon,
                                                                        namespace, rng):
    d = metrics_daemon
    tokens = rng.integers(0, 5000, namespace.block_size * 3).tolist()
    with KvStoreClient(ClientConfig(d.address, direct_reads="off")) as client:
        assert client.put(namespace, tokens, 0, random_blocks(namespace, 3, rng)) == 3
        second = chain_hashes(namespace, token_array(tokens))[1]
        path = os.path.join(d.store.blocks_dir, second.hex() + ".blk")
        with open(path, "r+b") as f:  # flip one body byte: its chunk checksum fails
            f.seek(HEADER_SIZE + 100)
            byte = f.read(1)
            f.seek(HEADER_SIZE + 100)
            f.write(bytes([byte[0] ^ 0xFF]))
        assert len(client.fetch_fp16(namespace, tokens, 0, 3)) == 1  # ends at the bad block
    _, samples = _scrape(d.metrics_port)
    assert _value(samples, "tqstore_store_verification_failures_total") == 1
    assert _value(samples, "tqstore_store_quarantined_total") == 1
    assert _value(samples, "tqstore_store_blocks") == 1  # the bad block and its child are gone
    assert _value(samples, "tqstore_rpcs_total", method="KvStore/Fetch", code="OK") == 1
    assert _value(samples, "tqstore_rpc_blocks_total", method="KvStore/Fetch") == 1


def test_remote_tier_hits_uploads_and_local_copies(tmp_path, namespace, rng):
    """Daemon A uploads to a real Redis; daemon B, whose own store is empty, hits the remote:
    B's tokens count as remote hits and the blocks it served are copied into its local tier."""
    redis = RedisServer(tmp_path / "redis")
    remote = RemoteConfig(url=redis.url, lookup_deadline_s=2.0)
    a = _start(replace(BASE, path=str(tmp_path / "a"), metrics_port=0, remote=remote))
    b = _start(replace(BASE, path=str(tmp_path / "b"), metrics_port=0, remote=remote))
    try:
        bs = namespace.block_size
        tokens = rng.integers(0, 5000, bs * 3 + 5).tolist()
        with KvStoreClient(ClientConfig(a.address, direct_reads="off")) as client:
            assert client.put(namespace, tokens, 0, random_blocks(namespace, 3, rng)) == 3
        assert a.tiers.settle(30)
        with KvStoreClient(ClientConfig(b.address, direct_reads="off")) as client:
            assert client.lookup(namespace, tokens).hit_blocks == 3
            assert len(client.fetch_fp16(namespace, tokens)) == 3
        assert b.tiers.settle(30)
        _, on_a = _scrape(a.metrics_port)
        _, on_b = _scrape(b.metrics_port)
    finally:
        _stop(a)
        _stop(b)
        redis.stop()
    block_bytes = 2 * namespace.num_layers * namespace.num_kv_heads * bs * namespace.head_dim * 2
    assert _value(on_a, "tqstore_remote_up") == 1
    assert _value(on_a, "tqstore_remote_uploaded_blocks_total") == 3
    assert _value(on_a, "tqstore_remote_sent_bytes_total") > 3 * block_bytes
    assert _value(on_b, "tqstore_hit_tokens_total", tier="remote") == 3 * bs
    assert _value(on_b, "tqstore_hit_tokens_total", tier="local") == 0
    assert _value(on_b, "tqstore_miss_tokens_total") == 5  # the partial tail
    assert _value(on_b, "tqstore_remote_hit_blocks_total") == 3
    assert _value(on_b, "tqstore_remote_received_bytes_total") > 3 * block_bytes
    assert _value(on_b, "tqstore_local_copies_total", outcome="ok") == 3
    assert _value(on_b, "tqstore_store_blocks") == 3  # the copies
    assert _value(on_b, "tqstore_remote_errors_total") == 0


@needs_proc
def test_metrics_are_off_by_default(tmp_path):
    before = _listening_tcp_ports()
    d = _start(replace(BASE, path=str(tmp_path / "kv")))
    try:
        assert d.metrics is None and d.metrics_port is None
        assert _listening_tcp_ports() - before == {d.port}  # the gRPC port and nothing else
    finally:
        _stop(d)


@needs_proc
def test_stop_frees_the_metrics_port(tmp_path):
    d = _start(replace(BASE, path=str(tmp_path / "kv"), metrics_port=0))
    port = d.metrics_port
    try:
        assert port in _listening_tcp_ports()
        _scrape(port)
    finally:
        _stop(d)
    assert port not in _listening_tcp_ports()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    d.metrics.stop()  # idempotent
    # The port is free again: a new metrics server binds that exact port.
    again = DaemonMetrics(d.store, d.tiers)
    try:
        assert again.start("127.0.0.1", port) == port
    finally:
        again.stop()


def _serve(tmp_path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tqstore.cli", "serve", "--path",
                             str(tmp_path / "kv"), "--listen", "127.0.0.1:0", "--max-gib", "1",
                             "--drain-seconds", "2", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_serve_metrics_port_flag_serves_the_store_figures(tmp_path):
    proc = _serve(tmp_path, "--metrics-port", "0")
    try:
        lines = []
        while not any("serving" in line for line in lines):
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)
        port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", "".join(lines))[1])
        _, samples = _scrape(port)
        assert samples[("tqstore_store_budget_bytes", ())] == 1 << 30
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_taken_metrics_port_refuses_to_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _serve(tmp_path, "--metrics-port", str(taken.getsockname()[1]))
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "metrics" in out and "Traceback" not in out, out


def test_an_index_rebuilt_at_start_shows_in_metrics_stats_and_inspect(tmp_path, namespace, rng):
    """The index is deleted under a stopped daemon's store: the next daemon rebuilds it from
    the payload files, and the rebuild reaches the metrics, Stats and `inspect --addr`."""
    import json
    import shutil

    tokens = rng.integers(0, 50000, 3 * namespace.block_size).tolist()
    d = _start(replace(BASE, path=str(tmp_path / "kv")))
    with KvStoreClient(ClientConfig(address=d.address)) as client:
        client.put(namespace, tokens, 0, random_blocks(namespace, 3, rng))
    _stop(d)
    shutil.rmtree(tmp_path / "kv" / "index")
    d = _start(replace(BASE, path=str(tmp_path / "kv"), metrics_port=0))
    try:
        _, samples = _scrape(d.metrics_port)
        assert _value(samples, "tqstore_index_rebuilds_total") == 1
        assert _value(samples, "tqstore_index_rebuild_recovered_blocks_total") == 3
        assert _value(samples, "tqstore_index_rebuild_lost_blocks_total") == 0
        with KvStoreClient(ClientConfig(address=d.address)) as client:
            stats = client.stats()
            assert client.lookup(namespace, tokens).hit_blocks == 3
        assert (stats.index_rebuilds, stats.rebuild_recovered_blocks, stats.blocks) == (1, 3, 3)
        assert stats.last_rebuild_reason and stats.last_rebuild_time_ns > 0
        out = subprocess.run([sys.executable, "-m", "tqstore.cli", "inspect", "--addr", d.address,
                              "--json"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        view = json.loads(out.stdout)
        assert (view["index_rebuilds"], view["rebuild_recovered_blocks"]) == (1, 3)
    finally:
        _stop(d)
