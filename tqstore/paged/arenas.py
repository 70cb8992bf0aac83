"""Per-layer KV arenas: the bytes behind the pool's block ids.

Layout (fixed; the fused decode kernels read exactly this), block 0 is the null block:
  TurboQuant layer: key_codes uint8 (num_blocks, Hkv, block_size, Dk*key_bits/8),
                    (key_bits/value_bits of THIS layer: a quality profile may vary them),
                    key_scales float16 (num_blocks, Hkv, block_size), and the same for values.
  fp16 layer (policy keeps it dense): keys float16 (num_blocks, Hkv, block_size, Dk), values alike.
Every layer has an arena of the same num_blocks, so one block id names the same tokens in every
layer and the pool needs no per-layer bookkeeping.

With a quality profile, key codes are codes of k - mean (per layer and head, from the profile):
decode attention scores the residual (softmax ignores q . mean), and gather_dense returns the
residual keys too, so the decode path and stock SDPA over dequantized pages stay consistent.

Writes are scatters into preallocated arrays (MLX reuses the buffer when the arena holds the
only reference), so appending a token costs O(token), not O(arena).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from tqstore.codec import CodecConfig, QuantizedVectors, TurboQuantCodec, layer_codecs
from tqstore.errors import InvalidArgument
from tqstore.metal import dispatch as kernels
from tqstore.metal.dispatch import quantize as dispatch_quantize, quantize_rows

KV_DTYPE = mx.float16


def _scatter(arena, name: str, block_ids: mx.array, slots: mx.array | None, x: mx.array) -> None:
    """arena.<name>[block_ids, :, slots] = x for x (H, n, ...) token by token, or with slots
    None whole blocks: arena.<name>[block_ids] = x cut into (blocks, H, block_size, ...)."""
    arr = getattr(arena, name)
    if slots is None:
        H, n = x.shape[:2]
        pages = x.reshape(H, n // arena.block_size, arena.block_size, *x.shape[2:])
        arr[block_ids] = mx.swapaxes(pages, 0, 1)
    else:
        arr[block_ids, :, slots] = mx.swapaxes(x, 0, 1)  # (n, H, ...) as the indexing reads


def _dense_rotation(codec: TurboQuantCodec) -> mx.array:
    """(Hkv, D, D) = R per head, contiguous and evaluated (built once per arena)."""
    matrices = mx.contiguous(codec.rotation.matrices())
    mx.eval(matrices)
    return matrices


class TurboQuantArena:
    """Compressed K/V pages of one layer."""

    dense = False

    def __init__(self, layer: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 key_head_dim: int, value_head_dim: int, config: CodecConfig) -> None:
        if config.key_qjl:
            raise InvalidArgument("paged arenas store MSE codes only (key_qjl=False)")
        self.layer = layer
        self.config = config
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self._query_rotation: mx.array | None = None
        self._output_rotation: mx.array | None = None
        self._key_unrotation: mx.array | None = None
        self._key_center: mx.array | None = None
        self.key_codec, self.value_codec = layer_codecs(
            config, layer, num_kv_heads, key_head_dim, value_head_dim)
        H, kc, vc = num_kv_heads, self.key_codec.code_bytes, self.value_codec.code_bytes
        self.bytes_per_block = self.block_bytes(block_size, H, key_head_dim, value_head_dim, config,
                                                layer)
        self.key_codes = mx.zeros((num_blocks, H, block_size, kc), dtype=mx.uint8)
        self.key_scales = mx.zeros((num_blocks, H, block_size), dtype=mx.float16)
        self.value_codes = mx.zeros((num_blocks, H, block_size, vc), dtype=mx.uint8)
        self.value_scales = mx.zeros((num_blocks, H, block_size), dtype=mx.float16)

    @property
    def query_rotation(self) -> mx.array:
        """(Hkv, Dk, Dk) = R_K^T per head: q_row @ R_K^T is the rotated query (R_K q)."""
        if self._query_rotation is None:
            self._query_rotation = mx.swapaxes(self.key_codec.rotation.matrices(), -1, -2)
            mx.eval(self._query_rotation)
        return self._query_rotation

    @property
    def output_rotation(self) -> mx.array:
        """(Hkv, Dv, Dv) = R_V per head: o_row @ R_V un-rotates (R_V^T o) the attention output."""
        if self._output_rotation is None:
            # Contiguous: the decode epilogue kernel reads it row by row (a strided view would
            # be copied at every launch: one more op per layer and step, seen on an H100).
            self._output_rotation = _dense_rotation(self.value_codec)
        return self._output_rotation

    @property
    def key_unrotation(self) -> mx.array:
        """(Hkv, Dk, Dk) = R_K per head: y_row @ R_K un-rotates (R_K^T y) a dequantized key."""
        if self._key_unrotation is None:
            self._key_unrotation = _dense_rotation(self.key_codec)
        return self._key_unrotation

    @property
    def key_center(self) -> mx.array:
        """(Hkv, Dk) float32: the keys' center (zeros without one); the fp16 tail is scored
        on k - center, like the pages."""
        if self._key_center is None:
            center = self.key_codec.center
            shape = (self.num_kv_heads, self.key_codec.head_dim)
            # From host memory when there is no center: mx.zeros is a broadcast scalar, which
            # a kernel's row-contiguity guard would copy at every launch.
            self._key_center = (mx.array(np.zeros(shape, dtype=np.float32)) if center is None
                                else mx.contiguous(center.reshape(shape)))
            mx.eval(self._key_center)
        return self._key_center

    @staticmethod
    def block_bytes(block_size: int, num_kv_heads: int, key_head_dim: int, value_head_dim: int,
                    config: CodecConfig, layer: int = 0) -> int:
        key_bits, value_bits = config.layer_bits(layer)
        per_token = (key_head_dim * key_bits // 8 + 2 + value_head_dim * value_bits // 8 + 2)
        return block_size * num_kv_heads * per_token

    @property
    def arrays(self) -> list[mx.array]:
        return [self.key_codes, self.key_scales, self.value_codes, self.value_scales]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def write(self, block_ids: mx.array, slots: mx.array | None, keys: mx.array,
              values: mx.array) -> None:
        """Quantize keys/values (Hkv, n, D) and store token i at (block_ids[i], slots[i]), or
        with slots None whole blocks: block_ids[j] takes tokens [j * block_size, ...)."""
        # The quantize kernel where the backend has one (byte-identical to codec.quantize).
        # Keys are centered here (one float32 subtraction, the same op codec.quantize does) and
        # handed to the center-free codec, so a kernel that knows nothing of centers agrees.
        qk = dispatch_quantize(self.key_codec.residual_codec, self.key_codec.centered(keys))
        qv = dispatch_quantize(self.value_codec, values)
        for name, x in (("key_codes", qk.codes), ("key_scales", qk.scales),
                        ("value_codes", qv.codes), ("value_scales", qv.scales)):
            _scatter(self, name, block_ids, slots, x)

    def write_blocks(self, block_ids: mx.array, keys: mx.array, values: mx.array,
                     rows: mx.array) -> None:
        """Quantize whole tail blocks into pages: rows ``rows`` (int32 (R,)) of fp16 tail
        buffers keys/values (B, Hkv, block_size, D) go to blocks ``block_ids`` (R,). The same
        bytes as write() of those tokens (codes are per vector), in the pages' layout as they
        come: a GPU makes them in one launch per page pair and writes each page array in one
        scatter (a block-opening decode step: tqstore.paged.shared_tail.commit_full_tails)."""
        bs = self.block_size
        if (keys.ndim != 4 or keys.shape[2] != bs or values.ndim != 4 or values.shape[2] != bs
                or block_ids.shape != rows.shape):
            # A scatter would broadcast a wrong shape into the pages without a word.
            raise InvalidArgument(f"write_blocks: tails {tuple(keys.shape)}, "
                                  f"{tuple(values.shape)} for {tuple(block_ids.shape)} blocks "
                                  f"and {tuple(rows.shape)} rows (block size {bs})")
        qk = quantize_rows(self.key_codec, keys, rows)
        qv = quantize_rows(self.value_codec, values, rows)
        self.key_codes[block_ids] = qk.codes
        self.key_scales[block_ids] = qk.scales
        self.value_codes[block_ids] = qv.codes
        self.value_scales[block_ids] = qv.scales

    def write_codes(self, block_ids: mx.array, slots: mx.array, codes: dict[str, mx.array]) -> None:
        """Store already-quantized tokens (the daemon's TurboQuant Fetch form): codes
        (Hkv, n, bytes) and scales (Hkv, n) under the names of the arena's arrays."""
        for name in ("key_codes", "key_scales", "value_codes", "value_scales"):
            arr = getattr(self, name)
            value = codes[name]
            if value.shape[2:] != arr.shape[3:] or value.shape[0] != arr.shape[1]:
                raise InvalidArgument(f"{name}: shape {value.shape} does not fit pages {arr.shape}")
            _scatter(self, name, block_ids, slots, value.astype(arr.dtype))

    def copy_block(self, src: int, dst: int) -> None:
        for name in ("key_codes", "key_scales", "value_codes", "value_scales"):
            arr = getattr(self, name)
            arr[dst] = arr[src]

    def _gather(self, arr: mx.array, block_ids: mx.array, num_tokens: int) -> mx.array:
        pages = arr[block_ids]  # (nb, H, bs, ...)
        pages = mx.swapaxes(pages, 0, 1)
        pages = pages.reshape(pages.shape[0], -1, *pages.shape[3:])
        return pages[:, :num_tokens]

    def quantized(self, block_ids: mx.array, num_tokens: int) -> tuple[QuantizedVectors, QuantizedVectors]:
        """Codes of the first num_tokens tokens of a sequence, (Hkv, T, ...)."""
        k = QuantizedVectors(self._gather(self.key_codes, block_ids, num_tokens),
                             self._gather(self.key_scales, block_ids, num_tokens))
        v = QuantizedVectors(self._gather(self.value_codes, block_ids, num_tokens),
                             self._gather(self.value_scales, block_ids, num_tokens))
        return k, v

    def gather_dense(self, block_ids: mx.array, num_tokens: int,
                     dtype: mx.Dtype = mx.float32) -> tuple[mx.array, mx.array]:
        """Dequantized keys, values (Hkv, T, D) of a sequence (the reference for attention and
        the path for multi-token steps after prefill). Keys are the residual k - mean where the
        codec is centered: the same softmax as the full keys, and the same scores as decode."""
        qk, qv = self.quantized(block_ids, num_tokens)
        # A multi-token step after prefill gathers the whole context in every layer: the
        # dispatch's CPU path (C lookup, un-rotation by matmul) makes that cheap there.
        keys = kernels.dequantize_residual(self.key_codec, qk, self.key_unrotation)
        values = kernels.dequantize_residual(self.value_codec, qv, self.output_rotation)
        if self.value_codec.center is not None:  # as codec.dequantize; none today (layer_codecs)
            values = values + self.value_codec.center
        return keys.astype(dtype), values.astype(dtype)

    def attention_keys(self, keys: mx.array) -> mx.array:
        """Exact keys (..., Hkv, n, D) in the space the pages are scored in: float32 k - mean
        where the codec is centered (what the fp16 tail attends with)."""
        return self.key_codec.centered(keys)


class Fp16Arena:
    """Dense float16 K/V pages of one layer (layers the policy keeps unquantized)."""

    dense = True

    def __init__(self, layer: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 key_head_dim: int, value_head_dim: int) -> None:
        self.layer = layer
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.bytes_per_block = self.block_bytes(block_size, num_kv_heads, key_head_dim, value_head_dim)
        self.keys = mx.zeros((num_blocks, num_kv_heads, block_size, key_head_dim), dtype=KV_DTYPE)
        self.values = mx.zeros((num_blocks, num_kv_heads, block_size, value_head_dim), dtype=KV_DTYPE)

    @staticmethod
    def block_bytes(block_size: int, num_kv_heads: int, key_head_dim: int, value_head_dim: int) -> int:
        return block_size * num_kv_heads * (key_head_dim + value_head_dim) * 2

    @property
    def arrays(self) -> list[mx.array]:
        return [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def write(self, block_ids: mx.array, slots: mx.array | None, keys: mx.array,
              values: mx.array) -> None:
        _scatter(self, "keys", block_ids, slots, keys.astype(KV_DTYPE))
        _scatter(self, "values", block_ids, slots, values.astype(KV_DTYPE))

    def copy_block(self, src: int, dst: int) -> None:
        self.keys[dst] = self.keys[src]
        self.values[dst] = self.values[src]

    def gather_dense(self, block_ids: mx.array, num_tokens: int,
                     dtype: mx.Dtype = mx.float32) -> tuple[mx.array, mx.array]:
        def gather(arr: mx.array) -> mx.array:
            pages = mx.swapaxes(arr[block_ids], 0, 1)
            return pages.reshape(pages.shape[0], -1, pages.shape[-1])[:, :num_tokens].astype(dtype)

        return gather(self.keys), gather(self.values)

    def attention_keys(self, keys: mx.array) -> mx.array:
        return keys.astype(mx.float32)


LayerArena = TurboQuantArena | Fp16Arena


def dense_state_bytes(num_tokens: int, num_kv_heads: int, key_head_dim: int, value_head_dim: int) -> int:
    """fp16 bytes of num_tokens tokens of one layer: the baseline live KV is compared with."""
    return num_tokens * num_kv_heads * (key_head_dim + value_head_dim) * 2
