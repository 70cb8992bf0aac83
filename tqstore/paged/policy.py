"""Per-layer cache policy: which layers keep dense fp16 KV and which store TurboQuant codes.

Why per layer: error concentrates in a few layers (quality.md), and sliding-window layers hold
few tokens, so compressing them saves little while their recent tokens matter most.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tqstore.codec import CodecConfig


@dataclass(frozen=True)
class CachePolicy:
    """codec=None keeps every layer fp16 (the baseline the quality benchmark compares with)."""

    codec: CodecConfig | None = field(default_factory=CodecConfig)
    fp16_first: int = 0  # the first N layers stay fp16
    fp16_last: int = 0  # the last N layers stay fp16
    fp16_layers: frozenset[int] = frozenset()  # any other layers to keep fp16
    fp16_sliding_window: bool = True  # sliding-window layers stay fp16

    def is_dense(self, layer: int, num_layers: int, sliding: bool = False) -> bool:
        if self.codec is None:
            return True
        if sliding and self.fp16_sliding_window:
            return True
        return (layer < self.fp16_first or layer >= num_layers - self.fp16_last
                or layer in self.fp16_layers)

    def identity(self) -> str:
        """Stable text naming the policy (goes into the pool's prefix-hash namespace)."""
        codec = "fp16" if self.codec is None else self.codec.identity()
        dense = ",".join(str(x) for x in sorted(self.fp16_layers))
        return (f"{codec}:first{self.fp16_first}:last{self.fp16_last}:dense[{dense}]"
                f":swa{int(self.fp16_sliding_window)}")

    def label(self) -> str:
        """Short human label, e.g. K4V4 or K4V4+fp16 first2/last2."""
        if self.codec is None:
            return "fp16"
        c = self.codec
        text = f"K{c.key_bits}V{c.value_bits}" + ("" if c.norm_correction else " (no nc)")
        if self.fp16_first or self.fp16_last:
            text += f" fp16 first{self.fp16_first}/last{self.fp16_last}"
        if self.fp16_layers:
            text += f" fp16 {sorted(self.fp16_layers)}"
        return text


FP16_POLICY = CachePolicy(codec=None)
