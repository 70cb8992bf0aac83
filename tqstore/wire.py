"""Conversions between tqstore's types and the wire messages (proto/tqstore/v1/tqstore.proto).

Shared by the daemon and the client so both sides validate and chunk the same way. Every
malformed message raises InvalidArgument with a message naming the field.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from tqstore.blocks import PrefixKV
from tqstore.codec import CodecConfig
from tqstore.errors import InvalidArgument
from tqstore.prefix_hash import Namespace
from tqstore.v1 import tqstore_pb2 as pb

# Aim for ~1 MiB messages: gRPC loopback streaming peaked there (platform.md).
CHUNK_TARGET_BYTES = 1 << 20
_DTYPES = {"float16": np.float16, "uint8": np.uint8}


def namespace_to_proto(ns: Namespace) -> pb.Namespace:
    if ns.extra:
        raise InvalidArgument("the daemon stores codec-neutral fp16: namespace extra must be empty")
    return pb.Namespace(model_fingerprint=ns.model_fingerprint, num_layers=ns.num_layers,
                        num_kv_heads=ns.num_kv_heads, head_dim=ns.head_dim,
                        block_size=ns.block_size, kv_dtype=ns.kv_dtype,
                        format_version=ns.format_version)


# Layout bounds of a namespace on the wire: generous for real models (the largest ship about 128
# layers, 128 KV heads of 256 dims), small enough that no layout makes one block's bookkeeping
# or a re-quantizer's rotations explode.
MAX_LAYERS, MAX_KV_HEADS, MAX_HEAD_DIM, MAX_BLOCK_SIZE = 1024, 1024, 1024, 65536
# A quality profile is per-(layer, head) means and bit allocations: 64 KiB for an 8B model.
MAX_PROFILE_BYTES = 4 << 20


def check_text(value: str, name: str, max_bytes: int) -> None:
    """A client-supplied string: non-empty and at most max_bytes of UTF-8. Protobuf already
    rejects invalid UTF-8 in string fields; any printable or not character is allowed, because
    every place that shows one (tqstore inspect) escapes it (cli/inspect.py printable())."""
    if not value:
        raise InvalidArgument(f"{name} is empty")
    if len(value) > max_bytes or len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidArgument(f"{name} longer than {max_bytes} bytes")


def namespace_from_proto(msg: pb.Namespace, *, max_string_bytes: int = 256,
                         min_block_size: int = 1) -> Namespace:
    """The daemon's view of a request's namespace; InvalidArgument on anything it does not
    serve: kv_dtype other than exactly "float16" (clients always send it: namespace_to_proto),
    a model fingerprint over max_string_bytes, a layout past the MAX_* bounds or a block smaller
    than min_block_size (tiny blocks multiply the hashing and index work per token)."""
    if msg.kv_dtype != "float16":
        raise InvalidArgument(f"namespace.kv_dtype {msg.kv_dtype[:32]!r} unsupported: only float16")
    check_text(msg.model_fingerprint, "namespace.model_fingerprint", max_string_bytes)
    if (msg.num_layers > MAX_LAYERS or msg.num_kv_heads > MAX_KV_HEADS
            or msg.head_dim > MAX_HEAD_DIM or msg.block_size > MAX_BLOCK_SIZE):
        raise InvalidArgument(f"namespace layout out of range: layers <= {MAX_LAYERS}, kv heads "
                              f"<= {MAX_KV_HEADS}, head_dim <= {MAX_HEAD_DIM}, block_size <= "
                              f"{MAX_BLOCK_SIZE}")
    if 0 < msg.block_size < min_block_size:
        raise InvalidArgument(f"namespace block_size {msg.block_size} below the daemon's minimum "
                              f"{min_block_size}")
    try:
        return Namespace(model_fingerprint=msg.model_fingerprint, num_layers=msg.num_layers,
                         num_kv_heads=msg.num_kv_heads, head_dim=msg.head_dim,
                         block_size=msg.block_size, kv_dtype="float16",
                         format_version=msg.format_version or 1)
    except ValueError as exc:
        raise InvalidArgument(f"namespace: {exc}") from exc


def codec_to_proto(config: CodecConfig) -> pb.CodecSettings:
    profile = getattr(config, "profile", None)
    return pb.CodecSettings(key_bits=config.key_bits, value_bits=config.value_bits,
                            norm_correction=config.norm_correction, key_qjl=config.key_qjl,
                            seed=config.seed, profile=profile.to_bytes() if profile else b"")


def codec_from_proto(msg: pb.CodecSettings) -> CodecConfig:
    """InvalidArgument for any settings or profile bytes that do not decode: the profile is
    client input, so whatever its parser raises (a RecursionError from JSON nested too deep
    included) is the request's fault, never the daemon's."""
    if len(msg.profile) > MAX_PROFILE_BYTES:
        raise InvalidArgument(f"codec profile of {len(msg.profile)} bytes over {MAX_PROFILE_BYTES}")
    try:
        extra = {}
        if msg.profile:
            from tqstore.codec.profile import QualityProfile

            extra["profile"] = QualityProfile.from_bytes(msg.profile)
        return CodecConfig(key_bits=msg.key_bits, value_bits=msg.value_bits,
                           norm_correction=msg.norm_correction, key_qjl=msg.key_qjl, seed=msg.seed,
                           **extra)
    except InvalidArgument:
        raise
    except (RecursionError, ValueError, TypeError, KeyError, OverflowError, ImportError,
            ArithmeticError) as exc:
        raise InvalidArgument(f"codec: {type(exc).__name__}: {str(exc)[:200]}") from exc


def tensor_to_proto(array: np.ndarray) -> pb.Tensor:
    a = np.asarray(array)
    if a.dtype.name not in _DTYPES:
        raise InvalidArgument(f"unsupported tensor dtype {a.dtype}")
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        a = a.astype(a.dtype.newbyteorder("<"))
    return pb.Tensor(shape=list(a.shape), dtype=a.dtype.name, data=np.ascontiguousarray(a).tobytes())


def check_tensor(msg: pb.Tensor, name: str, expect_shape: Sequence[int], expect_dtype: str) -> None:
    """Validate dtype, shape and byte count without copying the payload."""
    if msg.dtype != expect_dtype:
        raise InvalidArgument(f"{name}: dtype {msg.dtype!r}, expected {expect_dtype}")
    if tuple(msg.shape) != tuple(expect_shape):
        raise InvalidArgument(f"{name}: shape {tuple(msg.shape)}, expected {tuple(expect_shape)}")
    if len(msg.data) != int(np.prod(expect_shape)) * np.dtype(_DTYPES[expect_dtype]).itemsize:
        raise InvalidArgument(f"{name}: {len(msg.data)} bytes do not match shape {tuple(expect_shape)}")


def tensor_view(msg: pb.Tensor) -> np.ndarray:
    """A read-only little-endian view of a checked tensor's bytes (no copy)."""
    dtype = np.dtype(_DTYPES[msg.dtype]).newbyteorder("<")
    return np.frombuffer(msg.data, dtype=dtype).reshape(tuple(msg.shape))


