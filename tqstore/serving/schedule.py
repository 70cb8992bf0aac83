"""How the engine shares its one thread between prefill chunks and decode steps.

MLX runs one evaluation at a time, so a prefill chunk stalls every running stream for as long as
it takes: on the CPU a 256-token chunk of SmolLM2 takes seconds, many decode steps' worth. The
chunk cannot be cut finer than its prefill chunk without breaking exact hits (a hit and a cold
run must see the same chunk shapes: tqstore.generator.prefill_bounds), so the engine shares time
instead: while some sequences decode, prefill runs only on credit that decode steps earn, so
decode gets at least `decode_share` of the engine's time and a running stream never waits more
than about one chunk between tokens. With nothing decoding, prefill runs freely (in slices of
prefill_slice_s, to take newly arrived requests into the batch). The default share is 0
(prefill first): ServingConfig.decode_share says what each setting measured.
"""

from __future__ import annotations


class PrefillBudget:
    """Credit, in seconds, that prefill may spend while sequences decode (never above zero:
    time spent decoding alone, with nothing to prefill, is not saved up for a later burst)."""

    def __init__(self, decode_share: float) -> None:
        if not 0.0 <= decode_share < 1.0:
            raise ValueError("decode_share must be in [0, 1)")
        # Each second of decode earns this many seconds of prefill.
        self._rate = (1.0 - decode_share) / decode_share if decode_share else float("inf")
        self.credit = 0.0

    def may_prefill(self, decoding: bool) -> bool:
        """Whether a prefill chunk may run now."""
        if not decoding:
            self.credit = 0.0
        return self.credit >= 0.0

    def spent_prefill(self, seconds: float, decoding: bool) -> None:
        if decoding and self._rate != float("inf"):
            self.credit -= seconds

    def spent_decode(self, seconds: float) -> None:
        self.credit = min(0.0, self.credit + seconds * self._rate)
