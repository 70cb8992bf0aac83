"""How one block lives in the remote tier (Redis): its keys and the bytes of its values.

Keys are content addressed and never contain client strings:
    tqs1:<namespace digest, 16 hex>:{<chain hash, 64 hex>}:<part>
The chain hash already commits to the namespace and every token of the prefix (prefix_hash.py);
the namespace digest in front only groups a model's keys for an operator's SCAN. The braces are a
Redis Cluster hash tag: all parts of one block live in one slot, so one MGET reads a block, one
EXISTS counts its parts, one MULTI/EXEC writes them, and one DEL removes them, on any node.

Values: a block's fp16 K and V (the layout the local payload files use) are each cut into parts
of at most PART_BYTES, K's parts first, each a comfortable Redis value (one part never blocks
the server for long, and never nears proto-max-bulk-len). Where K or V fits one part a reader
takes it as a view of the value, with no copy. Part 0 starts with a header:
    "TQRB" | u16 version | u32 header length | msgpack header | zero pad to 16 bytes | K part 0
The header names what the value claims to be (namespace root hash, chain hash, parent hash,
block index, its token ids, layout, dtype, body size) and the XXH3-64 of every part's body, so a
reader verifies a value exactly as the local tier verifies a payload file: a value that claims
anything else than what the reader asked for, or whose bytes do not match, is rejected
(`RemoteValueError`) and the caller counts a miss and deletes it. Parts written by two hosts
never mix: a block's parts are written in one transaction and read by one MGET.

The part size is part of the format (tqs1): daemons sharing a remote must agree on it to read a
block in one round trip, so it is a constant, not a setting.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import msgpack
import numpy as np

from tqstore.blocks import BlockPayload
from tqstore.payload_format import body_checksum
from tqstore.prefix_hash import Namespace

KEY_PREFIX = "tqs1"
PART_BYTES = 4 << 20
_MAGIC = b"TQRB"
_VERSION = 1
_HEAD = struct.Struct("<4sHI")
_MAX_HEADER = 1 << 20  # a header is ~1-5 KB (the token ids dominate); anything larger is damage


class RemoteValueError(ValueError):
    """A remote value failed verification (wrong block, damaged, truncated, a part missing)."""


def layout(ns: Namespace) -> tuple[int, int, int, int]:
    return (ns.num_layers, ns.num_kv_heads, ns.block_size, ns.head_dim)


def body_bytes(ns: Namespace) -> int:
    """fp16 K + V bytes of one block of this namespace."""
    layers, heads, tokens, dim = layout(ns)
    return 2 * 2 * layers * heads * tokens * dim


def part_count(ns: Namespace) -> int:
    """Parts of one block: K's bytes cut into PART_BYTES pieces, then V's."""
    return 2 * max(1, -(-(body_bytes(ns) // 2) // PART_BYTES))


def _cut(array: np.ndarray) -> list[memoryview]:
    """An array's bytes in PART_BYTES pieces, as views (redis-py sends memoryviews as they are)."""
    data = memoryview(np.ascontiguousarray(array, dtype=np.float16)).cast("B")
    return [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)]


@functools.lru_cache(maxsize=256)
def _key_shape(ns: Namespace) -> tuple[str, int]:
    """(key prefix, parts) of a namespace: hashing it costs ~10 us, and a Lookup of a long
    chain asks for hundreds of blocks' keys."""
    return f"{KEY_PREFIX}:{ns.digest_hex()[:16]}:", part_count(ns)


def block_keys(ns: Namespace, chain_hash: bytes) -> list[bytes]:
    """The keys of all parts of one block (same hash slot)."""
    prefix, parts = _key_shape(ns)
    base = f"{prefix}{{{chain_hash.hex()}}}:"
    return [(base + str(i)).encode() for i in range(parts)]


@dataclass(frozen=True)
class BlockIdentity:
    """What a value must claim to be for the reader that asked for it."""

    chain_hash: bytes
    parent: bytes
    index: int
    tokens: bytes  # the block's token ids, little-endian uint32


