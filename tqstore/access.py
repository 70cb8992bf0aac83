"""Who may use the daemon: bearer tokens, TLS, and the Unix socket's permissions (issue 17).

The policy, in the order the daemon applies it at start (before it binds or opens the store):

- With no token configured, access is decided by the address alone. A Unix socket is created
  0600 (only the daemon's user can connect) or 0660 owned by --socket-group (that group's
  members too). A loopback TCP port is open to EVERY local user: the daemon warns at start. On
  a host shared by several users, use a Unix socket or a token.
- An address other than loopback or a Unix socket (0.0.0.0, [::], a LAN IP, a host name, an
  abstract socket) refuses to start without --token-file: there every machine that can route
  to the port could read and overwrite the store.
- A token set on any address, loopback and Unix sockets included, is required there too. Every
  KvStore RPC must carry the metadata `authorization: Bearer <token>`; the server interceptor
  (TokenCheck) compares it in constant time (hmac.compare_digest) and answers UNAUTHENTICATED
  otherwise, with a message that never contains a token, before the request is parsed.
- The gRPC health check (grpc.health.v1.Health/Check) stays open without a token: it answers
  only SERVING or NOT_SERVING, which the open port already tells, and lets load balancers and
  `KvStoreClient.is_serving` probe without the secret. Health/Watch needs the token: a watch is
  a stream that holds a server thread for as long as the caller likes.
- TLS (--tls-cert/--tls-key, PEM) encrypts the connection, so the token cannot be sniffed; it
  does not authenticate clients (the token does). Without TLS the token travels in clear text:
  the daemon warns when that happens on a non-loopback address, and so does a client (once per
  address) sending a token to an address other than loopback or a Unix socket. The daemon
  refuses a TLS key file its group or others may read, as it does a token file.

Token files are read once at start and stripped of surrounding whitespace; an empty file, one
over 4 KiB (the wrong file, e.g. a certificate) or one with characters that cannot travel in a
gRPC header is refused. The daemon refuses a token file that its group or others may read
(chmod 600): anyone who can read it can use the store. A client refuses one that others may
read, and accepts a group-readable one (a group of users sharing one client token is a
deliberate set-up). A token is held only in BearerToken, whose repr hides it; it is never logged.
"""

from __future__ import annotations

import grp
import hmac
import logging
import os
import ssl
import stat
from dataclasses import dataclass, field
from typing import Any, Sequence

import grpc

from tqstore.config import ClientConfig, ServerConfig, is_local_address
from tqstore.errors import InvalidArgument
from tqstore.rpc_log import handler_parts

log = logging.getLogger("tqstore.access")

# Methods anyone may call: the health check reveals only whether the daemon serves.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check"})
MAX_TOKEN_FILE_BYTES = 4096
SOCKET_MODE = 0o600
GROUP_SOCKET_MODE = 0o660


@dataclass(frozen=True)
class BearerToken:
    """A shared secret. Its repr (and str) never shows the value."""

    value: str = field(repr=False)

    def matches(self, credential: str) -> bool:
        # Constant time over the expected value: a wrong guess learns nothing from the timing.
        return hmac.compare_digest(credential.encode(), self.value.encode())

    @property
    def metadata(self) -> tuple[str, str]:
        return ("authorization", f"Bearer {self.value}")


