"""Prefill progress on stderr for the commands that run a model (generate, demo).

A cold prefill of a few thousand tokens takes 10-20 s on a 2-core CPU; without a sign of life
the command looks hung. On a terminal: one bar redrawn in place. Otherwise (a log file, a
pipe, a test): a plain line at most every ``interval_s`` seconds and always the last one, so
logs stay short and greppable."""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 30


class PrefillProgress:
    """A ``progress(done, total)`` callback for CachedGenerator.generate."""

    def __init__(self, label: str = "prefill", stream: TextIO | None = None,
                 interval_s: float = 2.0) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        # A terminal redraws cheaply; a log gets a line only every few seconds.
        self.interval_s = 0.1 if self.tty else interval_s
        self._start = time.perf_counter()
        self._last = self._start

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self._last < self.interval_s:
            return
        self._last = now
        elapsed = now - self._start
        if self.tty:
            filled = BAR_WIDTH * done // max(total, 1)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            end = "\n" if done >= total else ""
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} tokens {elapsed:.1f} s{end}")
        else:
            self.stream.write(f"{self.label}: {done}/{total} tokens, {elapsed:.1f} s\n")
        self.stream.flush()
