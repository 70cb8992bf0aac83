"""One completion request as the engine sees it, and the token events it hands out.

``Request`` is shared by two threads: an HTTP thread reads ``events`` (and may call ``cancel``
or ``stop``, which only set flags); every other field is written by the engine thread only.
"""

from __future__ import annotations

import queue
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tqstore.serving.sampling import SamplingParams


@dataclass
class TokenEvent:
    token: int
    logprob: float
    finish_reason: str | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Request:
    """One completion request. ``events`` receives ("progress", done, total), TokenEvent,
    ("done", None) or ("error", exc); ``cancel()`` may be called from any thread."""

    id: int
    prompt: list[int]
    params: SamplingParams
    events: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    state: str = "waiting"
    memory_tokens: int = 0
    daemon_tokens: int = 0
    daemon_status: str = ""
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    stop_requested: bool = False
    # engine-thread only
    pages_written: bool = False  # its prompt's pages are in the pool (after its first step)
    held: bool = False  # waited for another request's prefix
    fetch_epoch: int | None = None  # the engine's landed-uploads count when it asked the daemon
    replanned: bool = False  # planned again once because uploads landed after its answer
    uploads: list = field(default_factory=list)  # its Put futures
    _prompt_ids: np.ndarray | None = None
    caches: list | None = None
    fetch: Future | None = None
    blocks: list = field(default_factory=list)
    bounds: list[int] = field(default_factory=list)
    chunk: int = 0
    next_token: int | None = None
    key: Any = None
    matcher: Any = None

    @property
    def context(self) -> list[int]:
        """Every token in its cache or about to be: the prompt and what it generated."""
        return self.prompt + self.generated

    @property
    def prompt_ids(self) -> np.ndarray:
        if self._prompt_ids is None:
            self._prompt_ids = np.asarray(self.prompt, dtype=np.int64)
        return self._prompt_ids

    def cancel(self) -> None:
        """The client went away: free everything, count it cancelled."""
        self.cancelled = True

    def stop(self) -> None:
        """The answer is complete (a stop word found in its text): finish it as stopped."""
        self.stop_requested = True

    @property
    def computed_tokens(self) -> int:
        return len(self.prompt) - self.memory_tokens - self.daemon_tokens

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted
