"""The paged allocator: blocks with reference counts, an LRU free queue and lazy eviction.

A block is a slot in every layer's arena (arenas.py) holding ``block_size`` tokens. The pool only
does bookkeeping; it never touches KV bytes.

Invariants (each tested in tests/paged/test_block_pool.py):
- Block 0 is the reserved null block: never allocated, never freed, never cached. Block tables
  may pad with it.
- A block is in the free queue iff its ref count is 0. Allocation pops the queue head (the least
  recently freed block); ``free`` appends to the tail, so the exact eviction order is the order of
  frees.
- Lazy eviction: a freed block keeps its hash and stays findable by ``lookup`` until it is
  popped for reuse; only then is its hash dropped. A lookup hit on a free block takes it out of
  the middle of the queue in O(1) (doubly linked list, as in vLLM v1).
- One hash maps to at most one block; a block carries at most one hash, set once it is full and
  written (a partial block's contents still change, so it is never shared by hash).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from tqstore.errors import InvalidArgument, ResourceExhausted
from tqstore.prefix_hash import BlockHash

NULL_BLOCK_ID = 0


@dataclass(slots=True, eq=False)
class KVBlock:
    """Bookkeeping for one physical block (the bytes live in the arenas)."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    # Free-queue links; both None when the block is not in the queue (or is its only element).
    prev_free: "KVBlock | None" = None
    next_free: "KVBlock | None" = None
    in_free_queue: bool = False

    @property
    def is_null(self) -> bool:
        return self.block_id == NULL_BLOCK_ID


class FreeBlockQueue:
    """Doubly linked list of free blocks: O(1) popleft, append and removal from the middle.

    Order = eviction order: the head is evicted first.
    """

    def __init__(self, blocks: Iterable[KVBlock] = ()) -> None:
        self._head: KVBlock | None = None
        self._tail: KVBlock | None = None
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def append(self, block: KVBlock) -> None:
        if block.in_free_queue:
            raise InvalidArgument(f"block {block.block_id} is already free")
        block.prev_free, block.next_free = self._tail, None
        if self._tail is None:
            self._head = block
        else:
            self._tail.next_free = block
        self._tail = block
        block.in_free_queue = True
        self.num_free += 1

    def remove(self, block: KVBlock) -> None:
        if not block.in_free_queue:
            raise InvalidArgument(f"block {block.block_id} is not in the free queue")
        if block.prev_free is None:
            self._head = block.next_free
        else:
            block.prev_free.next_free = block.next_free
        if block.next_free is None:
            self._tail = block.prev_free
        else:
            block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        block.in_free_queue = False
        self.num_free -= 1

    def popleft(self) -> KVBlock:
        if self._head is None:
            raise ResourceExhausted("no free KV blocks left in the pool")
        block = self._head
        self.remove(block)
        return block

    def block_ids(self) -> list[int]:
        """Queue contents head to tail (for tests and inspection)."""
        out, node = [], self._head
        while node is not None:
            out.append(node.block_id)
            node = node.next_free
        return out


class BlockPool:
    """Allocates blocks 1..num_blocks-1, counts references, caches full blocks by prefix hash."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise InvalidArgument(f"a pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.null_block.ref_cnt = 1  # pinned forever
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached: dict[BlockHash, KVBlock] = {}
        self.evictions = 0  # cached blocks whose hash was dropped on reuse

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - self.free_queue.num_free

    def allocate(self, count: int = 1) -> list[KVBlock]:
        """Take ``count`` blocks from the queue head (evicting their cached hashes), ref 1 each."""
        if count > self.free_queue.num_free:
            raise ResourceExhausted(
                f"need {count} KV blocks, {self.free_queue.num_free} free of {self.num_blocks - 1}")
        out = []
        for _ in range(count):
            block = self.free_queue.popleft()
            if block.block_hash is not None:  # lazy eviction happens here, not at free time
                del self.cached[block.block_hash]
                block.block_hash = None
                self.evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def incref(self, block: KVBlock) -> None:
        """Share a block; a free (cached) block comes back out of the queue."""
        if block.is_null:
            return
        if block.ref_cnt == 0:
            self.free_queue.remove(block)
        block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block, in order; blocks reaching 0 join the queue tail
        in that order (callers pass a sequence's blocks last-first so its tail evicts first)."""
        for block in blocks:
            if block.is_null:
                continue
            if block.ref_cnt <= 0:
                raise InvalidArgument(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        """The block holding this prefix hash, free or not, or None (no side effects)."""
        return self.cached.get(block_hash)

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> KVBlock:
        """Publish a full, written block under its hash. If another block already holds the hash
        (two sequences computed the same prefix), the existing one stays canonical and is
        returned; the caller may keep using its own copy."""
        if block.is_null:
            raise InvalidArgument("the null block cannot be cached")
        existing = self.cached.get(block_hash)
        if existing is not None:
            return existing
        if block.block_hash is not None and block.block_hash != block_hash:
            raise InvalidArgument(f"block {block.block_id} already holds another hash")
        block.block_hash = block_hash
        self.cached[block_hash] = block
        return block
