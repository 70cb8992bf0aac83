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

import ctypes
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import NamedTuple, Sequence

import numpy as np

from tqstore.blocks import PrefixKV
from tqstore.native.read_verify import read_verify
from tqstore.payload_format import (
    FILE_VERSION, HEADER_SIZE, body_checksum_state, body_offset, file_name, header)
from tqstore.v1 import tqstore_pb2 as pb

log = logging.getLogger("tqstore.direct_read")
_IOV_MAX = 512  # below Linux's 1024 and macOS's 1024 iovecs per preadv
# Read and verify pieces in C (tqstore.native.read_verify) where it is available; False: the
# Python loop always (tests and benchmarks compare the two).
NATIVE_READS = True


class _Runs(NamedTuple):
    """Where a stretch of a block's body goes, in file order: windows into the PrefixKV as start
    addresses and lengths (the C loop reads into them; the Python loop takes _views of them).
    Valid while the PrefixKV lives: DirectReader.read's caller holds it until every piece is
    done."""

    addresses: np.ndarray  # uint64
    lengths: np.ndarray  # uint64


def _views(runs: _Runs) -> list[memoryview]:
    """The runs as writable memoryviews, for the Python loop's preadv and hashing."""
    return [memoryview((ctypes.c_char * n).from_address(a)).cast("B")
            for a, n in zip(runs.addresses.tolist(), runs.lengths.tolist())]


