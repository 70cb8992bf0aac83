"""A full disk is a ResourceExhausted, whichever layer notices it first.

ENOSPC reaches the store as an OSError from a payload write, fsync or rename, or as an lmdb.Error
from a write txn (LMDB writes dirty pages with pwrite at commit; py-lmdb raises a plain
lmdb.Error whose text is the C library's strerror, so the text is all there is to match; and LMDB
reports a short page write, which is how a full disk often shows, as EIO: an EIO from LMDB counts
as a full disk when the file system holding the index has under LOW_SPACE bytes free). The
caller has already undone what it wrote (no temp or unacknowledged payload file survives a failed
put: payload.write_file and BlockStore.put_blocks clean up), so the store stays consistent and a
put succeeds again once space is freed.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import Iterator

import lmdb

from tqstore.errors import ResourceExhausted
from tqstore.ssd.payload import FILE_MODE


_CODES = (errno.ENOSPC, errno.EDQUOT)
_TEXTS = tuple(os.strerror(c) for c in _CODES)
_EIO_TEXT = os.strerror(errno.EIO)
LOW_SPACE = 1 << 20


def _nearly_full(path: str) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE


def out_of_space(exc: BaseException, path: str | None = None) -> bool:
    """True when exc means "the file system is full" (or the user's quota is). path: a file
    or directory on the file system of the LMDB index (for LMDB's EIO, see above)."""
    if isinstance(exc, OSError):
        return exc.errno in _CODES
    if isinstance(exc, lmdb.Error):
        text = str(exc)
        if any(t in text for t in _TEXTS):
            return True
        return path is not None and _EIO_TEXT in text and _nearly_full(path)
    return False


@contextmanager
def space_errors(what: str, path: str | None = None) -> Iterator[None]:
    """Re-raise a full disk or a full LMDB map inside the block as ResourceExhausted."""
    try:
        yield
    except lmdb.MapFullError as exc:
        raise ResourceExhausted(f"{what}: LMDB map is full: raise map_size") from exc
    except (OSError, lmdb.Error) as exc:
        if out_of_space(exc, path):
            raise ResourceExhausted(f"{what}: disk full ({exc})") from exc
        raise


RESERVE_FILE = "space.reserve"
RESERVE_BYTES = 256 << 10  # LMDB needs a few dirty pages to commit even an eviction


class SpaceReserve:
    """A preallocated file in the store that is given back to the file system when the disk is
    too full for LMDB to commit even a one-block eviction (which needs new pages before it frees
    any): without it a full disk could wedge the store until someone freed space by hand
    (BlockStore._evict). Recreated once an eviction has freed payload files."""

    def __init__(self, store_path: str) -> None:
        self.store_path = store_path
        self.path = os.path.join(store_path, RESERVE_FILE)

    def ensure(self) -> bool:
        """Create the reserve if it is missing; False if there is no room for it now."""
        try:
            if os.path.getsize(self.path) >= RESERVE_BYTES:
                return True
        except OSError:
            pass
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
            try:
                os.fchmod(fd, FILE_MODE)
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
            return True
        except OSError:
            self.release()
            return False

    def release(self) -> bool:
        try:
            os.unlink(self.path)
            return True
        except OSError:
            return False
