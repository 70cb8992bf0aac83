"""The payload file's header and body checksums: shared by the store that writes payload files
(tqstore/ssd/payload.py) and the same-host reader in the generator's process
(tqstore/direct_read.py), which must not load the store (tests/test_layering.py).

File: a 64-byte header (magic, header version, compression code, raw and stored sizes, the block
hash, CRC-32 of those fields) then the body, verified chunk by chunk with XXH3-64. Whoever knows a
block's hash, sizes and compression can rebuild its header byte for byte (`header`), so a reader
checks the header by equality.

Version 3 puts the file's self-description between the header and the body: the encoded index
records of the block and its namespace (tqstore/ssd/selfdesc.py writes and parses them), whose
size the header records (in 4 bytes version 2 left as padding). The LMDB index is then a derived
structure: a damaged index is rebuilt from the payload files alone (tqstore/ssd/rebuild.py).
The body stays at the end of the file: it starts at file_size - stored_size (`body_offset`), and
the file size (the index's file_size, sent in Locate) covers header + self-description + body,
so a reader that knows file_size and stored_size rebuilds the header byte for byte as before.
Version 2 files (header then body, file size = header + body) are still read; they cannot be
re-indexed.
"""

from __future__ import annotations

import struct
import zlib

import xxhash

FILE_MAGIC = b"TQSB"
FILE_VERSION = 3  # 3: self-description before the body; 2: XXH3-64 chunks (1: CRC-32)
READABLE_VERSIONS = (2, 3)
HEADER_SIZE = 64
_HEADER_V2 = struct.Struct("<4sHBBQQ32s")  # magic, version, compression code, pad, raw, stored, hash
_HEADER_V3 = struct.Struct("<4sHBBQQ32sI")  # ... then the self-description's size
COMPRESSION_CODES = {"none": 0, "zstd": 1, "zstd-planes": 2}


def body_checksum(piece) -> int:
    """Checksum of one body chunk (XXH3-64: fast enough not to bound the read path; it releases
    the GIL, so readers on several threads hash in parallel)."""
    return xxhash.xxh3_64_intdigest(piece)


def body_checksum_state() -> "xxhash.xxh3_64":
    """body_checksum fed piece by piece (a chunk read into several places): update() each
    piece in order, then intdigest() equals body_checksum of the whole chunk."""
    return xxhash.xxh3_64()


def header(key: bytes, compression: str, raw_size: int, stored_size: int, desc_size: int = 0,
           version: int = FILE_VERSION) -> bytes:
    """The header of a payload file; version 2 has no self-description (desc_size must be 0)."""
    code = COMPRESSION_CODES[compression]
    if version == 2:
        head = _HEADER_V2.pack(FILE_MAGIC, 2, code, 0, raw_size, stored_size, key)
    else:
        head = _HEADER_V3.pack(FILE_MAGIC, version, code, 0, raw_size, stored_size, key, desc_size)
    head += struct.pack("<I", zlib.crc32(head))
    return head.ljust(HEADER_SIZE, b"\0")


def file_name(key: bytes) -> str:
    """A payload file's name in the store's blocks directory: its block hash."""
    return key.hex() + ".blk"


def header_version(head: bytes) -> int:
    """The version field of a header (0 if it is too short or the magic is wrong)."""
    if len(head) < _HEADER_V2.size or head[:4] != FILE_MAGIC:
        return 0
    return struct.unpack_from("<H", head, 4)[0]


def body_offset(file_size: int, stored_size: int) -> int:
    """Where the body starts: it ends the file, after the header and the self-description."""
    return file_size - stored_size


def desc_size_of(head: bytes) -> int | None:
    """The self-description size a version 3 header records, or None if the header is not a
    version 3 header with a valid CRC."""
    if header_version(head) != 3 or len(head) < HEADER_SIZE:
        return None
    fields = head[:_HEADER_V3.size]
    if struct.unpack_from("<I", head, _HEADER_V3.size)[0] != zlib.crc32(fields):
        return None
    return _HEADER_V3.unpack(fields)[-1]


def description_intact(desc: bytes) -> bool:
    """The self-description's own CRC-32 (its last 4 bytes) matches. Every read checks it, so
    damage anywhere in a file is found by the read or by `check`, not first by a rebuild."""
    if len(desc) < 4:
        return False
    return zlib.crc32(desc[:-4]) == struct.unpack_from("<I", desc, len(desc) - 4)[0]
