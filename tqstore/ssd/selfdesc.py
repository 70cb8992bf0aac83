"""A payload file's self-description: the index records a rebuild needs, stored in the file.

Layout (between the 64-byte header, which records its size, and the body; payload_format.py):
    u32 length of the block frame || block record frame || namespace record frame || u32 CRC-32
The frames are the index's own (records.py: magic, kind, version, CRC-32, msgpack), so a
self-description is exactly the BlockRecord (with file_size 0: a record cannot hold the size of
the file that holds it; the rebuild takes it from the file) and the NamespaceRecord (with zero
live counts). The trailing CRC covers the whole description.

Invariant checked by `read_description`: the file's header, its name, its size, the chain hash
recomputed from (parent, token ids) and the namespace root recomputed from the namespace record
all agree. Any disagreement means the file cannot vouch for itself and is not re-indexed.
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from dataclasses import dataclass, replace

from tqstore.payload_format import (
    HEADER_SIZE, desc_size_of, description_intact, header, header_version)
from tqstore.prefix_hash import Namespace
from tqstore.ssd.chain import block_hash
from tqstore.ssd.records import BlockRecord, NamespaceRecord, RecordError

_LEN = struct.Struct("<I")
MAX_DESCRIPTION = 1 << 24  # a block's token ids and chunk table: far below this


class DescriptionError(ValueError):
    """A payload file has no valid self-description (version 2, damaged or inconsistent)."""


@dataclass(frozen=True)
class Description:
    key: bytes
    record: BlockRecord  # file_size set from the file, access from the caller
    namespace: NamespaceRecord


def encode_description(rec: BlockRecord, ns: NamespaceRecord) -> bytes:
    """The self-description of a file about to be written with this record."""
    block = replace(rec, file_size=0, hits=0, access=rec.created).encode()
    body = _LEN.pack(len(block)) + block + replace(ns, blocks=0, bytes=0).encode()
    return body + _LEN.pack(zlib.crc32(body))


def namespace_of(ns: NamespaceRecord) -> Namespace:
    return Namespace(ns.model, num_layers=ns.num_layers, num_kv_heads=ns.num_kv_heads,
                     head_dim=ns.head_dim, block_size=ns.block_size, kv_dtype=ns.kv_dtype,
                     format_version=ns.format_version,
                     extra=tuple((str(k), str(v)) for k, v in ns.extra))


class UntrustedFile(OSError):
    """Not a regular file owned by this process's user: never read as a block, never deleted
    (what another user planted, or a symlink, is left in place and counted)."""


def entry_untrusted(path: str) -> str:
    """Why the store must neither read nor delete the directory entry at path ("" if it may):
    only regular files owned by the effective uid are the store's (a symlink or another user's
    file in blocks/ was planted, a directory there is junk someone else made)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return "foreign"
    return ""


def open_owned(path: str) -> int:
    """A read-only fd of path if it is a regular file owned by the effective uid; the symlink
    itself is never followed (O_NOFOLLOW), so what is checked is what is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise UntrustedFile(f"{path}: " + ("not a regular file" if not stat.S_ISREG(st.st_mode)
                                           else f"owned by uid {st.st_uid}"))
    return fd


def read_description(path: str, key: bytes) -> Description:
    """Parse and cross-check the self-description of the payload file at path, named `key`.
    Raises DescriptionError (or OSError) when the file cannot describe itself. Does not read
    the body: the caller verifies it with payload.read_file against the returned record."""
    with os.fdopen(open_owned(path), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_SIZE)
        length = desc_size_of(head)
        if length is None:
            version = header_version(head)
            raise DescriptionError(f"payload file version {version} without a valid "
                                   "self-describing header")
        if not 2 * _LEN.size <= length <= min(MAX_DESCRIPTION, size - HEADER_SIZE):
            raise DescriptionError("self-description size out of range")
        desc = f.read(length)
    if len(desc) != length or not description_intact(desc):
        raise DescriptionError("self-description checksum mismatch")
    body = desc[:-_LEN.size]
    (block_len,) = _LEN.unpack_from(body)
    try:
        rec = BlockRecord.decode(body[_LEN.size:_LEN.size + block_len])
        ns = NamespaceRecord.decode(body[_LEN.size + block_len:])
    except RecordError as exc:
        raise DescriptionError(f"self-description undecodable: {exc}") from exc
    rec.file_size = size
    _cross_check(key, head, rec, ns, length, size)
    return Description(key, rec, ns)


def _cross_check(key: bytes, head: bytes, rec: BlockRecord, ns: NamespaceRecord,
                 desc_size: int, file_size: int) -> None:
    try:
        expect = header(key, rec.compression, rec.raw_size, rec.stored_size, desc_size)
    except KeyError as exc:
        raise DescriptionError(f"unknown compression {rec.compression!r}") from exc
    if head != expect:
        raise DescriptionError("header disagrees with the self-description or the file name")
    if HEADER_SIZE + desc_size + rec.stored_size != file_size:
        raise DescriptionError("file size disagrees with the self-description")
    if block_hash(rec.parent, rec.tokens, rec.n_tokens) != key:
        raise DescriptionError("chain hash of (parent, token ids) is not the file's name")
    try:
        root = namespace_of(ns).root_hash()
    except Exception as exc:  # Namespace validates its fields: any failure means "damaged"
        raise DescriptionError(f"namespace record invalid: {exc}") from exc
    if root != rec.ns:
        raise DescriptionError("namespace record does not hash to the block's namespace")
    # A full block holds block_size tokens; a trailing partial (chain.py) 1..block_size-1, and
    # its layout says so. The token ids must be exactly n_tokens of them.
    if (not 1 <= rec.n_tokens <= ns.block_size or len(rec.tokens) != 4 * rec.n_tokens
            or rec.dtype != ns.kv_dtype
            or tuple(rec.layout) != (ns.num_layers, ns.num_kv_heads, rec.n_tokens, ns.head_dim)):
        raise DescriptionError("block layout disagrees with its namespace")
    if (rec.index == 0) != (rec.parent == rec.ns):
        raise DescriptionError("block index and parent disagree")
