"""One sequence's view of the pool: its block table, token ids, prefix hashes and sharing.

Every layer of a sequence uses the same block table (one block id = the same tokens in every
layer's arena), so allocation, copy-on-write and hash publication happen here once per step,
not once per layer. Layers report progress with ``note_written``; a full block is published
under its prefix hash only when every layer has written it and its token ids are known.

Invariants:
- ``blocks[i]`` holds token positions [i * block_size, (i + 1) * block_size).
- A block that is shared (ref > 1) or published under a hash is never written in place: the
  first write into it copies it to a fresh block in every layer (copy-on-write), so readers of
  the shared or cached copy never see the change.
- ``release`` returns every block exactly once, last block first, so a sequence's tail is
  evicted before its (more likely shared) head.
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Sequence as Seq

import mlx.core as mx

from tqstore.errors import InvalidArgument
from tqstore.paged.block_pool import KVBlock
from tqstore.prefix_hash import BlockHash, hash_block_tokens
from tqstore.small_arrays import padded_array, padded_rows

if TYPE_CHECKING:
    from tqstore.paged.kv_pool import PagedKVPool

# Called with (layer, keys, values) fp16 (1, Hkv, T, D) when a layer's prefill ends, before its
# fp16 copy is dropped: the hook the daemon client uses to upload prefill blocks.
PrefillListener = Callable[[int, mx.array, mx.array], None]


class Sequence:
    def __init__(self, pool: "PagedKVPool", token_ids: Seq[int] = (),
                 shared_blocks: Seq[KVBlock] = (), shared_hashes: Seq[BlockHash] = ()) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.blocks: list[KVBlock] = list(shared_blocks)
        self.block_hashes: list[BlockHash] = list(shared_hashes)
        self.token_ids: list[int] = [int(t) for t in token_ids]
        # Tokens whose KV came from the pool's prefix cache: the caller prefills only the rest.
        self.num_cached_tokens = len(self.blocks) * self.block_size
        self.written = [self.num_cached_tokens] * pool.num_layers
        self.prefill_listeners: list[PrefillListener] = []
        # Length of the prompt when the caller knows it (the generator does): single-token steps
        # up to it are still prefill (fp16), so the one quantization pass runs after the first
        # token is out, not inside TTFT. None: prefill ends at the first single-token step.
        self.prompt_length: int | None = None
        self._table_array: mx.array | None = None
        # Names this sequence's block list as it is now, unique across all sequences and
        # changes (a new number at every change): a batch's step tables compare these, and
        # build no table array per sequence (tqstore.paged.batch.StepTables).
        self.table_version = next(_TABLE_VERSIONS)
        self._length_array: tuple[int, mx.array] | None = None
        # The last prepare_write answer: every layer of a step writes the same positions, so
        # the index arrays are built (and uploaded, on a GPU) once per step, not once per layer.
        # Cleared whenever a block could change: allocation, copy-on-write, publication, fork,
        # trim, release.
        self._write_memo: tuple[tuple[int, int], tuple[mx.array, mx.array | None]] | None = None
        self.released = False

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Tokens written by every layer."""
        return min(self.written)

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]

    def block_table(self) -> mx.array:
        """int32 (1, num_blocks): the row decode attention reads (memoized until it changes)."""
        if self._table_array is None:
            self._table_array = padded_rows([self.block_ids or [0]])
        return self._table_array

    def length_array(self, num_tokens: int) -> mx.array:
        """int32 (1,) holding num_tokens: decode attention's seq_lens, built once per step for
        all layers (every layer attends the same number of committed tokens)."""
        if self._length_array is None or self._length_array[0] != num_tokens:
            self._length_array = (num_tokens, padded_array([num_tokens]))
        return self._length_array[1]

    @staticmethod
    def tail_info_array(length: int, old_length: int) -> mx.array:
        """int32 [length, old_length] of the fp16 tail in this step (the decode epilogue's
        input): kept by value for every sequence (no host array per step)."""
        return _tail_info_pair(length, old_length)

    # -- writes ----------------------------------------------------------------------------
    def prepare_write(self, start: int, count: int) -> tuple[mx.array, mx.array | None]:
        """Make positions start..start+count-1 writable; return (block ids, slots) per token,
        or (block ids, None) when the positions are whole blocks (one index per block: the
        arenas then write pages, a prefill chunk's case)."""
        self._check_live()
        if self._write_memo is not None and self._write_memo[0] == (start, count):
            return self._write_memo[1]
        bs = self.block_size
        needed = -(-(start + count) // bs)
        if needed > len(self.blocks):
            self.blocks.extend(self.pool.block_pool.allocate(needed - len(self.blocks)))
            self._blocks_changed()
        for i in range(start // bs, needed):
            block = self.blocks[i]
            if block.ref_cnt > 1 or block.block_hash is not None:
                self._copy_on_write(i)
        if start % bs == 0 and count % bs == 0:
            where = (padded_array([b.block_id for b in self.blocks[start // bs:needed]]), None)
        else:
            ids = [self.blocks[p // bs].block_id for p in range(start, start + count)]
            where = (padded_array(ids), padded_array([p % bs for p in range(start, start + count)]))
        self._write_memo = ((start, count), where)
        return where

    def _blocks_changed(self) -> None:
        self._table_array = None
        self.table_version = next(_TABLE_VERSIONS)
        self._write_memo = None

    def _copy_on_write(self, index: int) -> None:
        old = self.blocks[index]
        (new,) = self.pool.block_pool.allocate(1)
        for arena in self.pool.arenas:
            arena.copy_block(old.block_id, new.block_id)
        self.blocks[index] = new
        self.pool.block_pool.free([old])
        # The copy is a new, unpublished block: hashes from this block on must be recomputed.
        del self.block_hashes[index:]
        self._blocks_changed()
        self.pool.stats["cow_copies"] += 1

    def note_written(self, layer: int, upto: int) -> None:
        before = self.num_tokens
        self.written[layer] = upto
        if self.num_tokens > before:
            self._publish_full_blocks()

    def append_token_ids(self, token_ids: Seq[int]) -> None:
        """Record ids of tokens fed after creation (e.g. generated ones) so their blocks can be
        published for sharing."""
        self.token_ids.extend(int(t) for t in token_ids)
        self._publish_full_blocks()

    def _publish_full_blocks(self) -> None:
        bs = self.block_size
        full = min(self.num_tokens, len(self.token_ids)) // bs
        parent = self.block_hashes[-1] if self.block_hashes else self.pool.namespace.root_hash()
        for i in range(len(self.block_hashes), full):
            parent = hash_block_tokens(parent, self.token_ids[i * bs : (i + 1) * bs])
            self.block_hashes.append(parent)
            self.pool.block_pool.cache_block(self.blocks[i], parent)
            self._write_memo = None  # a published block is copied before its next write

    # -- sharing and lifetime --------------------------------------------------------------
    def fork(self) -> "Sequence":
        """A new sequence sharing every block (even the partial last one; copy-on-write)."""
        self._check_live()
        self._write_memo = None  # shared blocks are copied before their next write
        for block in self.blocks:
            self.pool.block_pool.incref(block)
        child = Sequence(self.pool, self.token_ids, self.blocks, self.block_hashes)
        child.num_cached_tokens = self.num_tokens
        child.written = [self.num_tokens] * self.pool.num_layers
        return child

    def trim(self, layer: int, upto: int) -> None:
        """A layer dropped tokens beyond ``upto``; blocks no layer still uses are released."""
        self.written[layer] = min(self.written[layer], upto)
        keep_tokens = max(self.written)
        keep_blocks = -(-keep_tokens // self.block_size)
        if keep_blocks < len(self.blocks):
            dropped = self.blocks[keep_blocks:]
            del self.blocks[keep_blocks:]
            self.pool.block_pool.free(reversed(dropped))
            self._blocks_changed()
        full = self.num_tokens // self.block_size
        del self.block_hashes[full:]
        del self.token_ids[keep_tokens:]

    def release(self) -> None:
        """Return every block to the pool (idempotent); cached blocks stay findable."""
        if self.released:
            return
        self.pool.block_pool.free(reversed(self.blocks))
        self.blocks = []
        self._blocks_changed()
        self.released = True

    def _check_live(self) -> None:
        if self.released:
            raise InvalidArgument("sequence was released")


_TABLE_VERSIONS = itertools.count()


@lru_cache(maxsize=1024)
def _tail_info_pair(length: int, old_length: int) -> mx.array:
    pair = padded_array((length, old_length))
    mx.eval(pair)  # evaluated when made: shared by every sequence, thread and stream
    return pair
