"""Who gets into the daemon (tqstore/access.py): bearer tokens on every KvStore RPC, TLS, the
refusal to serve beyond loopback without a token, and the Unix socket's mode. Real daemons on
loopback, real gRPC, real certificates made by the openssl CLI."""

from __future__ import annotations

import argparse
import grp
import logging
import os
import stat
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tqstore.access import BearerToken, read_token_file
from tqstore.errors import Unauthenticated
from tqstore.cli.connection_args import add_connection_arguments, client_config_from
from tqstore.cli.generate import connect
from tqstore.client import KvStoreClient
from tqstore.config import ClientConfig, ServerConfig, StoreConfig
from tqstore.daemon import Daemon
from tqstore.errors import InvalidArgument, Unavailable
from tqstore.v1 import tqstore_pb2 as pb
from tqstore.v1 import tqstore_pb2_grpc as pb_grpc
from tqstore.wire import fp16_chunks, namespace_to_proto

from tests.seeding import seeded_rng
from tests.server.conftest import random_blocks

SMALL = StoreConfig(max_bytes=1 << 28, map_size=1 << 26)


def _secret() -> str:
    return seeded_rng().bytes(16).hex()


def _token_file(path, value: str, mode: int = 0o600) -> str:
    path.write_text(f"  {value}\n")  # surrounding whitespace is stripped
    os.chmod(path, mode)
    return str(path)


def _config(tmp_path, listen: str = "127.0.0.1:0", **access) -> ServerConfig:
    return ServerConfig(path=str(tmp_path / "kv"), listen=listen, drain_seconds=1, store=SMALL,
                        **access)


@pytest.fixture
def secret() -> str:
    return _secret()


@pytest.fixture
def token_daemon(tmp_path, secret):
    d = Daemon(_config(tmp_path, token_file=_token_file(tmp_path / "token", secret))).start()
    yield d
    d.stop(grace=1)


def _tokens(ns, blocks: int) -> list[int]:
    return seeded_rng().integers(0, 49152, size=ns.block_size * blocks).tolist()


def _call_every_rpc(address: str, ns, metadata) -> dict[str, grpc.RpcError | None]:
    """Each KvStore RPC once, with valid requests (an open daemon answers every one of them
    OK); what each raised."""
    tokens = _tokens(ns, 1)
    proto_ns = namespace_to_proto(ns)
    block = random_blocks(ns, 1)[0]

    def put_messages():
        yield pb.PutRequest(namespace=proto_ns, token_ids=tokens, first_block=0)
        for chunk in fp16_chunks(ns, 0, block.keys, block.values):
            yield pb.PutRequest(chunk=chunk)

    calls = {
        "Put": lambda s: s.Put(put_messages(), metadata=metadata, timeout=10),
        "Lookup": lambda s: s.Lookup(pb.LookupRequest(namespace=proto_ns, token_ids=tokens),
                                     metadata=metadata, timeout=10),
        "Fetch": lambda s: list(s.Fetch(pb.FetchRequest(namespace=proto_ns, token_ids=tokens),
                                        metadata=metadata, timeout=10)),
        "Locate": lambda s: s.Locate(pb.LocateRequest(namespace=proto_ns, token_ids=tokens),
                                     metadata=metadata, timeout=10),
        "Stats": lambda s: s.Stats(pb.StatsRequest(), metadata=metadata, timeout=10),
    }
    out = {}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.KvStoreStub(channel)
        for name, call in calls.items():
            try:
                call(stub)
                out[name] = None
            except grpc.RpcError as exc:
                out[name] = exc
    return out


@pytest.mark.parametrize("sent", ["none", "wrong", "not bearer"])
def test_every_rpc_without_the_token_is_unauthenticated(token_daemon, namespace, secret, sent):
    metadata = {"none": None, "wrong": [("authorization", f"Bearer {_secret()}")],
                "not bearer": [("authorization", f"Basic {secret}")]}[sent]
    results = _call_every_rpc(token_daemon.address, namespace, metadata)
    assert sorted(results) == ["Fetch", "Locate", "Lookup", "Put", "Stats"]
    for name, exc in results.items():
        assert exc is not None and exc.code() is grpc.StatusCode.UNAUTHENTICATED, name
        assert secret not in exc.details()
    assert token_daemon.store.stats().blocks == 0  # the refused Put stored nothing


