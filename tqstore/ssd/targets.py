"""Which blocks a store call names, and the checks of payloads and index records against them
(store.py: put_blocks, get_block, lookup_partial, locate).

A target is one block of a token list's chain: full block i is (chain hash h_i, parent h_{i-1} or
the namespace root, its block_size token ids). The trailing partial (chain.py) is
(partial_hash(h_{k-1}, tail), h_{k-1} or the root, the m tail tokens) at index k = len // size,
with layout (L, H, m, D). A put, a get and a verification all derive key, parent, token ids and
layout from here, so a record written for a target is exactly what a later read expects of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tqstore.blocks import BlockPayload
from tqstore.errors import InvalidArgument
from tqstore.prefix_hash import Namespace
from tqstore.ssd.chain import chain_hashes, partial_hash, trailing_tail
from tqstore.ssd.heal import layout_of, record_mismatch
from tqstore.ssd.index import Index
from tqstore.ssd.records import BlockRecord, RecordError


@dataclass(frozen=True)
class Target:
    index: int
    key: bytes
    parent: bytes
    tokens: bytes  # the block's token ids, little-endian uint32

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) // 4


def full_target(ns: Namespace, tokens: np.ndarray, hashes: Sequence[bytes], i: int) -> Target:
    bs = ns.block_size
    return Target(i, hashes[i], hashes[i - 1] if i else ns.root_hash(),
                  tokens[i * bs:(i + 1) * bs].tobytes())


def partial_target(ns: Namespace, tokens: np.ndarray, hashes: Sequence[bytes]) -> Target | None:
    """The trailing partial of tokens (None when its length is a multiple of the block size);
    hashes: the chain hashes of at least its k full blocks."""
    k, tail = trailing_tail(ns, tokens)
    if not len(tail):
        return None
    parent = hashes[k - 1] if k else ns.root_hash()
    return Target(k, partial_hash(parent, tail), parent, tail.tobytes())


def check_payload(ns: Namespace, p: BlockPayload, n_tokens: int) -> None:
    """InvalidArgument unless p holds float16 keys and values of a block of n_tokens tokens."""
    if ns.kv_dtype != "float16":
        raise InvalidArgument(f"the SSD tier stores float16 KV, namespace says {ns.kv_dtype}")
    shape = layout_of(ns, n_tokens)
    for name in ("keys", "values"):
        a = getattr(p, name, None)
        if not isinstance(a, np.ndarray) or a.dtype != np.float16 or a.shape != shape:
            got = (getattr(a, "dtype", type(a).__name__), getattr(a, "shape", None))
            raise InvalidArgument(f"{name} must be float16 {shape} for this namespace, got {got}")


def put_targets(ns: Namespace, tokens: np.ndarray, first: int, payloads: Sequence[BlockPayload],
                partial: bool) -> tuple[list[bytes], list[Target]]:
    """(chain hashes of full blocks 0 .. the last one put, the target of each payload in order)
    for a put of blocks first.. of tokens; the last payload is the trailing partial if partial.
    InvalidArgument (before anything is written) if the blocks or payload shapes do not fit."""
    n, bs = len(payloads), ns.block_size
    if partial:
        k, tail = trailing_tail(ns, tokens)
        if not len(tail):
            raise InvalidArgument(f"a partial put needs a trailing partial block: {len(tokens)} "
                                  f"token ids are a multiple of the block size {bs}")
        if first < 0 or n < 1 or first + n - 1 != k:
            raise InvalidArgument(f"a partial put of {n} blocks from {first} must end at the "
                                  f"trailing partial, block {k} of {len(tokens)} token ids")
        full = n - 1
    else:
        if first < 0 or len(tokens) < (first + n) * bs:
            raise InvalidArgument(f"token ids ({len(tokens)}) do not cover blocks "
                                  f"{first}..{first + n - 1} of size {bs}")
        full = n
    hashes = chain_hashes(ns, tokens, first + full)
    targets = [full_target(ns, tokens, hashes, i) for i in range(first, first + full)]
    if partial:
        last = partial_target(ns, tokens, hashes)
        assert last is not None  # the tail was checked above
        targets.append(last)
    for t, p in zip(targets, payloads):
        check_payload(ns, p, t.n_tokens)
    return hashes, targets


def get_target(ns: Namespace, tokens: np.ndarray, index: int, partial: bool) -> Target:
    """Block `index` of tokens: the trailing partial when partial and index is its index (and the
    tail is not empty), else a full block (InvalidArgument if tokens do not cover it)."""
    bs = ns.block_size
    if partial and index == len(tokens) // bs and len(tokens) % bs:
        last = partial_target(ns, tokens, chain_hashes(ns, tokens, index))
        assert last is not None  # the tail is not empty
        return last
    if index < 0 or (index + 1) * bs > len(tokens):
        raise InvalidArgument(f"block {index} is not a full block of {len(tokens)} tokens")
    return full_target(ns, tokens, chain_hashes(ns, tokens, index + 1), index)


def locate_targets(ns: Namespace, tokens: np.ndarray, first: int, num_blocks: int,
                   partial: bool) -> list[Target]:
    """What a Locate names: full blocks first.. (num_blocks of them; 0: to the last full
    block), or with partial the trailing partial block (first must be its index, num_blocks 0
    or 1). InvalidArgument for anything outside the tokens."""
    full = len(tokens) // ns.block_size
    if partial:
        last = partial_target(ns, tokens, chain_hashes(ns, tokens, full))
        if last is None or first != full or num_blocks > 1:
            raise InvalidArgument(f"the trailing partial block of {len(tokens)} tokens is block "
                                  f"{full}, one block with a non-empty tail")
        return [last]
    count = num_blocks or max(full - first, 0)
    if first < 0 or first + count > full:
        raise InvalidArgument(f"blocks [{first}, {first + count}) outside the {full} full "
                              f"blocks of {len(tokens)} tokens")
    hashes = chain_hashes(ns, tokens, first + count)
    return [full_target(ns, tokens, hashes, i) for i in range(first, first + count)]


def locate_records(idx: Index, ns: Namespace, targets: Sequence[Target]
                   ) -> tuple[list[tuple[int, BlockRecord]], tuple]:
    """The verified records of targets in order (stopping at the first absent), and the
    BlockStore._fail arguments of the first that failed (() if none did)."""
    found: list[tuple[int, BlockRecord]] = []
    with idx.env.begin(db=idx.blocks) as txn:
        for t in targets:
            raw = txn.get(t.key)
            if raw is None:
                break
            heal = False
            try:
                rec = BlockRecord.decode(raw)
                reason = record_mismatch(rec, t.parent, ns, t.tokens)
            except RecordError as exc:
                reason, heal = str(exc), True
            if reason:
                return found, (t.key, t.parent, reason, raw, ns, heal, t.tokens)
            found.append((t.index, rec))
    return found, ()
