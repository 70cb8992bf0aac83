"""The fp16 tail's storage in a layer cache: its own arrays, or its row of a batch's buffers.

A batched GPU step (tqstore.paged.shared_tail) leaves every row's tail in one array per layer
(block-sized rows, zeros past each row's tokens) and each row's cache holding a reference to
its row, so the next batched step of the same rows passes that array on with no op per row.
Everything else reads ``_tail_keys``/``_tail_values`` as before: the properties slice the row
out then (lazily, once) and the cache owns the slice from there on. Invariant: a reference's
token count equals the cache's ``offset - committed`` from the step that made it until the
next update; assigning the tail drops the reference.
"""

from __future__ import annotations

import mlx.core as mx

from tqstore.errors import InvalidArgument
from tqstore.paged.arenas import KV_DTYPE
from tqstore.paged.shared_tail import commit_full_tails


class TailStorage:
    """Mixin of PagedLayerCache: the tail's arrays (None: no tail), owned or shared, and the
    per-row steps of a batched step over shared tails."""

    _shared = None  # (SharedTail, row, tokens) or None
    _last_step = None  # (SharedTail, row) of the last batched step, or None
    _own_tail_keys: mx.array | None = None
    _own_tail_values: mx.array | None = None

    @property
    def _tail_keys(self) -> mx.array | None:
        if self._shared is not None:
            self._unshare()
        return self._own_tail_keys

    @_tail_keys.setter
    def _tail_keys(self, keys: mx.array | None) -> None:
        self._shared = None
        self._own_tail_keys = keys

    @property
    def _tail_values(self) -> mx.array | None:
        if self._shared is not None:
            self._unshare()
        return self._own_tail_values

    @_tail_values.setter
    def _tail_values(self, values: mx.array | None) -> None:
        self._shared = None
        self._own_tail_values = values

    def _unshare(self) -> None:
        shared, row, n = self._shared
        self._shared = None
        self._own_tail_keys = shared.keys[row:row + 1, :, :n]
        self._own_tail_values = shared.values[row:row + 1, :, :n]

    def shared_tail_plan(self) -> int | None:
        """This row's tail length before a batched step's token (0: the token opens its
        tail), or None where the general update must run (module doc of shared_tail)."""
        if not (self.fp16_tail and self.attention_routed and self.committed
                and not self.arena.dense and not self.in_prefill and not self.decode_pending
                and self._pending is None):
            return None
        # commit_point(committed, offset + 1) - committed, inline (per row, layer and step).
        offset, committed, bs = self.offset, self.committed, self.sequence.block_size
        n, floor = offset - committed, offset - offset % bs
        to_commit = floor - committed if floor > committed else 0
        if to_commit == 0 and n < bs:
            return n
        if n and to_commit == n and n == bs:
            return 0
        return None

    def shared_tail_append(self, n_old: int) -> None:
        """Count this step's token (shared_tail.append); a full tail goes to the pages first:
        in one write where it is a row of a batched step's buffers (a batch of one's too),
        else from its own arrays."""
        if n_old == 0 and self.offset > self.committed:
            commit_full_tails([self], (0,))
        if n_old == 0 and self.offset > self.committed:
            self._commit(self.committed, self._tail_keys, self._tail_values)
            self._tail_keys = self._tail_values = None
        self.offset += 1
        self.decode_pending = True

    def tail_committed_by_batch(self) -> None:
        """Its full tail block was quantized into its page straight from a shared tail buffer
        (shared_tail.commit_full_tails: one write for the rows of that buffer, a sequence alone
        included): count it as _commit does."""
        self.committed = self.offset
        self._tail_keys = self._tail_values = None
        self.sequence.note_written(self.layer, self.committed)

    def shared_tail_ref(self):
        """(SharedTail, row, tokens) this row's tail lives in, or None (own arrays or none)."""
        return self._shared

    def tail_buffer(self, n_old: int) -> tuple[mx.array, mx.array]:
        """This row's tail (n_old tokens) as block-sized buffers (1, Hkv, block_size, D),
        zeros after its tokens: a row of a batch's tails gathered anew."""
        if n_old == 0:
            return self.empty_tails(1)
        bs = self.sequence.block_size
        if self._tail_keys is None or self._tail_keys.shape[2] != n_old:
            # A token counted in offset but never appended (a step updated, not attended).
            raise InvalidArgument(f"layer {self.layer}: the tail holds "
                                  f"{0 if self._tail_keys is None else self._tail_keys.shape[2]} "
                                  f"tokens, the step expects {n_old}")
        pad = [(0, 0), (0, 0), (0, bs - n_old), (0, 0)]
        return (mx.pad(self._tail_keys.astype(KV_DTYPE), pad),
                mx.pad(self._tail_values.astype(KV_DTYPE), pad))

    def empty_tails(self, rows: int) -> tuple[mx.array, mx.array]:
        """Block-sized tail buffers (rows, Hkv, block_size, D) of zeros for this layer."""
        bs, pool = self.sequence.block_size, self.sequence.pool
        return (mx.zeros((rows, pool.num_kv_heads, bs, pool.key_head_dim), KV_DTYPE),
                mx.zeros((rows, pool.num_kv_heads, bs, pool.value_head_dim), KV_DTYPE))

    def take_shared_tail(self, shared, row: int) -> None:
        """After a batched step: this row's tail is row ``row`` of ``shared``."""
        self._own_tail_keys = self._own_tail_values = None
        self._shared = (shared, row, self.offset - self.committed)
        self._last_step = (shared, row)
        self.decode_pending = False

    def last_shared_step(self):
        """(SharedTail, row, whether the tail is still that buffer's row) of this row's last
        batched step, kept after its tail left the buffer (a commit, a step alone, a trim):
        shared_tail.old_tails reuses its counters. None before any batched step."""
        last = self._last_step
        return None if last is None else (last[0], last[1], self._shared is not None)

    def tail_nbytes(self) -> int:
        """Bytes of this row's tail tokens (of a shared buffer: its tokens' share, no slice).
        A shared buffer allocates a whole block per row and layer: at most block_size - 1
        tokens more than counted here (the fp16 tail's bound, one block, either way)."""
        if self._shared is not None:
            shared, _, n = self._shared
            per_token = (shared.keys.nbytes + shared.values.nbytes) // (
                shared.keys.shape[0] * shared.keys.shape[2])
            return n * per_token
        if self._own_tail_keys is None:
            return 0
        return self._own_tail_keys.nbytes + self._own_tail_values.nbytes

    def tail_state(self) -> list[mx.array]:
        """The arrays an evaluation of this cache's state must include for its tail (a
        shared buffer whole: slicing each row per step would cost an op per row)."""
        if self._shared is not None:
            return [self._shared[0].keys, self._shared[0].values]
        if self._own_tail_keys is None:
            return []
        return [self._own_tail_keys, self._own_tail_values]
