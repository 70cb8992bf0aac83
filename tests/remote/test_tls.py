"""rediss://: the remote tier over TLS to a real redis-server with a private CA
(`--remote-ca-file`); a daemon that cannot verify the server's certificate serves from its
local store and says why, never an error at the client."""

import subprocess

import pytest

from tqstore.client import KvStoreClient

from tests.redis_servers import RedisServer, free_port
from tests.remote.test_shared_tier import NS, put_on, same, start_daemon
from tests.server.conftest import random_blocks


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def tls_redis(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "2", "-subj", "/CN=tqstore test CA", cwd=certs)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
             "server.csr", "-subj", "/CN=127.0.0.1", cwd=certs)
    (certs / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=certs)
    tls_port = free_port()
    server = RedisServer(tmp_path / "redis", extra_args=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(certs / "server.crt"),
        "--tls-key-file", str(certs / "server.key"), "--tls-ca-cert-file", str(certs / "ca.crt"),
        "--tls-auth-clients", "no"])
    yield f"rediss://127.0.0.1:{tls_port}", str(certs / "ca.crt")
    server.stop()


def test_two_daemons_share_blocks_over_tls(tmp_path, tls_redis):
    url, ca = tls_redis
    a = start_daemon(tmp_path / "a", url, tls_ca_file=ca)
    b = start_daemon(tmp_path / "b", url, tls_ca_file=ca)
    untrusting = start_daemon(tmp_path / "c", url)  # the system's CAs do not know ours
    try:
        tokens = list(range(3 * NS.block_size))
        blocks = random_blocks(NS, 3)
        put_on(a, NS, tokens, blocks)
        assert a.tiers.stats()["remote_uploaded_blocks"] == 3
        with KvStoreClient(b.address) as c:
            assert c.lookup(NS, tokens).hit_blocks == 3
            assert same(c.fetch_fp16(NS, tokens), blocks)
        with KvStoreClient(untrusting.address) as c:
            assert c.lookup(NS, tokens).hit_blocks == 0
        s = untrusting.tiers.stats()
        assert s["remote_errors"] >= 1 and "certificate" in s["remote_last_error"].lower()
    finally:
        for d in (a, b, untrusting):
            d.stop(grace=1)