class DirectReader:
    """Reads located blocks into a PrefixKV on `threads` threads (0: one per core, at most 16).

    Each block is read as pieces of about piece_bytes (whole checksum chunks), one task each, so
    every thread works even when a prefix is a few large blocks (CUDA's 2048-token blocks: an
    8k prompt is 3 blocks and a partial one, 268 MB each for an 8B shape)."""

    def __init__(self, threads: int = 0, piece_bytes: int = 16 << 20) -> None:
        threads = threads or min(16, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tqstore-read")
        self._piece_bytes = piece_bytes

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
        blocks = []  # per block, its pieces' tasks (none: refused before reading)
        for k, loc in enumerate(response.blocks):
            if loc.block_index != first_block + k or loc.block_index >= len(hashes):
                break  # the daemon answers a contiguous run of what was asked; else it ends
            path = os.path.join(response.blocks_dir, file_name(hashes[loc.block_index]))
            runs = _destinations(out, loc.block_index - out_first)
            pieces = _pieces(loc, runs, self._piece_bytes)
            blocks.append([self._pool.submit(_read_piece, path, hashes[loc.block_index], loc,
                                             *piece) for piece in pieces])
        # Every task finishes before we return, even if one raised, so none writes into out
        # afterwards (it may be the staging buffer, lent to the next fetch).
        wait([task for tasks in blocks for task in tasks])
        verified = [bool(tasks) and all([_succeeded(task) for task in tasks]) for tasks in blocks]
        return verified.index(False) if False in verified else len(verified)


def _succeeded(task: Future) -> bool:
    """A piece's verdict; a piece that raised (a bug, or no memory) did not verify."""
    try:
        return bool(task.result())
    except Exception:
        log.exception("a same-host read failed; the rest goes over gRPC")
        return False


def _destinations(out: PrefixKV, k: int) -> _Runs:
    """Block k's body in file order (K then V, each (layers, heads, block, dim) C order) as
    windows of out: one contiguous (block, dim) run per layer and head."""
    cut = slice(k * out.block_size, (k + 1) * out.block_size)
    addresses, lengths = [], []
    for array in (out.keys, out.values):
        rows = array[:, :, cut].view(np.uint8)  # (layers, heads, tokens, dim bytes), a view
        # Layers and heads merge into one axis, tokens and dim into another, never by a copy
        # (_merged raises where a view cannot express it), so every run is a window into `out`.
        # Whole arrays of addresses, not a numpy index and cast per (layer, head): on SmolLM2
        # that setup took 8 ms of a 40 ms fetch.
        rows = _merged(rows, (rows.shape[0] * rows.shape[1], rows.shape[2] * rows.shape[3]))
        addresses.append(rows.ctypes.data
                         + np.arange(rows.shape[0], dtype=np.uint64) * np.uint64(rows.strides[0]))
        lengths.append(np.full(rows.shape[0], rows.shape[1], dtype=np.uint64))
    return _Runs(np.concatenate(addresses), np.concatenate(lengths))


def _merged(rows: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """rows seen with this shape, a view or an error, never a copy."""
    try:
        return np.reshape(rows, shape, copy=False)  # numpy >= 2.1
    except TypeError:  # older numpy has no copy argument; setting .shape never copies
        rows = rows.view()
        rows.shape = shape
        return rows


def _pieces(loc: pb.BlockLocation, runs: _Runs, piece_bytes: int) -> list[tuple]:
    """A block's body split at checksum-chunk boundaries into pieces of about piece_bytes:
    (body size, body start, the piece's runs, its chunk lengths, its chunk checksums) each;
    [] when the location cannot describe this body (then the block is not read at all)."""
    body = int(runs.lengths.sum())
    # The file's self-description sits between header and body (payload_format.py); a reader
    # skips it: the body ends the file, the header records the description's size. A version
    # 2 file (no description) fails the header equality: gRPC serves it.
    if (loc.compression != "none" or len(loc.chunk_lengths) != len(loc.chunk_checksums)
            or loc.stored_size != body or loc.raw_size != body
            or loc.file_size <= HEADER_SIZE + body or sum(loc.chunk_lengths) != body
            or min(loc.chunk_lengths, default=1) <= 0):
        return []
    lengths = list(loc.chunk_lengths)
    if body <= piece_bytes:  # one piece: the block's runs as they are (no cutting)
        return [(body, 0, runs, lengths, list(loc.chunk_checksums))]
    pieces, start, first = [], 0, 0
    while first < len(lengths):
        last, size = first, 0
        while last < len(lengths) and (size == 0 or size + lengths[last] <= piece_bytes):
            size += lengths[last]
            last += 1
        pieces.append((body, start, _cut(runs, start, start + size), lengths[first:last],
                       list(loc.chunk_checksums[first:last])))
        start, first = start + size, last
    return pieces


def _cut(runs: _Runs, start: int, end: int) -> _Runs:
    """The parts of runs (laid end to end) that cover bytes [start, end)."""
    ends = np.cumsum(runs.lengths)
    first = int(np.searchsorted(ends, start, side="right"))
    last = int(np.searchsorted(ends - runs.lengths, end, side="left"))
    addresses, lengths = runs.addresses[first:last].copy(), runs.lengths[first:last].copy()
    skip = np.uint64(start) - (ends[first] - runs.lengths[first])
    addresses[0] += skip
    lengths[0] -= skip
    lengths[-1] -= ends[last - 1] - np.uint64(end)
    return _Runs(addresses, lengths)


def _read_piece(path: str, key: bytes, loc: pb.BlockLocation, body: int, start: int,
                runs: _Runs, lengths: list[int], checksums: list[int]) -> bool:
    """Read and verify one piece (body bytes [start, start + its size)) of a payload file into
    its runs; False on any mismatch or error (then those bytes are garbage the caller never
    counts). Each piece checks the file's size and header itself: pieces of one block run on
    any thread, in any order.

    In C where available (tq_read.c: each chunk read, then hashed while in cache, without the
    GIL). Else in Python: one preadv for the piece, then its chunks' checksums (measured on the
    H100 host, 16 threads, tools/hit_gpu_bench.py: 16-20 GB/s this way; reading and hashing a
    chunk at a time in Python, in place or through a bounce buffer with the one-shot hash,
    7-12 GB/s: the GIL)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != loc.file_size:
                return False
            offset = body_offset(loc.file_size, body)
            if os.pread(fd, HEADER_SIZE, 0) != header(key, "none", body, body, offset - HEADER_SIZE):
                return False
            offset += start
            if NATIVE_READS:
                verified = read_verify(fd, offset, runs.addresses, runs.lengths, lengths,
                                       checksums)
                if verified is not None:
                    return verified == len(lengths)  # every chunk, never a prefix of them
            views = _views(runs)
            for first in range(0, len(views), _IOV_MAX):
                batch = views[first:first + _IOV_MAX]
                want = sum(len(r) for r in batch)
                got = os.preadv(fd, batch, offset)
                if got != want and not _finish(fd, batch, offset, got):
                    return False
                offset += want
        finally:
            os.close(fd)
        verified = 0
        for chunk, checksum in zip(_chunks(views, lengths), checksums):
            state = body_checksum_state()
            for run in chunk:
                state.update(run)
            if state.intdigest() != checksum:
                return False
            verified += 1
        return verified == len(lengths)  # every chunk, never a prefix of them
    except OSError:
        return False  # evicted under us (ENOENT) or unreadable: the caller falls back


def _chunks(runs: list[memoryview], lengths: list[int]):
    """Runs (laid end to end) cut into consecutive chunks of these lengths: per chunk, the
    views that cover it."""
    pieces = iter(runs)
    run = memoryview(b"")
    for length in lengths:
        chunk, need = [], length
        while need:
            if not len(run):
                run = next(pieces, None)
                if run is None:
                    return  # fewer bytes than the lengths: the piece fails
                continue
            take = min(need, len(run))
            chunk.append(run[:take])
            run, need = run[take:], need - take
        yield chunk


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