def test_the_right_token_opens_every_rpc_and_health_stays_open(token_daemon, namespace, secret):
    results = _call_every_rpc(token_daemon.address, namespace,
                              [("authorization", f"Bearer {secret}")])
    assert results == {name: None for name in ("Put", "Lookup", "Fetch", "Locate", "Stats")}
    with grpc.insecure_channel(token_daemon.address) as channel:  # no token at all
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_watch_needs_the_token(token_daemon, secret):
    """A watch is a stream holding a server thread: open to token holders only."""
    request = health_pb2.HealthCheckRequest()
    with grpc.insecure_channel(token_daemon.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            next(health.Watch(request, timeout=10))
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        watch = health.Watch(request, metadata=[("authorization", f"Bearer {secret}")],
                             timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_refused_calls_are_logged_and_counted(tmp_path, secret, namespace, caplog):
    """The token check refuses inside the RPC log: each refusal is one log line and one
    tqstore_rpcs_total{code="UNAUTHENTICATED"} count."""
    import urllib.request

    d = Daemon(_config(tmp_path, token_file=_token_file(tmp_path / "token", secret),
                       metrics_port=0)).start()
    caplog.set_level(logging.INFO, logger="tqstore.rpc")
    try:
        results = _call_every_rpc(d.address, namespace, None)
        assert all(e.code() is grpc.StatusCode.UNAUTHENTICATED for e in results.values())
        page = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics").read()
    finally:
        d.stop(grace=1)
    for name in results:
        row = f'tqstore_rpcs_total{{code="UNAUTHENTICATED",method="KvStore/{name}"}} 1.0'
        assert row in page.decode(), name
    lines = [r.getMessage() for r in caplog.records if "UNAUTHENTICATED" in r.getMessage()]
    assert len(lines) == 5 and secret not in caplog.text


def test_client_with_the_token_file_puts_and_fetches_on_several_streams(token_daemon, tmp_path,
                                                                         namespace, secret):
    tokens = _tokens(namespace, 6)
    blocks = random_blocks(namespace, 6)
    block_bytes = blocks[0].keys.nbytes + blocks[0].values.nbytes
    # The client's copy may be group-readable (a group of users sharing one client token).
    config = ClientConfig(address=token_daemon.address, direct_reads="off", fetch_streams=3,
                          min_stream_bytes=1, put_piece_bytes=2 * block_bytes,
                          token_file=_token_file(tmp_path / "client-token", secret, 0o640))
    with KvStoreClient(config) as client:
        client.check_access()
        assert client.put(namespace, tokens, 0, blocks) == 6  # three Put pieces
        assert client.lookup(namespace, tokens).hit_blocks == 6
        got = client.fetch_fp16_prefix(namespace, tokens)
    assert (len(got), got.source) == (6, "grpc")
    for i, block in enumerate(blocks):
        assert got.block(i).keys.tobytes() == block.keys.tobytes()
        assert got.block(i).values.tobytes() == block.values.tobytes()
    # The same-host reader only needs Locate to pass the token.
    with KvStoreClient(ClientConfig(address=token_daemon.address, token=secret)) as client:
        direct = client.fetch_fp16_prefix(namespace, tokens)
    assert len(direct) == 6 and direct.source.startswith("direct")


def test_client_without_the_token_gets_a_clear_error(token_daemon, namespace):
    with KvStoreClient(token_daemon.address) as client:
        assert client.is_serving(timeout=5)  # health is open
        with pytest.raises(Unauthenticated, match="UNAUTHENTICATED: no bearer token"):
            client.lookup(namespace, _tokens(namespace, 1))
        with pytest.raises(Unauthenticated):
            client.fetch_fp16_prefix(namespace, _tokens(namespace, 2))  # Locate, then streams
    with KvStoreClient(ClientConfig(address=token_daemon.address, token=_secret())) as client:
        with pytest.raises(Unauthenticated, match="does not match"):
            client.put(namespace, _tokens(namespace, 1), 0, random_blocks(namespace, 1))
    # `tqstore generate`/`openai` stop with the error rather than run without the cache.
    with pytest.raises(Unauthenticated):
        connect(ClientConfig(address=token_daemon.address), log=pytest.fail)


def test_beyond_loopback_without_a_token_refuses_to_start(tmp_path):
    for listen in ("0.0.0.0:0", "[::]:0", "192.168.1.7:50077", "kvhost:50077"):
        with pytest.raises(InvalidArgument, match="refusing to serve without a token"):
            Daemon(_config(tmp_path, listen))
    assert not (tmp_path / "kv").exists()  # the store was never opened
    out = subprocess.run([sys.executable, "-m", "tqstore.cli", "serve", "--path",
                          str(tmp_path / "kv"), "--listen", "0.0.0.0:0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "tqstore: error: --listen 0.0.0.0:0 is not loopback" in out.stderr
    assert "Traceback" not in out.stderr and "serving" not in out.stderr
    assert not (tmp_path / "kv").exists()


def test_token_files_are_checked(tmp_path, secret):
    assert read_token_file(_token_file(tmp_path / "ok", secret), server=True) == BearerToken(secret)
    for mode in (0o640, 0o604):
        with pytest.raises(InvalidArgument, match="readable by its group or other users") as err:
            read_token_file(_token_file(tmp_path / f"m{mode:o}", secret, mode), server=True)
        assert secret not in str(err.value)
    assert read_token_file(str(tmp_path / "m640"), server=False).value == secret
    with pytest.raises(InvalidArgument, match="readable by other users"):
        read_token_file(str(tmp_path / "m604"), server=False)
    for name, text, why in (("empty", " \n", "is empty"), ("spaced", "a b", "without spaces"),
                            ("utf8", "tök", "printable ASCII")):
        with pytest.raises(InvalidArgument, match=why):
            read_token_file(_token_file(tmp_path / name, text), server=True)
    with pytest.raises(InvalidArgument, match="No such file"):
        read_token_file(str(tmp_path / "missing"), server=True)
    # The daemon checks it before binding: a world-readable token file opens nothing.
    with pytest.raises(InvalidArgument, match="chmod 600"):
        Daemon(_config(tmp_path, token_file=str(tmp_path / "m604")))
    assert not (tmp_path / "kv").exists()


def test_the_token_never_reaches_logs_or_reprs(tmp_path, secret, namespace, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = _secret()
    config = _config(tmp_path, token_file=_token_file(tmp_path / "token", secret))
    d = Daemon(config).start()
    try:
        for token in (secret, wrong):
            client_config = ClientConfig(address=d.address, token=token)
            with KvStoreClient(client_config) as client:
                try:
                    client.lookup(namespace, _tokens(namespace, 1))
                except Unauthenticated as exc:
                    assert token not in str(exc)
                texts = [repr(client_config), repr(client.config), repr(BearerToken(token))]
            assert not any(token in t for t in texts)
        assert secret not in repr(d.access) and secret not in repr(d.config)
    finally:
        d.stop(grace=1)
    assert "KvStore/Lookup" in caplog.text and "UNAUTHENTICATED" in caplog.text
    assert secret not in caplog.text and wrong not in caplog.text


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for the name tqstore.test only (not 127.0.0.1): a client must
    name it (tls_server_name) to connect, which tests that setting too."""
    certs = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "server.key", "-out", "server.crt", "-days", "2",
             "-subj", "/CN=tqstore.test", "-addext", "subjectAltName=DNS:tqstore.test", cwd=certs)
    return str(certs / "server.crt"), str(certs / "server.key")


def test_tls_with_a_token_works_and_plaintext_fails_cleanly(tmp_path, certificate, namespace,
                                                            secret):
    cert, key = certificate
    d = Daemon(_config(tmp_path, token_file=_token_file(tmp_path / "token", secret),
                       tls_cert_file=cert, tls_key_file=key)).start()
    try:
        tls = dict(address=d.address, tls_ca_file=cert, tls_server_name="tqstore.test",
                   direct_reads="off")
        tokens, blocks = _tokens(namespace, 2), random_blocks(namespace, 2)
        with KvStoreClient(ClientConfig(token=secret, **tls)) as client:
            assert client.put(namespace, tokens, 0, blocks) == 2
            got = client.fetch_fp16_prefix(namespace, tokens)
            assert got.block(1).keys.tobytes() == blocks[1].keys.tobytes()
        # The flags generate, openai and inspect --addr share give the same connection.
        parser = argparse.ArgumentParser()
        add_connection_arguments(parser)
        args = parser.parse_args(["--token-file", _token_file(tmp_path / "mine", secret),
                                  "--tls-ca", cert, "--tls-server-name", "tqstore.test"])
        with KvStoreClient(client_config_from(args, d.address)) as client:
            assert client.lookup(namespace, tokens).hit_blocks == 2
        with KvStoreClient(ClientConfig(**tls)) as client:  # TLS, no token
            with pytest.raises(Unauthenticated):
                client.lookup(namespace, tokens)
        quick = dict(connect_timeout_s=1, rpc_timeout_s=2)
        for config in (ClientConfig(address=d.address, token=secret, **quick),  # plaintext
                       ClientConfig(address=d.address, token=secret, tls_ca_file=cert, **quick)):
            with KvStoreClient(config) as client:  # the second: the name does not match
                assert not client.is_serving(timeout=1)
                with pytest.raises(Unavailable):
                    client.lookup(namespace, tokens)
    finally:
        d.stop(grace=1)


def test_bad_tls_files_refuse_to_start(tmp_path, certificate):
    cert, key = certificate
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    for cert_file, key_file, why in ((cert, str(tmp_path / "junk.pem"), "not a PEM"),
                                     (str(tmp_path / "junk.pem"), key, "not a PEM"),
                                     (str(tmp_path / "missing.crt"), key, "No such file")):
        with pytest.raises(InvalidArgument, match=why):
            Daemon(_config(tmp_path, tls_cert_file=cert_file, tls_key_file=key_file))
    with pytest.raises(InvalidArgument, match="both --tls-cert and --tls-key"):
        _config(tmp_path, tls_cert_file=cert)
    shared_key = tmp_path / "shared.key"  # the right key, readable by others: refused
    shared_key.write_bytes(open(key, "rb").read())
    os.chmod(shared_key, 0o644)
    with pytest.raises(InvalidArgument, match="chmod 600"):
        Daemon(_config(tmp_path, tls_cert_file=cert, tls_key_file=str(shared_key)))
    assert not (tmp_path / "kv").exists()


def test_client_warns_once_when_its_token_would_travel_in_clear_text(caplog, secret):
    from tqstore.access import open_channel

    caplog.set_level(logging.WARNING, logger="tqstore.access")
    remote = ClientConfig("192.0.2.7:50077", token=secret)  # TEST-NET: never connected
    for _ in range(2):
        open_channel(remote, [], BearerToken(secret)).close()
    open_channel(ClientConfig("127.0.0.1:50077", token=secret), [], BearerToken(secret)).close()
    warnings = [r.getMessage() for r in caplog.records if "clear text" in r.getMessage()]
    assert len(warnings) == 1 and "192.0.2.7" in warnings[0] and secret not in caplog.text


@pytest.fixture
def open_umask():
    before = os.umask(0)  # the most permissive umask: the daemon must not depend on it
    yield
    os.umask(before)


def test_unix_socket_is_0600_whatever_the_umask(tmp_path, open_umask):
    sock = tmp_path / "kv.sock"
    d = Daemon(_config(tmp_path, f"unix:{sock}")).start()
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        with KvStoreClient(f"unix:{sock}") as client:
            assert client.stats().blocks == 0
    finally:
        d.stop(grace=1)
    assert os.umask(0) == 0  # the daemon put the umask back


def test_socket_group_makes_it_0660_for_that_group(tmp_path, open_umask):
    group = grp.getgrgid(os.getgid()).gr_name
    sock = tmp_path / "kv.sock"
    d = Daemon(_config(tmp_path, f"unix:{sock}", socket_group=group)).start()
    try:
        info = os.stat(sock)
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, os.getgid())
    finally:
        d.stop(grace=1)
    with pytest.raises(InvalidArgument, match="no such group"):
        Daemon(_config(tmp_path, f"unix:{tmp_path}/other.sock",
                       socket_group="tqstore-no-such-group"))
    with pytest.raises(InvalidArgument, match="unix:/path --listen only"):
        _config(tmp_path, socket_group=group)
