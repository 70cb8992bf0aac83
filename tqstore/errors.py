"""The error hierarchy. Each class maps to exactly one gRPC status code; the mapping lives in
the server (one place). Library callers catch these; the daemon turns them into statuses."""

from __future__ import annotations


class TqstoreError(Exception):
    """Base class of every error tqstore raises on purpose."""


class InvalidArgument(TqstoreError, ValueError):
    """The request itself is wrong: shapes, dtypes, sizes, unknown settings."""


class NotFound(TqstoreError, KeyError):
    """A named block or namespace does not exist (or failed verification)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ResourceExhausted(TqstoreError):
    """A budget or size limit would be exceeded."""


class Corruption(TqstoreError):
    """Stored bytes failed verification. Readers turn this into a counted miss."""


class Unavailable(TqstoreError):
    """A dependency (the daemon, the disk) cannot be reached right now."""


class Unauthenticated(TqstoreError):
    """The daemon refused the call: no bearer token, or not its token (gRPC UNAUTHENTICATED)."""
