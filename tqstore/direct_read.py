"""Same-host reads: a generator on the daemon's host reads the payload files itself.

Why: through gRPC every byte is copied into protobuf messages on the daemon, parsed and copied
again here; loopback moved ~0.6 GB/s where a page-cache read runs at 10-20 GB/s, so on a fast
accelerator a hit cost more than recomputing (issue 16). Here the daemon answers Locate (which
blocks, their sizes and checksums from its index; a lease keeps them from eviction) and the
reader preads each file straight into its final place in a PrefixKV, verifying as it goes.

What a reader trusts, and why it can never see a torn, replaced or evicted payload:
- It opens only <blocks_dir>/<hex of the chain hash it computed itself>.blk: the daemon names no
  file, so a bug or a hostile daemon cannot point it at another file.
- Payload files are immutable: written to a temp name, fsynced and renamed; eviction unlinks. An
  open descriptor keeps reading the inode it opened.
- The file's size (header, self-description, body) and its whole 64-byte header (block
  hash, sizes, compression) must equal what the hash and the Locate answer imply, and every
  body chunk's XXH3-64 must equal the index's.
  A file evicted (ENOENT) or replaced by a different put (checksums differ) or damaged ends the
  run there; the client then Fetches the rest over gRPC, which is a shorter hit at worst.
- Same file system: the daemon's `store.id` (random per daemon start) must read back the same
  from beside blocks_dir here; otherwise (another container, another host) direct reads are off
  for this client and gRPC serves.
Only uncompressed payloads (the store's default) are read here; a compressed one ends the run
and gRPC serves it.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from tqstore.blocks import PrefixKV
from tqstore.payload_format import (
    FILE_VERSION, HEADER_SIZE, body_checksum_state, body_offset, file_name, header)
from tqstore.v1 import tqstore_pb2 as pb

log = logging.getLogger("tqstore.direct_read")
_IOV_MAX = 512  # below Linux's 1024 and macOS's 1024 iovecs per preadv


class DirectReader:
    """Reads located blocks into a PrefixKV on `threads` threads (one block per task; 0: one
    per core, at most 8)."""

    def __init__(self, threads: int = 0) -> None:
        threads = threads or min(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tqstore-read")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    @staticmethod
    def shares_files(response: pb.LocateResponse) -> bool:
        """True when this process sees the daemon's store: its store.id reads back here."""
        if response.payload_version != FILE_VERSION or not response.store_id:
            return False
        try:
            with open(os.path.join(os.path.dirname(response.blocks_dir), "store.id")) as f:
                return f.read().strip() == response.store_id
        except OSError:
            return False

    def read(self, response: pb.LocateResponse, hashes: Sequence[bytes], out: PrefixKV,
             first_block: int, out_first: int | None = None) -> int:
        """Read the located blocks, a contiguous run from first_block, into out (block i goes
        to out's block i - out_first; out_first defaults to first_block); returns how many
        leading located blocks arrived verified. hashes[i] names block i (for a trailing
        partial block, its partial hash: out's token axis then ends with its tokens)."""
        out_first = first_block if out_first is None else out_first
        tasks = []
        for k, loc in enumerate(response.blocks):
            if loc.block_index != first_block + k or loc.block_index >= len(hashes):
                break  # the daemon answers a contiguous run of what was asked; else it ends
            path = os.path.join(response.blocks_dir, file_name(hashes[loc.block_index]))
            tasks.append(self._pool.submit(_read_block, path, hashes[loc.block_index], loc,
                                           out, loc.block_index - out_first))
        # Every task finishes before we return, so none writes into out afterwards.
        verified = [task.result() for task in tasks]
        return verified.index(False) if False in verified else len(verified)


def _destinations(out: PrefixKV, k: int) -> list[memoryview]:
    """Block k's body in file order (K then V, each (layers, heads, block, dim) C order) as
    views of out: one contiguous (block, dim) run per layer and head."""
    cut = slice(k * out.block_size, (k + 1) * out.block_size)
    runs = []
    for array in (out.keys, out.values):
        part = array[:, :, cut]
        for layer in range(part.shape[0]):
            for head in range(part.shape[1]):
                runs.append(memoryview(part[layer, head]).cast("B"))
    return runs


def _read_block(path: str, key: bytes, loc: pb.BlockLocation, out: PrefixKV, k: int) -> bool:
    """Read and verify one payload file into out's block k; False on any mismatch or error
    (then out's block k holds garbage the caller never counts)."""
    try:
        if loc.compression != "none" or len(loc.chunk_lengths) != len(loc.chunk_checksums):
            return False
        runs = _destinations(out, k)
        body = sum(len(r) for r in runs)
        # The file's self-description sits between header and body (payload_format.py); a
        # reader skips it: the body ends the file, the header records the description's size.
        # A version 2 file (no description) fails the header equality: gRPC serves it.
        if loc.stored_size != body or loc.raw_size != body or loc.file_size <= HEADER_SIZE + body:
            return False
        if sum(loc.chunk_lengths) != body:
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != loc.file_size:
                return False
            offset = body_offset(loc.file_size, body)
            if os.pread(fd, HEADER_SIZE, 0) != header(key, "none", body, body, offset - HEADER_SIZE):
                return False
            for start in range(0, len(runs), _IOV_MAX):
                batch = runs[start:start + _IOV_MAX]
                want = sum(len(r) for r in batch)
                got = os.preadv(fd, batch, offset)
                if got != want and not _finish(fd, batch, offset, got):
                    return False
                offset += want
        finally:
            os.close(fd)
        return _verify(runs, loc.chunk_lengths, loc.chunk_checksums)
    except OSError:
        return False  # evicted under us (ENOENT) or unreadable: the caller falls back


def _finish(fd: int, runs: list[memoryview], offset: int, done: int) -> bool:
    """Complete a short preadv run by run; False at end of file."""
    position = 0
    for run in runs:
        if position + len(run) <= done:
            position += len(run)
            continue
        skip = max(0, done - position)
        view = run[skip:]
        at = offset + position + skip
        while len(view):
            n = os.preadv(fd, [view], at)
            if n <= 0:
                return False
            view, at = view[n:], at + n
        position += len(run)
    return True


def _verify(runs: list[memoryview], lengths: Sequence[int], checksums: Sequence[int]) -> bool:
    """Each body chunk's checksum over the runs in file order (a chunk spans several runs: a
    run is one (layer, head) of the block, a chunk 1 MiB)."""
    pieces = iter(runs)
    run = memoryview(b"")
    for length, checksum in zip(lengths, checksums):
        state, need = body_checksum_state(), length
        while need:
            if not len(run):
                run = next(pieces, None)
                if run is None:
                    return False
                continue
            take = min(need, len(run))
            state.update(run[:take])
            run, need = run[take:], need - take
        if state.intdigest() != checksum:
            return False
    return True
