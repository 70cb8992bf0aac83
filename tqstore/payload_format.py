"""The payload file's header and body checksums: shared by the store that writes payload files
(tqstore/ssd/payload.py) and the same-host reader in the generator's process
(tqstore/direct_read.py), which must not load the store (tests/test_layering.py).

File: a 64-byte header (magic, header version, compression code, raw and stored sizes, the block
hash, CRC-32 of those fields) then the body, verified chunk by chunk with XXH3-64. Whoever knows a
block's hash, sizes and compression can rebuild its header byte for byte (`header`), so a reader
checks the header by equality.
"""

from __future__ import annotations

import struct
import zlib

import xxhash

FILE_MAGIC = b"TQSB"
FILE_VERSION = 2  # 2: body chunks checksummed with XXH3-64 (1: CRC-32)
HEADER_SIZE = 64
_HEADER = struct.Struct("<4sHBBQQ32s")  # magic, version, compression code, pad, raw, stored, hash
COMPRESSION_CODES = {"none": 0, "zstd": 1, "zstd-planes": 2}


def body_checksum(piece) -> int:
    """Checksum of one body chunk (XXH3-64: fast enough not to bound the read path; it releases
    the GIL, so readers on several threads hash in parallel)."""
    return xxhash.xxh3_64_intdigest(piece)


def body_checksum_state() -> "xxhash.xxh3_64":
    """body_checksum fed piece by piece (a chunk read into several places): update() each
    piece in order, then intdigest() equals body_checksum of the whole chunk."""
    return xxhash.xxh3_64()


def header(key: bytes, compression: str, raw_size: int, stored_size: int) -> bytes:
    head = _HEADER.pack(FILE_MAGIC, FILE_VERSION, COMPRESSION_CODES[compression], 0,
                        raw_size, stored_size, key)
    head += struct.pack("<I", zlib.crc32(head))
    return head.ljust(HEADER_SIZE, b"\0")


def file_name(key: bytes) -> str:
    """A payload file's name in the store's blocks directory: its block hash."""
    return key.hex() + ".blk"
