"""The msgpack records of the LMDB index, their CRC framing and the record format version.

Every value the store writes to LMDB is a frame: b"TQ", a kind byte, the record format version,
CRC-32 of the body (little-endian u32), then the msgpack body. A frame whose magic, kind, version
or CRC does not verify decodes to a RecordError, which readers turn into a counted miss (never a
wrong hit, never a crash). Keys are raw 32-byte block hashes (blocks, children) or namespace root
hashes (namespaces), so a key cannot be "corrupt" without the lookup simply missing.

Bump RECORD_VERSION when the record layout changes: old records then fail to decode and are
quarantined by `check --repair` rather than misread.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import asdict, dataclass, field, fields

import msgpack

from tqstore.prefix_hash import Namespace

RECORD_VERSION = 1
_MAGIC = b"TQ"
_HEADER = struct.Struct("<2sBBI")  # magic, kind, version, crc32(body)
KIND_BLOCK = 1
KIND_NAMESPACE = 2
KIND_COUNTERS = 3
KIND_QUARANTINE = 4


class RecordError(ValueError):
    """A stored record failed to decode or verify."""


def frame(kind: int, body: dict) -> bytes:
    payload = msgpack.packb(body, use_bin_type=True)
    return _HEADER.pack(_MAGIC, kind, RECORD_VERSION, zlib.crc32(payload)) + payload


def check_frame(kind: int, value: bytes | memoryview) -> memoryview:
    """Verify magic, kind, version and CRC; return the body. Cheap (no msgpack): lookup uses it."""
    view = memoryview(value)
    if len(view) < _HEADER.size:
        raise RecordError("record too short")
    magic, got_kind, version, crc = _HEADER.unpack_from(view)
    if magic != _MAGIC or got_kind != kind:
        raise RecordError("bad record magic or kind")
    if version != RECORD_VERSION:
        raise RecordError(f"record format version {version}, expected {RECORD_VERSION}")
    body = view[_HEADER.size :]
    if zlib.crc32(body) != crc:
        raise RecordError("record checksum mismatch")
    return body


def unframe(kind: int, value: bytes | memoryview) -> dict:
    body = check_frame(kind, value)
    try:
        decoded = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types; all mean "corrupt"
        raise RecordError(f"record body undecodable: {exc}") from exc
    if not isinstance(decoded, dict):
        raise RecordError("record body is not a map")
    return decoded


@dataclass
class BlockRecord:
    """Index entry of one stored block (the payload itself lives in a file, see payload.py)."""

    ns: bytes  # namespace root hash
    parent: bytes  # hash of the previous block, or the namespace root for block 0
    index: int  # position of the block in its chain
    tokens: bytes  # the block's token ids, little-endian uint32
    n_tokens: int
    layout: tuple[int, int, int, int]  # (num_layers, num_kv_heads, block_size, head_dim)
    dtype: str
    format_version: int  # the namespace's format version
    compression: str
    raw_size: int  # logical fp16 bytes (K + V)
    stored_size: int  # bytes of the payload body in the file
    file_size: int  # header + body
    chunks: list[tuple[int, int]]  # (length, crc32) of consecutive body chunks
    created: int  # ns since epoch
    access: int  # ns since epoch, last get (or put)
    hits: int = 0

    def encode(self) -> bytes:
        body = asdict(self)
        body["layout"] = list(self.layout)
        body["chunks"] = [list(c) for c in self.chunks]
        return frame(KIND_BLOCK, body)

    @classmethod
    def decode(cls, value: bytes | memoryview) -> "BlockRecord":
        d = unframe(KIND_BLOCK, value)
        try:
            rec = cls(**{f.name: d[f.name] for f in fields(cls)})
            rec.layout = tuple(int(x) for x in rec.layout)  # type: ignore[assignment]
            rec.chunks = [(int(a), int(b)) for a, b in rec.chunks]
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"block record malformed: {exc}") from exc
        if len(rec.layout) != 4 or not isinstance(rec.tokens, bytes) or len(rec.ns) != 32:
            raise RecordError("block record malformed")
        return rec


@dataclass
class NamespaceRecord:
    """The namespace itself (so stats can name the model) and its live block/byte counts."""

    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    kv_dtype: str
    format_version: int
    extra: list[list[str]] = field(default_factory=list)
    blocks: int = 0
    bytes: int = 0  # allocated payload bytes
    created: int = 0

    @classmethod
    def of(cls, namespace: Namespace, created: int) -> "NamespaceRecord":
        return cls(
            model=namespace.model_fingerprint,
            num_layers=namespace.num_layers,
            num_kv_heads=namespace.num_kv_heads,
            head_dim=namespace.head_dim,
            block_size=namespace.block_size,
            kv_dtype=namespace.kv_dtype,
            format_version=namespace.format_version,
            extra=[list(kv) for kv in namespace.extra],
            created=created,
        )

    def encode(self) -> bytes:
        return frame(KIND_NAMESPACE, asdict(self))

    @classmethod
    def decode(cls, value: bytes | memoryview) -> "NamespaceRecord":
        d = unframe(KIND_NAMESPACE, value)
        try:
            return cls(**{f.name: d[f.name] for f in fields(cls)})
        except (KeyError, TypeError) as exc:
            raise RecordError(f"namespace record malformed: {exc}") from exc


COUNTER_NAMES = (
    "blocks",  # live blocks (exact: updated in the txn that adds/removes them)
    "payload_bytes",  # allocated payload file bytes (exact)
    "logical_bytes",  # fp16 K+V bytes of live blocks (exact)
    "lookups",
    "lookup_tokens",
    "hit_tokens",
    "gets",
    "get_hits",
    "evictions",
    "verification_failures",
    "quarantined",
    "healed",  # damaged index records rewritten from their verified payload files (heal.py)
)


def encode_counters(counters: dict[str, int]) -> bytes:
    return frame(KIND_COUNTERS, {k: int(counters.get(k, 0)) for k in COUNTER_NAMES})


def decode_counters(value: bytes | memoryview | None) -> dict[str, int]:
    if value is None:
        return {k: 0 for k in COUNTER_NAMES}
    d = unframe(KIND_COUNTERS, value)
    return {k: int(d.get(k, 0)) for k in COUNTER_NAMES}


def encode_quarantine(key: bytes, reason: str, when: int, record: bytes | None) -> bytes:
    """A quarantined block: why, when, and the raw (possibly corrupt) index value for forensics."""
    return frame(KIND_QUARANTINE, {"key": key, "reason": reason, "when": when, "record": record})


def decode_quarantine(value: bytes | memoryview) -> dict:
    return unframe(KIND_QUARANTINE, value)
