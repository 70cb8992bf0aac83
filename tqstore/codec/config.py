"""Codec settings: the part of the configuration that decides the bytes of every code."""

from __future__ import annotations

from tqstore.errors import InvalidArgument

from dataclasses import dataclass

from tqstore.codec.codebook import SUPPORTED_BITS


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

    def __post_init__(self) -> None:
        for name in ("key_bits", "value_bits"):
            bits = getattr(self, name)
            if bits not in SUPPORTED_BITS:
                raise InvalidArgument(f"unsupported {name}={bits}: choose one of {SUPPORTED_BITS}")
        if self.key_qjl and self.norm_correction:
            # The QJL sketch corrects the residual of the plain codebook reconstruction; a
            # norm-corrected scale would change that residual. One or the other.
            raise InvalidArgument("key_qjl and norm_correction are exclusive: pick one")

    def identity(self) -> str:
        """Stable text naming these settings; part of the in-memory pool's namespace."""
        return (f"tq1:k{self.key_bits}v{self.value_bits}:nc{int(self.norm_correction)}"
                f":qjl{int(self.key_qjl)}:seed{self.seed}")
