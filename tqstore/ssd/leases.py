"""Leases: blocks a same-host reader was told where to find (Locate) stay out of eviction for a
while, so its reads normally find the files it was given.

A lease is a promise about eviction order only, never about the bytes: the store still evicts a
leased block when a Put cannot make room any other way, and quarantine ignores leases. The reader
verifies every byte against the checksums it was given (tqstore/direct_read.py), so a payload
that went away or changed anyway is a shorter hit, never a wrong one. Leases live in memory: a
restarted daemon forgets them, which is safe for the same reason.
"""

from __future__ import annotations

import threading
import time
from typing import Iterable

MAX_LEASED_KEYS = 1 << 20  # bounds the table; past it the oldest leases are dropped


class Leases:
    def __init__(self, clock=time.monotonic) -> None:
        self._until: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def grant(self, keys: Iterable[bytes], seconds: float) -> None:
        until = self._clock() + seconds
        with self._lock:
            for key in keys:
                # Re-inserted at the end, so the table's order is (about) grant order and the
                # bound drops the oldest first.
                self._until[key] = max(until, self._until.pop(key, 0.0))
            while len(self._until) > MAX_LEASED_KEYS:
                del self._until[next(iter(self._until))]

    def live(self) -> frozenset[bytes]:
        """Keys whose lease has not expired (expired ones are dropped)."""
        now = self._clock()
        with self._lock:
            expired = [k for k, t in self._until.items() if t <= now]
            for k in expired:
                del self._until[k]
            return frozenset(self._until)
