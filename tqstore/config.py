"""Configuration in one typed place. Each subsystem owns the section that decides its bytes
(CodecConfig in tqstore.codec, StoreConfig in tqstore.ssd); this module adds the daemon's and
the client's sections. Nothing reads environment variables.

The client imports this module and must not load the store (tqstore.ssd, lmdb;
tests/test_layering.py), so StoreConfig is imported only when the daemon's side asks for it:
building a ServerConfig with the default store, or `from tqstore.config import StoreConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqstore.codec.config import CodecConfig

if TYPE_CHECKING:
    from tqstore.ssd.config import StoreConfig

MiB = 1 << 20
DEFAULT_LISTEN = "127.0.0.1:50077"

__all__ = ["ClientConfig", "CodecConfig", "DEFAULT_LISTEN", "ServerConfig", "StoreConfig"]


@dataclass(frozen=True)
class ServerConfig:
    """`tqstore serve`. Listens on loopback (or a Unix socket) unless told otherwise."""

    path: str
    listen: str = DEFAULT_LISTEN
    max_message_bytes: int = 32 * MiB  # both directions; chunks are ~1 MiB
    max_put_bytes: int = 2048 * MiB  # one Put stream
    workers: int = 16
    drain_seconds: float = 30.0
    recent_requests: int = 256  # per-request hit rates kept for Stats
    store: StoreConfig = field(default_factory=lambda: _store_config()())  # StoreConfig()

    def __post_init__(self) -> None:
        if not (self.listen.startswith("unix:") or ":" in self.listen):
            raise ValueError(f"--listen must be unix:/path or host:port, got {self.listen!r}")

    @property
    def is_loopback(self) -> bool:
        host = self.listen.rsplit(":", 1)[0].strip("[]")
        return self.listen.startswith("unix:") or host in ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ClientConfig:
    """A generator's connection to the daemon."""

    address: str = DEFAULT_LISTEN
    max_message_bytes: int = 32 * MiB
    connect_timeout_s: float = 2.0
    rpc_timeout_s: float = 60.0


def _store_config() -> type[StoreConfig]:
    from tqstore.ssd.config import StoreConfig  # the daemon's side only (module doc)

    return StoreConfig


def __getattr__(name: str) -> Any:
    """`tqstore.config.StoreConfig`, resolved on first use (PEP 562; see the module doc)."""
    if name == "StoreConfig":
        return _store_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
