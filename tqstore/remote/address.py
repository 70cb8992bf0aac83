"""The remote tier's address: `redis://[user:password@]host:port[/db]`, `rediss://` (TLS), and
`redis-cluster://host1:port1,host2:port2,...` (`rediss-cluster://` with TLS; the password form as
for redis://). Parsed once at start-up, so a typo is a clear error before the daemon serves.
The password never appears in logs, Stats or `inspect`: `redacted` is what they print.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

from tqstore.errors import InvalidArgument

_SCHEMES = {"redis": (False, False), "rediss": (False, True),
            "redis-cluster": (True, False), "rediss-cluster": (True, True)}


@dataclass(frozen=True)
class RemoteAddress:
    cluster: bool
    tls: bool
    nodes: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def redacted(self) -> str:
        """The address as logs and Stats show it: scheme, user and nodes; no password."""
        scheme = ("rediss" if self.tls else "redis") + ("-cluster" if self.cluster else "")
        who = ""
        if self.username or self.password:
            who = f"{self.username or ''}{':***' if self.password else ''}@"
        hosts = ",".join(f"{h}:{p}" for h, p in self.nodes)
        return f"{scheme}://{who}{hosts}" + (f"/{self.db}" if self.db else "")


def parse_remote(url: str, password_override: str | None = None) -> RemoteAddress:
    """Parse a --remote URL (module docstring); `password_override` (--remote-password-file)
    replaces one in the URL. InvalidArgument names what is wrong, never the password."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise InvalidArgument(f"--remote must start with one of "
                              f"{', '.join(s + '://' for s in _SCHEMES)}")
    cluster, tls = _SCHEMES[scheme]
    username = password = None
    if "@" in rest:
        creds, rest = rest.rsplit("@", 1)
        user, colon, secret = creds.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if not colon:  # redis://secret@host is how some tools write a bare password
            username, password = None, unquote(user) or None
    if "?" in rest:
        raise InvalidArgument("--remote takes no ?options; give a password as "
                              "redis://:password@host:port or with --remote-password-file")
    hosts, slash, db_text = rest.partition("/")
    db = 0
    if slash and db_text:
        if cluster:
            raise InvalidArgument("--remote: Redis Cluster has only database 0")
        if not db_text.isdigit():
            raise InvalidArgument("--remote: the database after / must be a number")
        db = int(db_text)
    nodes = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = item.strip(), "6379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(f"--remote: bad host:port {item.strip()!r}")
        nodes.append((host, int(port)))
    if not cluster and len(nodes) != 1:
        raise InvalidArgument("--remote redis:// takes one host:port; use redis-cluster:// "
                              "for several nodes")
    if password_override is not None:
        password = password_override
    return RemoteAddress(cluster, tls, tuple(nodes), db, username, password)
