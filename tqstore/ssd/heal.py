"""Heal a damaged index record from the payload file that describes it (format 3, selfdesc.py).

The index is derived from the payload files (rebuild.py), so a block record that fails its frame
CRC or does not decode (a flipped byte inside data.mdb) is not a lost block while its file is
intact: the writer re-derives the record from the file instead of quarantining the block and its
whole subtree (store.py _fail).

What a heal trusts, exactly what a rebuild trusts: a regular file owned by the effective uid (no
symlink followed: selfdesc.open_owned), whose header, self-description and every body chunk
checksum verify and which decodes to the namespace layout. It must describe exactly the block the
caller asked for: the key (its name and the chain hash of (parent, token ids)), the parent, the
namespace root and, when the caller has them, the token ids. Anything else is no heal: the caller
quarantines as before. A payload that fails verification is never healed.

Consistency: the record is replaced in one write txn through Index.remove (the undecodable form,
with the sizes from the file) then Index.insert, so children, leaves, the namespace's live counts
and the counters stay exact; the block's children stay linked (remove leaves them). Counted as
"healed" (and as a verification failure: the damage was real). The caller holds the store's write
lock, so eviction cannot remove the file between its verification and the txn.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Executor
from dataclasses import dataclass, replace

from tqstore.blocks import BlockPayload
from tqstore.prefix_hash import Namespace
from tqstore.ssd import payload as pl
from tqstore.ssd.index import Index
from tqstore.ssd.records import BlockRecord, RecordError
from tqstore.ssd.selfdesc import DescriptionError, entry_untrusted, read_description

log = logging.getLogger("tqstore.ssd.heal")


@dataclass(frozen=True)
class Healed:
    record: BlockRecord  # the record now in the index
    block: BlockPayload  # the verified payload (a get serves it without reading the file again)


def layout_of(ns: Namespace, n_tokens: int | None = None) -> tuple[int, int, int, int]:
    """(L, H, tokens, D) of a block of ns: a full block, or a trailing partial of n_tokens."""
    return (ns.num_layers, ns.num_kv_heads, ns.block_size if n_tokens is None else n_tokens,
            ns.head_dim)


def undecodable_sizes(path: str, ns: Namespace, n_tokens: int | None = None) -> tuple[bytes, int, int]:
    """(namespace root, allocated file bytes, logical bytes) of a block whose record does not
    decode, for Index.remove: from the namespace and the file (0 bytes if it is gone). The
    block's token count: n_tokens if the caller knows it, else the file's self-description
    says (a trailing partial is smaller than a full block), else a full block."""
    try:
        alloc = pl.allocated(os.path.getsize(path))
    except OSError:
        alloc = 0
    if n_tokens is None:
        try:  # counters only: the description's own CRC and cross-checks are enough here
            stem = os.path.basename(path).partition(".")[0]
            n_tokens = read_description(path, bytes.fromhex(stem)).record.n_tokens
        except (DescriptionError, OSError, ValueError):
            n_tokens = ns.block_size
    l, h, b, d = layout_of(ns, n_tokens)
    return ns.root_hash(), alloc, 4 * l * h * b * d


def record_mismatch(rec: BlockRecord, parent: bytes, ns: Namespace, tokens: bytes | None) -> str:
    """Why rec is not block (parent, tokens) of ns ("" if it is); tokens None: not compared.
    The block holds len(tokens) // 4 token ids (a full block, or a trailing partial); with
    tokens None, any count 1..block_size whose layout agrees (the key, a chain hash over the
    count, already pins which it is)."""
    if rec.ns != ns.root_hash() or rec.format_version != ns.format_version:
        return "namespace mismatch"
    if rec.parent != parent:
        return "parent mismatch"
    if tokens is not None and (rec.tokens != tokens or rec.n_tokens != len(tokens) // 4):
        return "token ids mismatch"
    if not 1 <= rec.n_tokens <= ns.block_size or len(rec.tokens) != 4 * rec.n_tokens:
        return "token ids mismatch"
    if tuple(rec.layout) != layout_of(ns, rec.n_tokens) or rec.dtype != ns.kv_dtype:
        return "layout mismatch"
    return ""


def verified_file(path: str, key: bytes, parent: bytes, ns: Namespace, tokens: bytes | None,
                  executor: Executor | None) -> Healed | None:
    """The record and block a payload file vouches for, if it verifies in full and describes
    exactly (key, parent, ns, tokens); None (logged) otherwise. tokens None: the caller knows
    only the chain hashes, and the key is the hash of (parent, the file's token ids)."""
    if entry_untrusted(path):  # a symlink or another user's file: never read
        log.warning("record of %s not healed: payload file untrusted", os.path.basename(path))
        return None
    try:
        desc = read_description(path, key)
        rec = desc.record
        body = pl.read_file(path, key, rec.file_size, rec.stored_size, rec.raw_size,
                            rec.compression, rec.chunks, executor)
        block = pl.decode(body, rec.layout)
    except (DescriptionError, pl.PayloadError, ValueError, OSError) as exc:
        log.warning("record of %s not healed: payload file does not verify: %s",
                    os.path.basename(path), exc)
        return None
    why = record_mismatch(rec, parent, ns, tokens)
    if why:
        log.warning("record of %s not healed: payload file describes another block (%s)",
                    os.path.basename(path), why)
        return None
    return Healed(rec, block)


def heal_record(idx: Index, path: str, key: bytes, parent: bytes, ns: Namespace,
                tokens: bytes | None, now: int, executor: Executor | None) -> Healed | None:
    """Rewrite the damaged record of `key` from its payload file (see the module docstring).
    None: the file does not vouch for the block, or the block is gone; the caller quarantines."""
    found = verified_file(path, key, parent, ns, tokens, executor)
    if found is None:
        return None
    rec = replace(found.record, access=now, hits=0)  # hits are lost with the record
    with idx.env.begin(write=True) as txn:
        cur = txn.get(key, db=idx.blocks)
        if cur is None:  # evicted or quarantined meanwhile: a plain miss
            return None
        try:
            BlockRecord.decode(cur)
            return found  # healed by another thread meanwhile; the file vouched for the bytes
        except RecordError:
            pass
        idx.remove(txn, key, None, parent, (rec.ns, pl.allocated(rec.file_size), rec.raw_size))
        idx.insert(txn, key, rec)
        idx.add_counters(txn, {"healed": 1, "verification_failures": 1})
    log.warning("index record of block %s was damaged: healed from its payload file", key.hex())
    return Healed(rec, found.block)
