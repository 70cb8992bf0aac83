"""Deterministic re-quantization of fp16 blocks on the daemon.

A block's layers are quantized in one call by stacking (layer, kv_head) pairs on the head axis,
each with its own rotation seed (layer, kv_head, K|V). Because the codec's quantization is a
fixed per-vector sequence of elementwise float32 operations, the codes equal those the
generator's per-layer codecs (tqstore.codec.layer_codecs) produce from the same fp16 values on
the same backend: no dequantize/requantize drift (tested on SmolLM2's KV).
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np

from tqstore.codec import CodecConfig, HeadRotations, TurboQuantCodec, rotation_seed
from tqstore.errors import InvalidArgument
from tqstore.prefix_hash import Namespace


class Requantizer:
    """Caches one stacked codec pair per (codec settings, layout)."""

    def __init__(self) -> None:
        self._codecs: dict[tuple, tuple[TurboQuantCodec, TurboQuantCodec]] = {}
        self._lock = threading.Lock()

    def codecs(self, ns: Namespace, config: CodecConfig) -> tuple[TurboQuantCodec, TurboQuantCodec]:
        if config.key_qjl:
            raise InvalidArgument("QJL key codes are not served by the daemon")
        key = (config, ns.num_layers, ns.num_kv_heads, ns.head_dim)
        with self._lock:
            if key not in self._codecs:
                self._codecs[key] = tuple(
                    TurboQuantCodec(ns.head_dim, bits, self._stacked(ns, config.seed, kind),
                                    norm_correction=config.norm_correction)
                    for bits, kind in ((config.key_bits, "K"), (config.value_bits, "V")))
            return self._codecs[key]

    @staticmethod
    def _stacked(ns: Namespace, seed: int, kind: str) -> HeadRotations:
        seeds = [rotation_seed(seed, layer, head, kind)
                 for layer in range(ns.num_layers) for head in range(ns.num_kv_heads)]
        return HeadRotations(ns.head_dim, seeds)

    def quantize_block(self, ns: Namespace, config: CodecConfig, keys: np.ndarray,
                       values: np.ndarray) -> dict[str, np.ndarray]:
        """fp16 (layers, heads, block, dim) K and V -> codes and fp16 scales, same leading shape."""
        key_codec, value_codec = self.codecs(ns, config)
        lead = (ns.num_layers, ns.num_kv_heads, ns.block_size)
        out = {}
        for prefix, codec, x in (("key", key_codec, keys), ("value", value_codec, values)):
            stacked = mx.array(x).reshape(1, ns.num_layers * ns.num_kv_heads, ns.block_size, ns.head_dim)
            q = codec.quantize(stacked)
            mx.eval(q.codes, q.scales)
            out[f"{prefix}_codes"] = np.array(q.codes).reshape(*lead, codec.code_bytes)
            out[f"{prefix}_scales"] = np.array(q.scales).reshape(lead)
        return out
