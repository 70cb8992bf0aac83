"""Per-layer cache policy: which layers keep dense fp16 KV and which store TurboQuant codes.

Why per layer: error concentrates in a few layers (quality.md), and sliding-window layers hold
few tokens, so compressing them saves little while their recent tokens matter most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqstore.codec import CodecConfig
from tqstore.codec.profile import QualityProfile

PROFILE_DIR = Path(__file__).resolve().parent.parent / "data" / "profiles"


@dataclass(frozen=True)
class CachePolicy:
    """codec=None keeps every layer fp16 (the baseline the quality benchmark compares with)."""

    codec: CodecConfig | None = field(default_factory=CodecConfig)
    fp16_first: int = 0  # the first N layers stay fp16
    fp16_last: int = 0  # the last N layers stay fp16
    fp16_layers: frozenset[int] = frozenset()  # any other layers to keep fp16
    fp16_sliding_window: bool = True  # sliding-window layers stay fp16
    # The newest, not yet full block of a sequence stays fp16 until it fills (tqstore.paged.tail)
    fp16_tail: bool = False

    def is_dense(self, layer: int, num_layers: int, sliding: bool = False) -> bool:
        if self.codec is None:
            return True
        if sliding and self.fp16_sliding_window:
            return True
        return (layer < self.fp16_first or layer >= num_layers - self.fp16_last
                or layer in self.fp16_layers)

    @classmethod
    def default(cls, fingerprint: str | None = None) -> "CachePolicy":
        """The default policy for a model (see ``default_policy``)."""
        return default_policy(fingerprint)

    def identity(self) -> str:
        """Stable text naming the policy (goes into the pool's prefix-hash namespace)."""
        codec = "fp16" if self.codec is None else self.codec.identity()
        dense = ",".join(str(x) for x in sorted(self.fp16_layers))
        tail = ":fp16tail" if self.fp16_tail and self.codec is not None else ""
        return (f"{codec}:first{self.fp16_first}:last{self.fp16_last}:dense[{dense}]"
                f":swa{int(self.fp16_sliding_window)}{tail}")

    def label(self) -> str:
        """Short human label, e.g. K4V4 or K4V4+fp16 first2/last2."""
        if self.codec is None:
            return "fp16"
        c = self.codec
        text = f"K{c.key_bits}V{c.value_bits}" + ("" if c.norm_correction else " (no nc)")
        if c.profile is not None:
            p = c.profile
            if p.key_bits:
                kb, vb = sum(p.key_bits) / len(p.key_bits), sum(p.value_bits) / len(p.value_bits)
                text = f"K{kb:.2f}V{vb:.2f} per-layer"
            text += (" +mean" if p.key_means else "") + f" (profile {p.digest[:8]})"
        if self.fp16_first or self.fp16_last:
            text += f" fp16 first{self.fp16_first}/last{self.fp16_last}"
        if self.fp16_layers:
            text += f" fp16 {sorted(self.fp16_layers)}"
        if self.fp16_tail:
            text += " +fp16 tail"
        return text


FP16_POLICY = CachePolicy(codec=None)


def profile_bytes_per_token(policy: CachePolicy, amortize_tokens: int = 2048) -> float:
    """The profile's live bytes (the key means, float16) spread over ``amortize_tokens`` tokens:
    what a sequence of that length pays for them if it were the only one using the model."""
    if policy.codec is None or policy.codec.profile is None:
        return 0.0
    return len(policy.codec.profile.key_means) / amortize_tokens


def default_profile_path(fingerprint: str | None = None) -> Path:
    """Where `tqstore calibrate` writes a model's profile (and where it is shipped)."""
    name = (fingerprint or "sha256:smollm2").replace(":", "-")[:23]
    return PROFILE_DIR / f"{name}.tqprofile"


def find_profile(fingerprint: str) -> QualityProfile | None:
    """The shipped/calibrated profile of a model, or None."""
    path = default_profile_path(fingerprint)
    if not path.exists():
        return None
    profile = QualityProfile.from_bytes(path.read_bytes())
    return profile if profile.model == fingerprint else None


def means_only(profile: QualityProfile) -> QualityProfile:
    """The profile without per-layer bits (uniform code widths in every layer)."""
    return QualityProfile(profile.model, profile.num_layers, profile.num_kv_heads,
                          profile.key_head_dim, profile.key_means, calibration=profile.calibration)


def profile_policy(profile: QualityProfile) -> CachePolicy:
    """A profile's own policy: its per-layer bits (the codec's widths are the widest layer's,
    what the wire carries) around its key means, with the newest block in fp16 (the policy
    `tqstore calibrate` allocates bits for)."""
    if not profile.key_bits:
        raise ValueError("profile has no per-layer bits")
    codec = CodecConfig(max(profile.key_bits), max(profile.value_bits), profile=profile)
    return CachePolicy(codec=codec, fp16_tail=True)


def default_policy(fingerprint: str | None = None) -> CachePolicy:
    """The policy `tqstore generate` and the demo use for a model: the calibrated profile's
    per-layer bits around its key means with the fp16 tail, chosen from the quality table
    (docs/fragments/quality.md); K4V4 with the fp16 tail for a model without a profile."""
    profile = find_profile(fingerprint) if fingerprint else None
    if profile is None or not profile.key_bits:
        return CachePolicy(fp16_tail=True)
    return profile_policy(profile)
