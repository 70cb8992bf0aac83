"""Calibrated quality profile: what a codec needs from a model beyond its bit widths.

A profile holds, for one model's KV layout:
- key_means: the per-(layer, kv_head) mean key, float16 (layers, kv_heads, key_head_dim).
  Keys are quantized around it (codes of k - mean). About 39% of SmolLM2's key energy is that
  mean; it cannot change softmax (q . mean is the same for every token of a head), so decode
  attention scores the residual only and the mean never needs to be added back there.
- key_bits / value_bits: optional per-layer bit widths (empty = the CodecConfig's own).

Invariants:
- ``to_bytes`` is deterministic (fixed header field order, little-endian fp16 payload), so
  ``digest`` (sha256 of the bytes) names the profile; it goes into ``CodecConfig.identity()``
  and therefore into the in-memory pool's namespace (the SSD tier stays codec-neutral fp16).
- Means are stored as float16 and used as float32 exactly as stored, so the daemon and the
  generators compute the same k - mean in float32 from the same bytes.
- ``from_bytes`` validates everything and raises ValueError on garbage (it parses wire input).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import numpy as np

from tqstore.codec.codebook import SUPPORTED_BITS

MAGIC = b"TQPROF1\0"
MAX_HEADER = 1 << 16
MAX_DIM = 1 << 12


@dataclass(frozen=True)
class QualityProfile:
    """Frozen and hashable (arrays are kept as their fp16 bytes)."""

    model: str  # model fingerprint the profile was calibrated on
    num_layers: int
    num_kv_heads: int
    key_head_dim: int
    key_means: bytes = b""  # float16 little-endian (layers, kv_heads, key_head_dim), or empty
    key_bits: tuple[int, ...] = ()  # per layer, or empty
    value_bits: tuple[int, ...] = ()  # per layer, or empty
    calibration: str = ""  # how it was made (text name and sha256, positions)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "key_head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_DIM:
                raise ValueError(f"profile {name}={v!r} out of range")
        if not isinstance(self.model, str) or not isinstance(self.calibration, str):
            raise ValueError("profile model and calibration must be text")
        if not isinstance(self.key_means, bytes):
            raise ValueError("profile key_means must be bytes")
        want = self.num_layers * self.num_kv_heads * self.key_head_dim * 2
        if self.key_means and len(self.key_means) != want:
            raise ValueError(f"profile key_means holds {len(self.key_means)} bytes, expected {want}")
        if self.key_means and not np.isfinite(self._means16()).all():
            raise ValueError("profile key_means are not finite")
        for name in ("key_bits", "value_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, tuple):
                raise ValueError(f"profile {name} must be a tuple")
            if bits and (len(bits) != self.num_layers
                         or any(not isinstance(b, int) or b not in SUPPORTED_BITS for b in bits)):
                raise ValueError(f"profile {name} must give one of {SUPPORTED_BITS} per layer")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def build(cls, model: str, key_means: np.ndarray | None, *, num_layers: int | None = None,
              num_kv_heads: int | None = None, key_head_dim: int | None = None,
              key_bits: tuple[int, ...] = (), value_bits: tuple[int, ...] = (),
              calibration: str = "") -> "QualityProfile":
        """From float means (layers, kv_heads, key_head_dim), rounded once to float16."""
        if key_means is not None:
            num_layers, num_kv_heads, key_head_dim = (int(d) for d in key_means.shape)
            with np.errstate(over="ignore"):  # out-of-range means become inf: rejected below
                # Straight from the caller's precision: float64 -> float32 -> float16 rounds
                # twice, and 11 of 3,000 random float64 means landed one fp16 ulp off.
                raw = np.ascontiguousarray(key_means).astype("<f2").tobytes()
        else:
            raw = b""
        return cls(model, int(num_layers), int(num_kv_heads), int(key_head_dim), raw,
                   tuple(int(b) for b in key_bits), tuple(int(b) for b in value_bits), calibration)

    # -- use ---------------------------------------------------------------------------------
    def _means16(self) -> np.ndarray:
        return np.frombuffer(self.key_means, dtype="<f2").reshape(
            self.num_layers, self.num_kv_heads, self.key_head_dim)

    def key_mean(self, layer: int) -> np.ndarray | None:
        """float32 (kv_heads, key_head_dim) mean of one layer, exactly the stored fp16 values."""
        if not self.key_means:
            return None
        return self._means16()[layer].astype(np.float32)

    def bits_for(self, layer: int, key_bits: int, value_bits: int) -> tuple[int, int]:
        """(key bits, value bits) of one layer; the given defaults where the profile has none."""
        return (self.key_bits[layer] if self.key_bits else key_bits,
                self.value_bits[layer] if self.value_bits else value_bits)

    def check_layout(self, num_layers: int, num_kv_heads: int, key_head_dim: int) -> None:
        got = (self.num_layers, self.num_kv_heads, self.key_head_dim)
        if got != (num_layers, num_kv_heads, key_head_dim):
            raise ValueError(f"profile is for (layers, kv_heads, head_dim) {got}, "
                             f"not {(num_layers, num_kv_heads, key_head_dim)}")

    # -- bytes -------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        header = json.dumps({
            "model": self.model, "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
            "key_head_dim": self.key_head_dim, "key_bits": list(self.key_bits),
            "value_bits": list(self.value_bits), "calibration": self.calibration,
            "key_means": len(self.key_means),
        }, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        return MAGIC + struct.pack("<I", len(header)) + header + self.key_means

    @classmethod
    def from_bytes(cls, data: bytes) -> "QualityProfile":
        data = bytes(data)
        if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
            raise ValueError("not a tqstore quality profile (bad magic)")
        (n,) = struct.unpack_from("<I", data, len(MAGIC))
        start = len(MAGIC) + 4
        if n > MAX_HEADER or start + n > len(data):
            raise ValueError("quality profile header truncated or too large")
        try:
            head = json.loads(data[start : start + n].decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"quality profile header is not valid JSON: {exc}") from None
        keys = {"model", "num_layers", "num_kv_heads", "key_head_dim", "key_bits", "value_bits",
                "calibration", "key_means"}
        if not isinstance(head, dict) or set(head) != keys:
            raise ValueError("quality profile header has the wrong fields")
        payload = data[start + n :]
        if head["key_means"] != len(payload):
            raise ValueError("quality profile payload length does not match its header")
        if not all(isinstance(head[k], list) for k in ("key_bits", "value_bits")):
            raise ValueError("quality profile bits must be lists")
        profile = cls(head["model"], head["num_layers"], head["num_kv_heads"], head["key_head_dim"],
                      payload, tuple(head["key_bits"]), tuple(head["value_bits"]),
                      head["calibration"])
        if profile.to_bytes() != data:  # non-canonical encodings would get another digest
            raise ValueError("quality profile bytes are not in canonical form")
        return profile

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()