def read_token_file(path: str, *, server: bool) -> BearerToken:
    """The token in ``path``, checked as the module docstring says (``server``: the daemon's
    stricter mode rule). Errors name the file, never its contents."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode  # the file actually read, not a swapped path
            raw = f.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidArgument(f"token file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise InvalidArgument(f"token file {path} is not a regular file")
    too_open = mode & (0o077 if server else 0o007)
    if too_open:
        who = "its group or other users" if server else "other users"
        raise InvalidArgument(f"token file {path} is readable by {who} (mode "
                              f"{stat.S_IMODE(mode):04o}): chmod {'600' if server else 'o-rwx'} "
                              f"{path}")
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise InvalidArgument(f"token file {path} is over {MAX_TOKEN_FILE_BYTES} bytes: not a token")
    try:
        value = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        value = None
    if value is None or any(not (0x21 <= ord(c) <= 0x7e) for c in value):
        raise InvalidArgument(f"token file {path}: a token is printable ASCII without spaces "
                              "(e.g. the output of `openssl rand -hex 32`)")
    if not value:
        raise InvalidArgument(f"token file {path} is empty")
    return BearerToken(value)


# -- the daemon's side ---------------------------------------------------------------------------

class TokenCheck(grpc.ServerInterceptor):
    """Refuses every call without the daemon's bearer token, except the open health service.

    Installed right inside tqstore.rpc_log's RpcLog (which logs and counts refused calls like
    any other): a refused call never reaches the handler or takes a stream slot, and its
    request is not even parsed (the refusing handler takes raw bytes)."""

    def __init__(self, token: BearerToken) -> None:
        self._token = token

    def _refusal(self, metadata: Sequence[Any] | None) -> str | None:
        """Why the call is refused (a message safe to send and log), or None to let it in."""
        values = [m.value for m in metadata or () if m.key == "authorization"]
        if not values:
            return "no bearer token: this daemon requires one (client: --token-file)"
        for value in values:
            scheme, _, credential = str(value).partition(" ")
            if scheme.lower() == "bearer" and self._token.matches(credential.strip()):
                return None
        return "the bearer token does not match the daemon's"

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in OPEN_METHODS:
            return continuation(handler_call_details)
        why = self._refusal(handler_call_details.invocation_metadata)
        handler = continuation(handler_call_details)
        if why is None or handler is None:
            return handler
        return _refusing(handler, method, why)


def _refusing(handler: grpc.RpcMethodHandler, method: str, why: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that answers UNAUTHENTICATED without reading the request."""
    def deny(request, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    _, make = handler_parts(handler)
    return make(deny)  # no deserializer: the request stays unparsed bytes


@dataclass(frozen=True)
class ServerAccess:
    """What the daemon enforces, read and checked once at start (from_config)."""

    token: BearerToken | None = field(default=None, repr=False)
    credentials: grpc.ServerCredentials | None = field(default=None, repr=False)
    socket_gid: int | None = None

    @classmethod
    def from_config(cls, config: ServerConfig) -> "ServerAccess":
        """Applies the policy; raises InvalidArgument before anything is bound or opened."""
        if not config.is_loopback and config.token_file is None:
            raise InvalidArgument(
                f"--listen {config.listen} is not loopback or a Unix socket: refusing to serve "
                "without a token (anyone who can reach the port could read and overwrite the "
                "store). Pass --token-file FILE (and --tls-cert/--tls-key to encrypt it), or "
                "listen on 127.0.0.1 or unix:/path")
        token = read_token_file(config.token_file, server=True) if config.token_file else None
        credentials = None
        if config.tls_cert_file is not None:
            credentials = server_credentials(config.tls_cert_file, config.tls_key_file)
        gid = _group_id(config.socket_group) if config.socket_group is not None else None
        return cls(token, credentials, gid)

    @property
    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [] if self.token is None else [TokenCheck(self.token)]

    def add_port(self, server: grpc.Server, listen: str) -> int:
        """Binds ``listen`` (TLS when configured). A Unix socket is never connectable by more
        users than intended, not even for a moment: it is created under umask 0177 (mode
        0600), then given its group and 0660 if socket_group is set. The umask is
        process-wide; the daemon binds before it opens the store or starts any thread that
        creates files, so nothing else is created with it."""
        def add() -> int:
            if self.credentials is not None:
                return server.add_secure_port(listen, self.credentials)
            return server.add_insecure_port(listen)

        if not listen.startswith("unix:"):
            return add()
        before = os.umask(0o177)
        try:
            port = add()
        finally:
            os.umask(before)
        path = listen[len("unix:"):]
        os.chmod(path, SOCKET_MODE)  # gRPC replaced any stale file; state the mode outright
        if self.socket_gid is not None:
            try:
                os.chown(path, -1, self.socket_gid)
            except OSError as exc:  # EPERM: the daemon's user is not in that group
                raise OSError(f"cannot give {path} to group {self.socket_gid}: "
                              f"{exc.strerror or exc}") from None
            os.chmod(path, GROUP_SOCKET_MODE)
        return port

    def start_warnings(self, config: ServerConfig) -> list[str]:
        """What the daemon logs at start about who can reach it (never the token)."""
        tcp = not config.listen.startswith("unix:")
        if self.token is None and tcp:
            return [f"listening on {config.listen} without a token: every user of this host can "
                    "read and overwrite the store; on a shared host use a unix:/path socket "
                    "(0600) or --token-file"]
        if self.token is not None and self.credentials is None and not config.is_loopback:
            return [f"listening on {config.listen} with a token but no TLS: the token travels in "
                    "clear text; add --tls-cert/--tls-key"]
        return []


def server_credentials(cert_file: str, key_file: str | None) -> grpc.ServerCredentials:
    """TLS credentials from a PEM certificate chain and its key, checked to load and to match
    (gRPC itself would only fail at the first handshake, or abort)."""
    if key_file is None:
        raise InvalidArgument("--tls-cert needs --tls-key")
    pems = []
    for what, path in (("certificate", cert_file), ("key", key_file)):
        try:
            with open(path, "rb") as f:
                pems.append(f.read())
        except OSError as exc:
            raise InvalidArgument(f"TLS {what} {path}: {exc.strerror or exc}") from None
    try:
        # The password callback stops OpenSSL from prompting on the terminal for an
        # encrypted key; an empty password then fails like any bad key.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file,
                                                                password=lambda: b"")
    except ssl.SSLError as exc:
        raise InvalidArgument(f"--tls-cert {cert_file} / --tls-key {key_file}: not a PEM "
                              f"certificate and its unencrypted key ({exc.reason or exc})") from None
    _check_private(key_file, "TLS key")
    return grpc.ssl_server_credentials([(pems[1], pems[0])])


