"""Codec settings: the part of the configuration that decides the bytes of every code."""

from __future__ import annotations

from tqstore.errors import InvalidArgument

from dataclasses import dataclass

from tqstore.codec.codebook import SUPPORTED_BITS
from tqstore.codec.profile import QualityProfile


@dataclass(frozen=True)
class CodecConfig:
    """TurboQuant settings for keys and values.

    Defaults are chosen by measurement (docs/BENCHMARKS.md, `tqstore bench codec`):
    norm correction on (lower reconstruction error at every bit width), QJL off (at equal bits
    it loses to spending the bit on the MSE codebook, as the anchors also found).
    """

    key_bits: int = 4
    value_bits: int = 4
    norm_correction: bool = True
    key_qjl: bool = False  # 1-bit QJL sketch of the key residual (adds head_dim bits + fp16)
    seed: int = 0  # namespace seed of the rotations
    # Calibrated per-(layer, head) key means and optional per-layer bits (tqstore calibrate).
    # With per-layer bits, key_bits / value_bits are the widest layer's: the width of the
    # daemon's re-quantized code slots on the wire (narrower layers are zero-padded there).
    profile: QualityProfile | None = None

    def __post_init__(self) -> None:
        for name in ("key_bits", "value_bits"):
            bits = getattr(self, name)
            if bits not in SUPPORTED_BITS:
                raise InvalidArgument(f"unsupported {name}={bits}: choose one of {SUPPORTED_BITS}")
        if self.key_qjl and self.norm_correction:
            # The QJL sketch corrects the residual of the plain codebook reconstruction; a
            # norm-corrected scale would change that residual. One or the other.
            raise InvalidArgument("key_qjl and norm_correction are exclusive: pick one")
        if self.profile is not None:
            if not isinstance(self.profile, QualityProfile):
                raise InvalidArgument("profile must be a QualityProfile")
            if self.key_qjl:
                raise InvalidArgument("a quality profile needs MSE key codes (key_qjl=False)")
            for name in ("key_bits", "value_bits"):
                per_layer = getattr(self.profile, name)
                if per_layer and max(per_layer) != getattr(self, name):
                    raise InvalidArgument(f"{name}={getattr(self, name)} must be the profile's "
                                          f"widest layer ({max(per_layer)})")

    def layer_bits(self, layer: int) -> tuple[int, int]:
        """(key bits, value bits) of one layer."""
        if self.profile is None:
            return self.key_bits, self.value_bits
        return self.profile.bits_for(layer, self.key_bits, self.value_bits)

    def identity(self) -> str:
        """Stable text naming these settings; part of the in-memory pool's namespace."""
        text = (f"tq1:k{self.key_bits}v{self.value_bits}:nc{int(self.norm_correction)}"
                f":qjl{int(self.key_qjl)}:seed{self.seed}")
        if self.profile is not None:
            text += f":profile{self.profile.digest}"
        return text
