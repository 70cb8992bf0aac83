"""The same-host reader's C loop (tq_read.c through tqstore.native.read_verify) on real files:
scattered runs land bit for bit, every chunk's XXH3-64 is xxhash's, and a mismatch, a short
file or too few runs end the count where they occur."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from tqstore.native import build
from tqstore.native.read_verify import available, read_verify

# Skipped only without a compiler: where one exists, the library must build and load.
pytestmark = pytest.mark.skipif(build._compiler() is None, reason="no C compiler on this machine")


def _case(tmp_path, rng, chunk_lengths, run_lengths, header=7):
    body = rng.integers(0, 256, sum(chunk_lengths), dtype=np.uint8).tobytes()
    path = tmp_path / "payload"
    path.write_bytes(b"x" * header + body)
    starts = np.cumsum([0] + list(chunk_lengths[:-1]))
    sums = [xxhash.xxh3_64_intdigest(body[a:a + n]) for a, n in zip(starts, chunk_lengths)]
    # Runs land in the destination in shuffled order, with gaps between them.
    lengths = np.asarray(run_lengths, dtype=np.uint64)
    order = rng.permutation(len(lengths))
    gaps = 13
    dest = np.full(int(lengths.sum()) + gaps * len(lengths), 0xEE, dtype=np.uint8)
    places = np.zeros(len(lengths), dtype=np.uint64)
    at = 0
    for i in order:
        places[i] = at
        at += int(lengths[i]) + gaps
    addresses = (dest.ctypes.data + places).astype(np.uint64)
    return body, path, sums, dest, places, lengths, addresses


def _landed(dest, places, lengths) -> bytes:
    return b"".join(bytes(dest[int(p):int(p) + int(n)]) for p, n in zip(places, lengths))


def test_the_c_loop_is_available_where_the_library_builds():
    assert build.load() is not None, build.unavailable_reason()
    assert available()


def test_scattered_runs_land_bit_for_bit_and_every_chunk_verifies(tmp_path, rng):
    chunks = [4096, 4096, 1000, 1]
    runs = [1, 3000, 2000, 3191, 1000, 1]  # runs crossing chunk ends, one ending on one
    body, path, sums, dest, places, lengths, addresses = _case(tmp_path, rng, chunks, runs)
    with open(path, "rb") as f:
        assert read_verify(f.fileno(), 7, addresses, lengths, chunks, sums) == 4
    assert _landed(dest, places, lengths) == body
    # The gaps between runs are untouched: nothing written outside the runs.
    written = np.zeros(len(dest), dtype=bool)
    for p, n in zip(places, lengths):
        written[int(p):int(p) + int(n)] = True
    assert (dest[~written] == 0xEE).all()


def test_a_wrong_checksum_a_short_file_or_too_few_runs_end_the_count(tmp_path, rng):
    chunks = [2048, 2048, 2048]
    runs = [1024] * 6
    body, path, sums, dest, places, lengths, addresses = _case(tmp_path, rng, chunks, runs)
    with open(path, "rb") as f:
        bad = list(sums)
        bad[1] ^= 1
        assert read_verify(f.fileno(), 7, addresses, lengths, chunks, bad) == 1
        # Reading from one byte too far: the body is shifted, the first chunk already fails.
        assert read_verify(f.fileno(), 8, addresses, lengths, chunks, sums) in (0, -1)
        # Runs covering only two chunks: the third is never counted as verified.
        assert read_verify(f.fileno(), 7, addresses[:4], lengths[:4], chunks, sums) == 2
    path.write_bytes(b"x" * 7 + body[:5000])  # the file ends inside chunk 2
    with open(path, "rb") as f:
        assert read_verify(f.fileno(), 7, addresses, lengths, chunks, sums) == -1


def test_short_reads_and_interrupted_reads_complete_every_run(tmp_path):
    """tq_read.c built against a preadv that returns random short reads and EINTR
    (short_reads_harness.c): every layout lands whole and verifies."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    binary = tmp_path / "short_reads"
    subprocess.run([build._compiler(), "-O1", "-std=c11",
                    f"-I{build.HERE}", str(here / "short_reads_harness.c"), "-o", str(binary)],
                   check=True, capture_output=True, timeout=120)
    done = subprocess.run([str(binary), "400"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    fails, calls, eintrs = (int(part.split("=")[1]) for part in done.stdout.split())
    assert fails == 0 and eintrs > 100 and calls > 4 * eintrs  # it did read in short pieces