def _check_private(path: str, what: str) -> None:
    """A secret the daemon reads must be readable by its user alone (like a token file)."""
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise InvalidArgument(f"{what} {path} is readable by its group or other users (mode "
                              f"{stat.S_IMODE(mode):04o}): chmod 600 {path}")


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise InvalidArgument(f"--socket-group {name}: no such group") from None


# -- the client's side ---------------------------------------------------------------------------

class _BearerMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the token to every call of a channel (metadata rather than call credentials: those
    gRPC sends only over TLS, and the token is also used on Unix sockets and loopback)."""

    def __init__(self, token: BearerToken) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout,
                            list(details.metadata or ()) + [self._token.metadata],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any = field(repr=False)  # carries the token
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def client_token(config: ClientConfig) -> BearerToken | None:
    """The token a client sends: ClientConfig.token, or read from token_file (once)."""
    if config.token is not None:
        return BearerToken(config.token)
    if config.token_file is not None:
        return read_token_file(config.token_file, server=False)
    return None


_WARNED_CLEAR_TEXT: set[str] = set()


def _warn_clear_text(address: str) -> None:
    """Once per address: the token is about to cross the network unencrypted."""
    if address not in _WARNED_CLEAR_TEXT:
        _WARNED_CLEAR_TEXT.add(address)
        log.warning("sending the bearer token to %s without TLS: it travels in clear text; "
                    "use tls / tls_ca_file", address)


def open_channel(config: ClientConfig, options: list[tuple[str, Any]],
                 token: BearerToken | None) -> grpc.Channel:
    """A channel to config.address: TLS when configured (against tls_ca_file, or the system's
    roots), sending ``token`` on every call when given."""
    if config.uses_tls:
        roots = None
        if config.tls_ca_file is not None:
            try:
                with open(config.tls_ca_file, "rb") as f:
                    roots = f.read()
            except OSError as exc:
                raise InvalidArgument(f"TLS CA {config.tls_ca_file}: "
                                      f"{exc.strerror or exc}") from None
        if config.tls_server_name:
            options = options + [("grpc.ssl_target_name_override", config.tls_server_name)]
        channel = grpc.secure_channel(config.address, grpc.ssl_channel_credentials(roots),
                                      options=options)
    else:
        channel = grpc.insecure_channel(config.address, options=options)
        if token is not None and not is_local_address(config.address):
            _warn_clear_text(config.address)
    if token is None:
        return channel
    return grpc.intercept_channel(channel, _BearerMetadata(token))
