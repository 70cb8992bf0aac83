"""Fast path for the prefix hash chain of long prompts.

`tqstore.prefix_hash.hash_prefix_blocks` is the definition; it converts token ids one Python int
at a time, about 10 ms for a 128k-token prompt, which alone would blow the 2 ms lookup budget.
This computes the same bytes (little-endian uint32 ids, SHA-256(parent || u32 count || ids)) with
one numpy conversion. tests/ssd/test_chain.py asserts equality with hash_prefix_blocks on random
prompts, so the two cannot drift apart.

Also the two walks over the chain structure that the index, a rebuild and `check` share:
`block_hash` (one link, for a file that describes itself) and `closure_order` (which records are
reachable from their namespace root, parents first).

Trailing partial blocks (`trailing_tail`, `partial_hash`): the m tokens (1 <= m < block_size)
after the last full block k-1 of a token list form one more link, block_hash(h_{k-1}, tail, m),
at index k. The count m is hashed, so a partial never shares a name with a full block (count
block_size) nor with a partial of another length. A partial is always a leaf: no chain hash of
full blocks ever names it as a parent.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from typing import Mapping, Protocol, Sequence

import numpy as np

from tqstore.errors import InvalidArgument
from tqstore.prefix_hash import BlockHash, Namespace

_U32_MAX = 2**32 - 1


def token_array(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as a little-endian uint32 array; InvalidArgument if any is out of range."""
    if isinstance(token_ids, np.ndarray) and token_ids.dtype == np.dtype("<u4"):
        return token_ids.reshape(-1)
    try:
        arr = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgument(f"token ids must be integers: {exc}") from exc
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _U32_MAX):
        raise InvalidArgument("token id out of range [0, 2**32-1]")
    return arr.astype("<u4")


def block_hash(parent: bytes, tokens: bytes, n_tokens: int) -> bytes:
    """One link of the chain: SHA-256(parent || u32 count || token ids), as chain_hashes."""
    h = hashlib.sha256(parent)
    h.update(struct.pack("<I", n_tokens))
    h.update(tokens)
    return h.digest()


class ChainLink(Protocol):
    ns: bytes
    parent: bytes
    index: int


def closure_order(records: Mapping[bytes, ChainLink]) -> list[bytes]:
    """Keys reachable from a namespace root through records of the same namespace, each child
    one index past its parent; parents before children (breadth first, sorted: deterministic).
    This is prefix closure (index.py): whatever is not listed is unreachable by a lookup."""
    by_parent: dict[bytes, list[bytes]] = {}
    for key, rec in records.items():
        by_parent.setdefault(rec.parent, []).append(key)
    queue = deque(sorted(k for k, r in records.items() if r.index == 0 and r.parent == r.ns))
    order: list[bytes] = []
    while queue:
        key = queue.popleft()
        order.append(key)
        rec = records[key]
        for child in sorted(by_parent.get(key, [])):
            crec = records[child]
            if crec.ns == rec.ns and crec.index == rec.index + 1:
                queue.append(child)
    return order


def trailing_tail(namespace: Namespace, tokens: np.ndarray) -> tuple[int, np.ndarray]:
    """(k, tail): the index of the trailing partial block of `tokens` (the number of full blocks
    before it) and its token ids; the tail is empty when len(tokens) is a multiple of the size."""
    k = len(tokens) // namespace.block_size
    return k, tokens[k * namespace.block_size:]


def partial_hash(parent: bytes, tail: np.ndarray) -> bytes:
    """Name of the trailing partial block with token ids `tail` after `parent` (h_{k-1}, or the
    namespace root when k == 0)."""
    return block_hash(parent, np.asarray(tail).astype("<u4").tobytes(), len(tail))


def chain_hashes(namespace: Namespace, tokens: np.ndarray, limit: int | None = None) -> list[BlockHash]:
    """Hashes of the full blocks of `tokens` (at most `limit` of them), equal to
    hash_prefix_blocks(namespace, tokens)[:limit]."""
    size = namespace.block_size
    count = len(tokens) // size
    if limit is not None:
        count = min(count, limit)
    body = memoryview(tokens[: count * size].tobytes())
    step = 4 * size
    prefix = struct.pack("<I", size)
    parent = namespace.root_hash()
    out: list[BlockHash] = []
    sha = hashlib.sha256
    for i in range(count):
        h = sha(parent)
        h.update(prefix)
        h.update(body[i * step : (i + 1) * step])
        parent = BlockHash(h.digest())
        out.append(parent)
    return out