def _body_offset(header_len: int) -> int:
    """Where part 0's body starts: 16-byte aligned, so K read as a view of the value is
    aligned too (CPython's bytes data is 16-byte aligned)."""
    return -(-(_HEAD.size + header_len) // 16) * 16


def encode_block(ns: Namespace, who: BlockIdentity,
                 payload: BlockPayload) -> list[bytes | memoryview]:
    """The values of one block's parts, in key order: part 0 a new bytes (header + K's first
    piece), the others views of the payload's arrays (no copy)."""
    if 2 * payload.keys.size * 2 != body_bytes(ns) or payload.values.size != payload.keys.size:
        raise ValueError(f"block body does not fit the namespace's {body_bytes(ns)} bytes")
    pieces = _cut(payload.keys) + _cut(payload.values)
    header = msgpack.packb({
        "ns": ns.root_hash(), "key": who.chain_hash, "parent": who.parent, "index": who.index,
        "tokens": who.tokens, "layout": list(layout(ns)), "dtype": ns.kv_dtype,
        "body": body_bytes(ns), "sums": [body_checksum(p) for p in pieces]}, use_bin_type=True)
    head = _HEAD.pack(_MAGIC, _VERSION, len(header)) + header
    pieces[0] = head.ljust(_body_offset(len(header)), b"\0") + pieces[0]
    return pieces


def decode_block(ns: Namespace, who: BlockIdentity, parts: list[bytes | None]) -> BlockPayload:
    """The verified block from its parts' values (as MGET returned them, None for a missing
    part). RemoteValueError for anything that is not exactly the block `who` names. Where K or
    V is one part (SmolLM2's 256-token blocks), it is a read-only view of the value: no copy."""
    if len(parts) != part_count(ns) or any(p is None for p in parts):
        raise RemoteValueError("a part is missing")
    first = parts[0]
    if len(first) < _HEAD.size:
        raise RemoteValueError("value shorter than its header")
    magic, version, head_len = _HEAD.unpack_from(first)
    if magic != _MAGIC or version != _VERSION or head_len > _MAX_HEADER:
        raise RemoteValueError("not a tqstore block value of this version")
    try:
        head = msgpack.unpackb(first[_HEAD.size:_HEAD.size + head_len], raw=False,
                               max_bin_len=_MAX_HEADER, max_array_len=4096, max_map_len=64)
    except Exception as exc:  # noqa: BLE001 - any undecodable header is damage
        raise RemoteValueError(f"undecodable header: {type(exc).__name__}") from None
    want = {"ns": ns.root_hash(), "key": who.chain_hash, "parent": who.parent,
            "index": who.index, "tokens": who.tokens, "layout": list(layout(ns)),
            "dtype": ns.kv_dtype, "body": body_bytes(ns)}
    if not isinstance(head, dict):
        raise RemoteValueError("header is not a map")
    for name, value in want.items():
        if head.get(name) != value:
            raise RemoteValueError(f"header {name} mismatch")
    pieces = [memoryview(first)[_body_offset(head_len):]] + [memoryview(p) for p in parts[1:]]
    sums = head.get("sums")
    if not isinstance(sums, list) or len(sums) != len(pieces):
        raise RemoteValueError("header part checksums malformed")
    half = body_bytes(ns) // 2
    per = len(pieces) // 2
    for i, piece in enumerate(pieces):
        expected = min(PART_BYTES, half - (i % per) * PART_BYTES)
        if len(piece) != expected:
            raise RemoteValueError(f"part {i} is {len(piece)} bytes, expected {expected}")
        if body_checksum(piece) != sums[i]:
            raise RemoteValueError(f"part {i} checksum mismatch")
    shape = layout(ns)
    return BlockPayload(keys=_join(pieces[:per]).reshape(shape),
                        values=_join(pieces[per:]).reshape(shape))


def _join(pieces: list[memoryview]) -> np.ndarray:
    if len(pieces) == 1:
        return np.frombuffer(pieces[0], np.float16)
    out = np.empty(sum(len(p) for p in pieces), np.uint8)
    at = 0
    for piece in pieces:
        out[at:at + len(piece)] = np.frombuffer(piece, np.uint8)
        at += len(piece)
    return out.view(np.float16)
