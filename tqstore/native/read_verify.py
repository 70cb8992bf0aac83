"""The same-host reader's C loop (tq_read.c): read a piece of a payload file into its places and
verify each checksum chunk's XXH3-64 as it arrives, with the GIL released.

It hashes with the xxhash package's own XXH3 (its extension module exports the C API), so a
digest here is the one the daemon stored. Before first use, once per process, it reads a small
scattered file and must agree with ``xxhash.xxh3_64_intdigest`` on every chunk and stop at a
planted mismatch. Where the native library does not build, the extension exports no XXH3, or
the check fails, ``read_verify`` returns None and tqstore.direct_read's Python loop serves (the
same bytes, slower).
"""

from __future__ import annotations

import ctypes
import logging
import tempfile
import threading

import numpy as np
import xxhash

from tqstore.native.build import load

log = logging.getLogger("tqstore.native")

_XXH3 = ("XXH3_createState", "XXH3_freeState", "XXH3_64bits_reset", "XXH3_64bits_update",
         "XXH3_64bits_digest")
_state: dict[str, object] = {}
_lock = threading.Lock()


def read_verify(fd: int, offset: int, addresses: np.ndarray, lengths: np.ndarray,
                chunk_lengths: list[int], checksums: list[int]) -> int | None:
    """Read body bytes from fd at offset into the runs (addresses, lengths: uint64 arrays, file
    order), chunk by chunk, checking each chunk's XXH3-64. Returns how many leading chunks
    verified, -1 if the file ended early or a read failed (-2: no memory for the hash state);
    None where the C loop is unavailable. The runs must stay valid (their arrays alive) and
    writable until it returns."""
    functions = _functions()
    if functions is None:
        return None
    lib, xxh = functions
    for a in (addresses, lengths):  # read through raw pointers: exactly this layout
        if a.dtype != np.uint64 or not a.flags.c_contiguous or len(a) != len(addresses):
            raise ValueError("runs: equal-length C-contiguous uint64 addresses and lengths")
    chunks = np.asarray(chunk_lengths, dtype=np.uint64)
    sums = np.asarray(checksums, dtype=np.uint64)
    return int(lib.tq_read_verify(fd, offset, addresses.ctypes.data, lengths.ctypes.data,
                                  len(addresses), chunks.ctypes.data, sums.ctypes.data,
                                  len(chunks), *xxh))


def available() -> bool:
    return _functions() is not None


def _functions() -> tuple[ctypes.CDLL, tuple[int, ...]] | None:
    if "functions" not in _state:
        with _lock:
            if "functions" not in _state:
                _state["functions"] = _resolve()
    return _state["functions"]  # type: ignore[return-value]


def _resolve() -> tuple[ctypes.CDLL, tuple[int, ...]] | None:
    lib = load()
    if lib is None:
        return None
    try:
        from xxhash import _xxhash

        ext = ctypes.CDLL(_xxhash.__file__)
        xxh = tuple(ctypes.cast(getattr(ext, name), ctypes.c_void_p).value for name in _XXH3)
    except (ImportError, OSError, AttributeError) as exc:
        log.info("same-host reads verify in Python: the xxhash extension exports no XXH3 (%s)",
                 exc)
        return None
    try:
        agreed = _self_check(lib, xxh)
    except Exception as exc:  # e.g. no temp dir to write its file: the Python loop serves
        log.warning("same-host reads verify in Python: the C loop's self-check failed: %s", exc)
        return None
    if not agreed:
        log.warning("same-host reads verify in Python: the C loop disagreed with xxhash")
        return None
    return lib, xxh


def _self_check(lib: ctypes.CDLL, xxh: tuple[int, ...]) -> bool:
    """Read a file of three uneven chunks into scattered runs (a run crossing a chunk
    boundary, one ending on it); every digest must match and a wrong one must stop there."""
    rng = np.random.default_rng(1)
    chunk_lengths = [70_001, 65_536, 12_345]
    body = rng.integers(0, 256, sum(chunk_lengths), dtype=np.uint8).tobytes()
    cuts = [0, 1, 40_000, 70_001, 100_003, 135_537, len(body)]
    sums = [xxhash.xxh3_64_intdigest(body[a:a + n]) for a, n in
            zip(np.cumsum([0] + chunk_lengths[:-1]).tolist(), chunk_lengths)]
    # The runs, in file order, land reversed in the destination: a scatter, not a copy.
    dest = np.zeros(len(body) + 64, dtype=np.uint8)
    lengths = np.diff(cuts).astype(np.uint64)
    places = np.cumsum(lengths[::-1])[::-1] - lengths + 64
    addresses = (dest.ctypes.data + places).astype(np.uint64)
    chunks = np.asarray(chunk_lengths, dtype=np.uint64)
    good_sums = np.asarray(sums, dtype=np.uint64)
    bad_sums = good_sums.copy()
    bad_sums[1] ^= np.uint64(1)
    with tempfile.TemporaryFile() as f:
        f.write(b"h" * 10 + body)  # a header before the body, as in a payload file
        f.flush()
        args = (f.fileno(), 10, addresses.ctypes.data, lengths.ctypes.data, len(lengths),
                chunks.ctypes.data)
        good = lib.tq_read_verify(*args, good_sums.ctypes.data, 3, *xxh)
        landed = b"".join(bytes(dest[int(p):int(p) + int(n)]) for p, n in zip(places, lengths))
        stopped = lib.tq_read_verify(*args, bad_sums.ctypes.data, 3, *xxh)
    return good == 3 and landed == body and stopped == 1
