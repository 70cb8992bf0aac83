"""Block payloads on disk (tqstore.blocks.BlockPayload: the fp16 K/V of one block): their file
format, compression and checksums.

Why payload files and not LMDB values (measured, tools/ssd_payload_location.py, numbers in
docs/fragments/ssd.md): one file per block, named by its hash, written to a temp name, fsynced and
renamed before the index commit. Reads are plain preadv into one buffer (no mmap page faults), so
cold reads run at the disk's sequential rate; eviction is an unlink that returns the space at
once (LMDB frees pages only for reuse, its file runs 1.3-1.5x live data and never shrinks, which
makes a byte budget dishonest); and a reader process in `tqstore inspect` never pins payload
pages with a long read txn. The price is a crash window with a file but no index record: that is
an orphan, removed when the store opens, and never visible because lookups go through the index.

File: a 64-byte header (magic, header version, compression, raw and stored sizes, the block hash,
CRC of the header), then (version 3) the file's self-description (tqstore/payload_format.py,
selfdesc.py: what a rebuild of the index needs), then the body, which ends the file. The index
record keeps (length, XXH3-64) of each body chunk, so a read verifies the chunks on two threads
while the rest is still being read. XXH3 rather than CRC-32: zlib.crc32 ran at ~1 GB/s on this
machine, slower than the disk's cold read, and capped the read path at 0.27x of raw; XXH3 runs at
tens of GB/s (docs/BENCHMARKS.md).

Invariants: a file's name, its header hash and its index key are the same block hash; the body
CRCs in the index match the body; decoding checks sizes against the namespace layout.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import zstandard

from tqstore.blocks import BlockPayload
from tqstore.payload_format import (  # noqa: F401  (re-exported: the store's callers use them)
    FILE_MAGIC, FILE_VERSION, HEADER_SIZE, body_checksum, body_offset, description_intact,
    header as _header)

ALLOC_UNIT = 4096  # file systems allocate whole 4 KiB blocks: the budget counts those


class PayloadError(ValueError):
    """A payload file failed verification (missing, wrong size, bad header, bad checksum)."""


@dataclass(frozen=True)
class EncodedPayload:
    """A payload ready to write: body segments (written back to back), their chunk CRCs and the
    self-description written before them (empty only for a version 2 file)."""

    segments: tuple[memoryview, ...]
    compression: str
    raw_size: int
    stored_size: int
    chunks: list[tuple[int, int]]
    description: bytes = b""

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + len(self.description) + self.stored_size

    def described(self, description: bytes) -> "EncodedPayload":
        return replace(self, description=description)


def allocated(nbytes: int) -> int:
    return -(-nbytes // ALLOC_UNIT) * ALLOC_UNIT


def chunk_crcs(segments: Sequence[memoryview], chunk: int) -> list[tuple[int, int]]:
    """(length, checksum) of consecutive chunks; a chunk never spans two segments."""
    out: list[tuple[int, int]] = []
    for seg in segments:
        for off in range(0, len(seg), chunk):
            piece = seg[off : off + chunk]
            out.append((len(piece), body_checksum(piece)))
    return out


def _as_bytes_view(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a)).cast("B")


def encode(payload: BlockPayload, compression: str, level: int, chunk: int) -> EncodedPayload:
    """Serialize K then V. Compression only where the caller configured it (default none)."""
    keys, values = payload.keys, payload.values
    raw_size = keys.nbytes + values.nbytes
    if compression == "none":
        segments: tuple[memoryview, ...] = (_as_bytes_view(keys), _as_bytes_view(values))
    else:
        flat = np.concatenate([keys.reshape(-1), values.reshape(-1)]).view(np.uint16)
        if compression == "zstd-planes":
            flat = np.concatenate([(flat >> 8).astype(np.uint8), (flat & 0xFF).astype(np.uint8)])
        body = zstandard.ZstdCompressor(level=level).compress(memoryview(flat).cast("B"))
        segments = (memoryview(body),)
    stored = sum(len(s) for s in segments)
    return EncodedPayload(segments, compression, raw_size, stored, chunk_crcs(segments, chunk))


FILE_MODE = 0o600  # every file and directory of a store is private whatever the umask (KV caches
DIR_MODE = 0o700  # hold the content of prompts); the one place these modes are defined


def write_file(final_path: str, key: bytes, enc: EncodedPayload) -> None:
    """Write to a temp name, fsync, rename into place. The caller fsyncs the directory once per
    batch, then commits the index: only then is the block acknowledged."""
    desc = enc.description
    version = FILE_VERSION if desc else 2
    write_atomically(final_path, [_header(key, enc.compression, enc.raw_size, enc.stored_size,
                                          len(desc), version), desc, *enc.segments])


def write_atomically(final: str, buffers: Sequence) -> None:
    """Write buffers back to back to a fresh temp name (O_EXCL|O_NOFOLLOW, mode FILE_MODE
    whatever the umask: a planted symlink is never written through, and the rename replaces a
    symlink at `final` rather than following it), fsync, rename to `final`. The temp is removed
    on any failure: a full disk must not fill up with temp files until the next open, and
    nothing refers to an unfinished write."""
    tmp = f"{final}.tmp{os.getpid()}"
    try:
        os.unlink(tmp)  # a leftover of a crashed earlier process with our pid
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        total = sum(len(b) for b in buffers)
        written = os.writev(fd, buffers)
        if written != total:  # short writev: finish with plain writes
            joined = b"".join(bytes(b) for b in buffers)
            while written < total:
                written += os.write(fd, joined[written:])
        os.fsync(fd)
        fd, closing = -1, fd
        os.close(closing)
        os.rename(tmp, final)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_chunks(fd: int, body: memoryview, chunks: Sequence[tuple[int, int]], offset: int,
                 start: int) -> bool:
    for length, crc in chunks:
        piece = body[offset : offset + length]
        got = 0
        while got < length:
            n = os.preadv(fd, [piece[got:]], start + offset + got)
            if n <= 0:
                return False
            got += n
        if body_checksum(piece) != crc:
            return False
        offset += length
    return True


def read_file(path: str, key: bytes, file_size: int, stored_size: int, raw_size: int,
              compression: str, chunks: Sequence[tuple[int, int]],
              executor: Executor | None) -> np.ndarray:
    """Read and verify a payload body; returns the raw (decompressed) bytes as a uint8 array.

    Raises FileNotFoundError if the file is gone (evicted under us: a plain miss, not corruption)
    and PayloadError on any verification failure."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # a planted symlink is never followed
    try:
        if os.fstat(fd).st_size != file_size or file_size < HEADER_SIZE + stored_size:
            raise PayloadError("payload file size mismatch")
        # Version 2: header then body; version 3: header, self-description, body.
        start = body_offset(file_size, stored_size)
        desc = start - HEADER_SIZE
        head = os.pread(fd, start, 0)
        expect = _header(key, compression, raw_size, stored_size, desc, FILE_VERSION if desc else 2)
        if head[:HEADER_SIZE] != expect:
            raise PayloadError("payload header mismatch (hash, sizes or compression)")
        if desc and not description_intact(head[HEADER_SIZE:]):
            raise PayloadError("payload self-description checksum mismatch")
        if sum(c[0] for c in chunks) != stored_size:
            raise PayloadError("chunk table does not cover the body")
        if hasattr(os, "posix_fadvise"):
            # Start readahead of the whole body now: the two verifying readers below then take
            # it from the page cache instead of issuing two interleaved cold streams.
            os.posix_fadvise(fd, start, stored_size, os.POSIX_FADV_WILLNEED)
        body_arr = np.empty(stored_size, dtype=np.uint8)
        body = memoryview(body_arr)
        split = len(chunks) // 2
        if executor is not None and split > 0:
            offset = sum(c[0] for c in chunks[:split])
            future = executor.submit(_read_chunks, fd, body, chunks[split:], offset, start)
            ok_front = _read_chunks(fd, body, chunks[:split], 0, start)
            ok = future.result() and ok_front
        else:
            ok = _read_chunks(fd, body, chunks, 0, start)
        if not ok:
            raise PayloadError("payload checksum mismatch or short read")
    finally:
        os.close(fd)
    if compression == "none":
        return body_arr
    try:
        raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=raw_size)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"payload does not decompress: {exc}") from exc
    if len(raw) != raw_size:
        raise PayloadError("decompressed size mismatch")
    arr = np.frombuffer(raw, dtype=np.uint8)
    if compression == "zstd-planes":
        half = raw_size // 2
        hi = arr[:half].astype(np.uint16) << 8
        arr = (hi | arr[half:]).view(np.uint8)
    return arr


def decode(raw: np.ndarray, layout: tuple[int, int, int, int]) -> BlockPayload:
    """Split raw K||V bytes into two float16 arrays of the namespace layout."""
    shape = tuple(layout)
    half = int(np.prod(shape)) * 2
    if raw.nbytes != 2 * half:
        raise PayloadError("payload size does not match the layout")
    keys = raw[:half].view(np.float16).reshape(shape)
    values = raw[half:].view(np.float16).reshape(shape)
    return BlockPayload(keys=keys, values=values)
