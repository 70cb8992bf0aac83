"""The TurboQuant codec: rotations, Lloyd-Max codebooks, bit packing, quantize/dequantize."""

from tqstore.codec.codebook import SUPPORTED_BITS, lloyd_max_codebook
from tqstore.codec.config import CodecConfig
from tqstore.codec.packing import pack_indices, packed_bytes, unpack_indices
from tqstore.codec.rotation import HeadRotations, rotation_seed
from tqstore.codec.turboquant import QuantizedVectors, TurboQuantCodec, layer_codecs, tree_sum_last

__all__ = [
    "SUPPORTED_BITS", "CodecConfig", "HeadRotations", "QuantizedVectors", "TurboQuantCodec",
    "layer_codecs", "lloyd_max_codebook", "pack_indices", "packed_bytes", "rotation_seed",
    "tree_sum_last", "unpack_indices",
]
