"""Deterministic re-quantization of fp16 blocks on the daemon.

A block's layers are quantized in as few calls as possible by stacking (layer, kv_head) pairs on
the head axis, each with its own rotation seed (layer, kv_head, K|V) and, with a quality profile,
its own key center (the profile's per-(layer, head) mean). Layers are grouped by bit width (a
profile may give each layer its own). Because the codec's quantization is a fixed per-vector
sequence of elementwise float32 operations, the codes equal those the generator's per-layer
codecs (tqstore.codec.layer_codecs) produce from the same fp16 values on the same backend: no
dequantize/requantize drift (tested on SmolLM2's KV, with and without a profile).

Wire layout: codes are (layers, heads, block, D * config bits / 8). A layer narrower than the
config's width (the profile's widest layer) has its codes zero-padded at the end of each vector;
the receiver keeps the first D * layer_bits / 8 bytes.
"""

from __future__ import annotations

import collections
import threading

import mlx.core as mx
import numpy as np

from tqstore.codec import CodecConfig, HeadRotations, TurboQuantCodec, rotation_seed
from tqstore.device_memory import host_to_device
from tqstore.errors import InvalidArgument
from tqstore.metal.dispatch import quantize as dispatch_quantize
from tqstore.prefix_hash import Namespace

# (kind, layers of the group, stacked codec)
Group = tuple[str, tuple[int, ...], TurboQuantCodec]


class Requantizer:
    """Caches the stacked codecs per (codec settings, layout), the MAX_CODECS most recently
    used: codec settings come from clients, so a client cycling seeds must not grow the daemon."""

    MAX_CODECS = 64

    def __init__(self) -> None:
        self._codecs: collections.OrderedDict[tuple, list[Group]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def groups(self, ns: Namespace, config: CodecConfig) -> list[Group]:
        if config.key_qjl:
            raise InvalidArgument("QJL key codes are not served by the daemon")
        if config.profile is not None:
            try:
                config.profile.check_layout(ns.num_layers, ns.num_kv_heads, ns.head_dim)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from exc
        key = (config, ns.num_layers, ns.num_kv_heads, ns.head_dim)
        with self._lock:
            if key in self._codecs:
                self._codecs.move_to_end(key)
                return self._codecs[key]
        built = self._build(ns, config)  # outside the lock: other Fetches keep their codecs
        with self._lock:
            self._codecs[key] = built
            while len(self._codecs) > self.MAX_CODECS:
                self._codecs.popitem(last=False)
        return built

    def codecs(self, ns: Namespace, config: CodecConfig) -> list[Group]:
        """Validate and build (kept for the service's validate-before-streaming call)."""
        return self.groups(ns, config)

    @staticmethod
    def _build(ns: Namespace, config: CodecConfig) -> list[Group]:
        out: list[Group] = []
        for kind, index in (("K", 0), ("V", 1)):
            by_bits: dict[int, list[int]] = {}
            for layer in range(ns.num_layers):
                by_bits.setdefault(config.layer_bits(layer)[index], []).append(layer)
            for bits, layers in sorted(by_bits.items()):
                seeds = [rotation_seed(config.seed, layer, head, kind)
                         for layer in layers for head in range(ns.num_kv_heads)]
                center = None
                if kind == "K" and config.profile is not None and config.profile.key_means:
                    center = mx.array(np.concatenate(
                        [config.profile.key_mean(layer) for layer in layers], axis=0))
                codec = TurboQuantCodec(ns.head_dim, bits, HeadRotations(ns.head_dim, seeds),
                                        norm_correction=config.norm_correction, center=center)
                out.append((kind, tuple(layers), codec))
        return out

    def quantize_block(self, ns: Namespace, config: CodecConfig, keys: np.ndarray,
                       values: np.ndarray) -> dict[str, np.ndarray]:
        """fp16 (layers, heads, block, dim) K and V -> codes and fp16 scales, same leading shape."""
        lead = (ns.num_layers, ns.num_kv_heads, ns.block_size)
        width = {"K": ns.head_dim * config.key_bits // 8, "V": ns.head_dim * config.value_bits // 8}
        out = {"key_codes": np.zeros(lead + (width["K"],), dtype=np.uint8),
               "key_scales": np.zeros(lead, dtype=np.float16),
               "value_codes": np.zeros(lead + (width["V"],), dtype=np.uint8),
               "value_scales": np.zeros(lead, dtype=np.float16)}
        for kind, layers, codec in self.groups(ns, config):
            prefix, x = ("key", keys) if kind == "K" else ("value", values)
            rows = np.asarray(layers)
            part = x[rows] if len(rows) < ns.num_layers else x
            stacked = host_to_device(part).reshape(1, len(rows) * ns.num_kv_heads, ns.block_size,
                                                   ns.head_dim)
            # The quantize kernel of this host (GPU or C), byte-identical to codec.quantize and
            # checked against it at first use (tqstore.metal.selfcheck).
            q = dispatch_quantize(codec, stacked)
            mx.eval(q.codes, q.scales)
            sub = (len(rows), ns.num_kv_heads, ns.block_size)
            out[f"{prefix}_codes"][rows, ..., : codec.code_bytes] = np.array(q.codes).reshape(
                *sub, codec.code_bytes)
            out[f"{prefix}_scales"][rows] = np.array(q.scales).reshape(sub)
        return out
