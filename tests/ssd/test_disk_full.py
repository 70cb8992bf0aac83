"""A full disk (a real 8 MiB tmpfs) is a ResourceExhausted that leaves the store consistent:
no temp files, every acknowledged block intact, a clean close, and puts work again once there is
room (tqstore/ssd/diskfull.py is the scenario, tools/disk_full.py its long form)."""

import errno
import os
import subprocess

import lmdb
import pytest

from tqstore.errors import ResourceExhausted
from tqstore.ssd import BlockStore, StoreConfig
from tqstore.ssd.diskfull import run_disk_full
from tqstore.ssd.nospace import RESERVE_FILE, out_of_space, space_errors

from .conftest import NS, random_payload, random_tokens, same_bits


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs of its own (needs root: skipped with the reason otherwise)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill_fs(directory) -> None:
    """Take every free byte of the file system (a filler file written until ENOSPC)."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        chunk = bytes(1 << 16)
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                if len(chunk) == 1:
                    return
                chunk = chunk[: len(chunk) // 2]


def test_full_disk_puts_fail_cleanly_and_recover(small_fs):
    report = run_disk_full(str(small_fs), ballast_bytes=1 << 20)
    assert report.failed_puts >= 3 and report.wrong_errors == []
    assert report.temp_files_left == 0 and report.lost_or_wrong == 0 and report.check_ok
    assert report.put_after_freeing and report.put_after_evict and report.close_clean
    assert report.reopen_verified == report.acked_blocks > 0
    assert report.ok


def test_lmdb_commit_on_a_full_disk_is_resource_exhausted(small_fs):
    env = lmdb.open(str(small_fs / "env"), map_size=1 << 26)
    _fill_fs(small_fs)
    with pytest.raises(ResourceExhausted, match="disk full"):
        with space_errors("test", str(small_fs)):
            with env.begin(write=True) as txn:
                for i in range(2000):
                    txn.put(i.to_bytes(4, "big"), bytes(1000))
    try:  # the same error, seen raw: what out_of_space recognises
        with env.begin(write=True) as txn:
            for i in range(2000):
                txn.put(i.to_bytes(4, "big"), bytes(1000))
    except lmdb.Error as exc:
        assert out_of_space(exc, str(small_fs))
    else:
        pytest.fail("a 2 MB commit succeeded on a full file system")
    env.close()


def test_close_on_a_full_disk_is_clean(small_fs, rng, caplog):
    path = small_fs / "store"
    toks = random_tokens(rng, 4 * NS.block_size)
    pls = [random_payload(rng) for _ in range(4)]
    s = BlockStore(path, StoreConfig(access_flush_count=10_000, access_flush_interval_s=3600))
    s.put_blocks(NS, toks, 0, pls)
    for i in range(4):  # batched access times: close() must flush them on a full disk
        s.get_block(NS, toks, i)
    os.unlink(path / RESERVE_FILE)
    _fill_fs(small_fs)
    with pytest.raises(ResourceExhausted):
        s.put_blocks(NS, random_tokens(rng, NS.block_size), 0, [random_payload(rng)])
    assert [n for n in os.listdir(path / "blocks") if not n.endswith(".blk")] == []
    s.close()  # logs what it could not persist; never raises (SIGTERM on a full disk)
    assert any("not persisted" in r.getMessage() for r in caplog.records)
    os.unlink(small_fs / "filler")
    with BlockStore(path) as again:
        assert all(same_bits(again.get_block(NS, toks, i), p) for i, p in enumerate(pls))
        assert again.check().ok