def layers_per_chunk(ns: Namespace, bytes_per_layer_token: int) -> int:
    """How many layers of one block make a ~1 MiB message."""
    per_layer = ns.num_kv_heads * ns.block_size * bytes_per_layer_token
    return max(1, min(ns.num_layers, CHUNK_TARGET_BYTES // max(per_layer, 1)))


@dataclass(frozen=True)
class EncodedChunk:
    """A KvChunk already in protobuf wire format (the daemon's Fetch sends these: see
    encode_fp16_chunk). Quacks like the message where the daemon's RPC log looks at it."""

    block_index: int
    data: bytes

    def ByteSize(self) -> int:  # noqa: N802 - the protobuf message method it stands in for
        return len(self.data)


def serialize_chunk(chunk: pb.KvChunk | EncodedChunk) -> bytes:
    """The Fetch response serializer: encoded chunks as they are, messages serialized."""
    return chunk.data if isinstance(chunk, EncodedChunk) else chunk.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fp16_tensor_head(shape: Sequence[int], nbytes: int) -> bytes:
    """A Tensor message's fields before its data: packed shape (1), dtype (2), data's tag and
    length (3); the data follows."""
    packed = b"".join(_varint(d) for d in shape)
    return (b"\x0a" + _varint(len(packed)) + packed + b"\x12\x07float16"
            + b"\x1a" + _varint(nbytes))


def encode_fp16_chunk(block_index: int, layer_start: int, keys: np.ndarray,
                      values: np.ndarray) -> EncodedChunk:
    """KvChunk(block_index, layer_start, layer_count, keys, values) in wire format, with the
    arrays' bytes copied once (protobuf would copy them into the message, then again into the
    serialized bytes: on loopback those copies bounded the daemon's Fetch). Byte for byte what
    SerializeToString gives (tests/server/test_wire.py): fields in number order, zeros omitted.
    Arrays must be C-contiguous little-endian float16."""
    parts: list[bytes | memoryview] = []
    for tag, value in ((0x08, block_index), (0x10, layer_start), (0x18, keys.shape[0])):
        if value:
            parts += [bytes([tag]), _varint(value)]
    for tag, array in ((0x22, keys), (0x2A, values)):
        if array.dtype != np.dtype("<f2") or not array.flags.c_contiguous:
            raise InvalidArgument("encode_fp16_chunk takes C-contiguous little-endian float16")
        head = _fp16_tensor_head(array.shape, array.nbytes)
        parts += [bytes([tag]), _varint(len(head) + array.nbytes), head,
                  memoryview(array).cast("B")]
    return EncodedChunk(block_index, b"".join(parts))


def fp16_layer_ranges(ns: Namespace) -> Iterator[tuple[int, int]]:
    """The [start, stop) layers of each ~1 MiB fp16 chunk of one block."""
    step = layers_per_chunk(ns, 2 * 2 * ns.head_dim)
    for start in range(0, ns.num_layers, step):
        yield start, min(start + step, ns.num_layers)


def fp16_chunks_encoded(ns: Namespace, block_index: int, keys: np.ndarray,
                        values: np.ndarray) -> Iterator[EncodedChunk]:
    """fp16_chunks, pre-encoded (the daemon's Fetch)."""
    for start, stop in fp16_layer_ranges(ns):
        yield encode_fp16_chunk(block_index, start, keys[start:stop], values[start:stop])


def fp16_chunks(ns: Namespace, block_index: int, keys: np.ndarray, values: np.ndarray) -> Iterator[pb.KvChunk]:
    """Split one block's fp16 K/V (layers, heads, block_size, head_dim) into layer chunks."""
    for start, stop in fp16_layer_ranges(ns):
        yield pb.KvChunk(block_index=block_index, layer_start=start, layer_count=stop - start,
                         keys=tensor_to_proto(keys[start:stop]), values=tensor_to_proto(values[start:stop]))


@dataclass
class BlockAssembler:
    """Reassembles layer chunks into whole blocks; rejects gaps, overlaps, bad shapes and a
    chunk of a block that already completed in this stream (which would otherwise replace it).

    `form` is "fp16" or "turboquant"; for turboquant, `code_bytes` = (key bytes, value bytes)
    per vector. `partial` = (block index, tokens) names a trailing partial block, whose chunks
    carry that many tokens (every other block: block_size). Complete blocks are returned by
    add() in order of completion."""

    ns: Namespace
    form: str = "fp16"
    code_bytes: tuple[int, int] = (0, 0)
    partial: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # index -> (the block's arrays being filled, which layers arrived). A chunk's bytes are
        # copied in as it arrives, so a pending block holds its own bytes and one flag a layer,
        # whatever the number of chunks; the overlap check is O(layers in the chunk).
        self._partial: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}
        self._completed: set[int] = set()

    def block_tokens(self, index: int) -> int:
        """Tokens on the token axis of block `index`'s chunks."""
        if self.partial is not None and index == self.partial[0]:
            return self.partial[1]
        return self.ns.block_size

    def _fields(self, count: int, index: int) -> list[tuple[str, tuple[int, ...], str]]:
        lead = (count, self.ns.num_kv_heads, self.block_tokens(index))
        if self.form == "fp16":
            return [("keys", lead + (self.ns.head_dim,), "float16"),
                    ("values", lead + (self.ns.head_dim,), "float16")]
        kb, vb = self.code_bytes
        return [("key_codes", lead + (kb,), "uint8"), ("key_scales", lead, "float16"),
                ("value_codes", lead + (vb,), "uint8"), ("value_scales", lead, "float16")]

    def pending(self, index: int) -> bool:
        """Whether block `index` has some chunks here and is not complete yet."""
        return index in self._partial

    def add(self, chunk: pb.KvChunk) -> tuple[int, dict[str, np.ndarray]] | None:
        start, count, index = chunk.layer_start, chunk.layer_count, chunk.block_index
        if count == 0 or start + count > self.ns.num_layers:
            raise InvalidArgument(f"chunk layers [{start}, {start + count}) outside "
                                  f"[0, {self.ns.num_layers})")
        if index in self._completed:
            raise InvalidArgument(f"block {index} sent again after it completed")
        entry = self._partial.get(index)
        if entry is not None and entry[1][start:start + count].any():
            raise InvalidArgument(f"block {index}: overlapping layer chunk at layer {start}")
        fields = self._fields(count, index)
        for name, shape, dtype in fields:
            check_tensor(getattr(chunk, name), f"block {index} {name}", shape, dtype)
        if entry is None:  # allocated only once the first chunk proved well formed
            entry = self._partial[index] = (
                {name: np.empty(shape, _DTYPES[dtype])
                 for name, shape, dtype in self._fields(self.ns.num_layers, index)},
                np.zeros(self.ns.num_layers, dtype=bool))
        arrays, have = entry
        for name, _, _ in fields:  # little-endian wire bytes into the native array: one copy
            arrays[name][start:start + count] = tensor_view(getattr(chunk, name))
        have[start:start + count] = True
        if not have.all():
            return None
        del self._partial[index]
        self._completed.add(index)
        return index, arrays

    def incomplete(self) -> list[int]:
        return sorted(self._partial)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise InvalidArgument("malformed chunk: truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview):
    """(field number, varint value or length-delimited view) of one protobuf message; fixed32 and
    fixed64 fields are skipped (KvChunk and Tensor have none)."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, pos = _read_varint(data, pos)
        elif kind == 2:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise InvalidArgument("malformed chunk: field runs past the message")
            value, pos = data[pos:pos + size], pos + size
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
            continue
        else:
            raise InvalidArgument(f"malformed chunk: wire type {kind}")
        yield number, value


def _tensor_fields(data: memoryview) -> tuple[tuple[int, ...], str, memoryview]:
    shape: list[int] = []
    dtype, payload = "", memoryview(b"")
    for number, value in _fields(data):
        if number == 1:  # packed (or, from other encoders, unpacked) repeated uint32
            if isinstance(value, int):
                shape.append(value)
            else:
                pos = 0
                while pos < len(value):
                    dim, pos = _read_varint(value, pos)
                    shape.append(dim)
        elif number == 2:
            dtype = bytes(value).decode("ascii", "replace")
        elif number == 3:
            payload = value
    return tuple(shape), dtype, payload


@dataclass
class Fp16ChunkView:
    """An fp16 KvChunk parsed from its wire bytes without copying them (the client's Fetch
    deserializer, parse_fp16_chunk): what PrefixWriter.add needs."""

    block_index: int = 0
    layer_start: int = 0
    layer_count: int = 0
    keys: tuple[tuple[int, ...], str, memoryview] = ((), "", memoryview(b""))
    values: tuple[tuple[int, ...], str, memoryview] = ((), "", memoryview(b""))


def parse_fp16_chunk(data: bytes) -> Fp16ChunkView:
    """A KvChunk's block index, layers and keys/values tensors as views of `data` (protobuf's
    parser would copy the payloads into new bytes objects first; on one client that copy, under
    the GIL, bounded a gRPC fetch). Other fields are ignored, as a fp16 fetch has none."""
    chunk = Fp16ChunkView()
    for number, value in _fields(memoryview(data)):
        if number == 1:
            chunk.block_index = value
        elif number == 2:
            chunk.layer_start = value
        elif number == 3:
            chunk.layer_count = value
        elif number == 4:
            chunk.keys = _tensor_fields(value)
        elif number == 5:
            chunk.values = _tensor_fields(value)
    return chunk


class PrefixWriter:
    """Writes fp16 Fetch chunks (parse_fp16_chunk's views) straight into a PrefixKV: block
    `first_block + k` goes to the PrefixKV's block k (the trailing partial block, if the PrefixKV
    has room for one, with its token count), one copy from the message bytes. Same checks as
    BlockAssembler (layer range, overlaps, shapes, dtypes). add() returns a block's index when
    all its layers arrived. One writer per stream: streams write disjoint blocks, so they share
    no state."""

    def __init__(self, ns: Namespace, out: PrefixKV, first_block: int) -> None:
        self.ns, self.out, self.first_block = ns, out, first_block
        self._layers: dict[int, list[tuple[int, int]]] = {}

    def add(self, chunk: Fp16ChunkView) -> int | None:
        start, count, index = chunk.layer_start, chunk.layer_count, chunk.block_index
        slot = index - self.first_block
        tokens = self.out.slot_tokens(slot) if slot >= 0 else 0
        if tokens == 0:
            raise InvalidArgument(f"block {index} outside the requested run")
        if count == 0 or start + count > self.ns.num_layers:
            raise InvalidArgument(f"chunk layers [{start}, {start + count}) outside "
                                  f"[0, {self.ns.num_layers})")
        have = self._layers.setdefault(index, [])
        if any(s < start + count and start < s + n for s, n in have):
            raise InvalidArgument(f"block {index}: overlapping layer chunk at layer {start}")
        shape = (count, self.ns.num_kv_heads, tokens, self.ns.head_dim)
        cut = slice(slot * self.ns.block_size, slot * self.ns.block_size + tokens)
        for name, target in (("keys", self.out.keys), ("values", self.out.values)):
            got_shape, dtype, data = getattr(chunk, name)
            if dtype != "float16" or got_shape != shape or len(data) != 2 * int(np.prod(shape)):
                raise InvalidArgument(f"block {index} {name}: dtype {dtype!r} {got_shape} "
                                      f"({len(data)} bytes), expected float16 {shape}")
            target[start:start + count, :, cut] = np.frombuffer(data, "<f2").reshape(shape)
        have.append((start, count))
        if sum(n for _, n in have) < self.ns.num_layers:
            return None
        del self._layers[index]
        return index
