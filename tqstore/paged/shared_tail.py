"""A batch's fp16 tails of one layer in ONE array: a batched decode step on a GPU costs one
append and one epilogue launch per layer, whatever the batch size.

Why: a batched step used to pay, per row and layer, its token's slice into its own tail, its own
epilogue launch (un-rotation, merge with its tail, the append) and a slice of the result. On an
H100 that was 18-21 ms of graph building per step at B=8 against fp16's 2.8-3.9 ms
(docs/BENCHMARKS.md, "Batched decode on a GPU"): a GPU decode step is bound by the host's
per-op cost, not by bytes. The rows' tails differ in length (each sequence is at its own
position in its block), so they could not share an array of the tail's own shape.

Layout: ``SharedTail`` holds the batch's tails as block-sized buffers (B, Hkv, block_size, D)
fp16, row b valid in [0, n_b) and zeros after (tqstore.metal.epilogue's per-row form writes
them). After a batched step each row's ``PagedLayerCache`` refers to its row of the step's
output instead of owning arrays (``PagedLayerCache.take_shared_tail``); a path that reads one
row's tail (a step of that sequence alone, a trim, the CPU's C step) slices it out then. The
next batched step of the same rows in the same order passes the previous step's buffers to the
kernel as they are: no op per row. Only when the batch changes (a request joins or leaves,
rows reorder) are the rows' tails gathered into a new buffer (a few ops per row, once).

Per row, the step follows the commit rule of tqstore.paged.tail exactly as a step alone does:
the token joins its tail block, or, when it opens a new block, the full old tail is quantized
into the pages first (the same bytes from the same fp16 values) and the token starts the tail.
Rows in any other state (a prefill step, no committed page yet, a trimmed cache whose codes
end mid-block, a model whose attention is not routed) send the whole batch down the general
per-row path for that step.

A sequence decoding alone takes the same step as a batch of one (PagedLayerCache, with
tqstore.paged.cache.SHARED_STEP_ALONE, on by default).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Sequence as Seq

import mlx.core as mx

from tqstore.metal.dispatch import (batched_decode_epilogue, paged_decode_attention,
                                    rotate_queries)
from tqstore.metal.step_launch import batch_step_launch
from tqstore.small_arrays import padded_array

if TYPE_CHECKING:  # the caches import this module (a sequence alone steps as a batch of one)
    from tqstore.paged.cache import PagedLayerCache


class SharedTail:
    """The fp16 tails of a batch's rows for one layer: keys (B, Hkv, block_size, Dk), values
    (B, Hkv, block_size, Dv); row b holds its sequence's tail tokens first, zeros after."""

    __slots__ = ("keys", "values", "arrivals")

    def __init__(self, keys: mx.array, values: mx.array, arrivals: mx.array) -> None:
        self.keys, self.values = keys, values
        # The step kernel's split-K arrival counters (B * Hkv int32), zero between steps: each
        # launch counts on them and its merging threadgroups zero them again
        # (tqstore.metal.step_launch). Used by this layer's next step of the same rows only,
        # whose step kernel also reads these keys (an unread input): MLX then orders it after
        # the epilogue that wrote them, so two launches never overlap on the counters.
        self.arrivals = arrivals


def plan(caches: Seq[PagedLayerCache]) -> list[int] | None:
    """Each row's tail length before this step's token (0: the token opens the tail), or None
    where some row needs the general per-row path (see the module doc). Touches nothing."""
    if not caches:
        return None
    arena = caches[0].arena
    lengths = []
    for cache in caches:
        if cache.arena is not arena:
            return None
        n_old = cache.shared_tail_plan()
        if n_old is None:
            return None
        lengths.append(n_old)
    return lengths


def tail_info(lengths: Seq[int]) -> mx.array:
    """int32 (B, 2) = [old + 1, old] per row: the per-row epilogue's lengths. Kept by value:
    a batch's rows cycle through at most block_size combinations, so a step makes no host
    array (one cost ~50-100 us of an H100 host's time: tools/step_host_cost.py --real)."""
    return _tail_info(tuple(lengths))


@lru_cache(maxsize=1024)
def _tail_info(lengths: tuple[int, ...]) -> mx.array:
    return padded_array([x for n in lengths for x in (n + 1, n)]).reshape(len(lengths), 2)


def old_tails(caches: Seq[PagedLayerCache], lengths: list[int]
              ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """The rows' tails before this step as block-sized buffers (B, Hkv, block_size, D), the
    step's arrival counters and its ``after`` array (step_launch: an array the previous
    launch on these counters is ordered before). The tails are the previous batched step's
    own when every row with a tail is its row b there, in order (no op); else gathered row by
    row. The counters are the previous step's when the rows are all its rows in order (with
    its tail keys as ``after``: that step's epilogue wrote them, after its step kernel), so a
    step whose every row opens a block makes no host array; else new zeros."""
    common = None
    for row, (cache, n_old) in enumerate(zip(caches, lengths)):
        if n_old == 0:
            continue  # an empty tail: the buffer's contents are never read
        ref = cache.shared_tail_ref()
        if ref is None or ref[1] != row or (common is not None and ref[0] is not common):
            common = None
            break
        common = ref[0]
    if common is not None and common.keys.shape[0] == len(caches):
        return common.keys, common.values, common.arrivals, common.keys
    previous = _previous_step(caches)
    if previous is not None:
        arrivals, after = previous.arrivals, previous.keys
    else:
        # Host zeros of at least 16 bytes: never MLX's small managed pool, where the kernel's
        # atomics would fault pages in at every step (tqstore.small_arrays).
        arrivals = padded_array([0] * (len(caches) * caches[0].arena.key_codes.shape[1]))
        after = None
    if not any(lengths):  # every token opens its tail (rows in step): one empty buffer
        keys, values = caches[0].empty_tails(len(caches))
    else:
        rows = [cache.tail_buffer(n_old) for cache, n_old in zip(caches, lengths)]
        keys = mx.concatenate([k for k, _ in rows])
        values = mx.concatenate([v for _, v in rows])
    return keys, values, arrivals, keys if after is None else after


def _previous_step(caches: Seq[PagedLayerCache]) -> SharedTail | None:
    """The shared tails of the last batched step of exactly these rows in this order, or None.
    Its tails may have gone to the pages since (a block opened) or to a step alone: only its
    counters (zero after it) and its keys (the data edge) are used."""
    first = caches[0].last_shared_step()
    if first is None or first[0].keys.shape[0] != len(caches):
        return None
    shared = first[0]
    for row, cache in enumerate(caches):
        last = cache.last_shared_step()
        if last is None or last[0] is not shared or last[1] != row:
            return None
    return shared


def shared_tail_attend(caches: Seq[PagedLayerCache], queries: mx.array, scale: float,
                       block_tables: mx.array, seq_lens: mx.array, lengths: list[int],
                       info: mx.array, new_keys: mx.array, new_values: mx.array) -> mx.array:
    """One layer's decode attention for the batch after ``append`` (queries (B, Hq, 1, Dk) ->
    (B, Hq, 1, Dv) in their dtype): the rows' pages in one attention launch, then one epilogue
    launch that merges every row with its tail and appends its token (new_keys/values: the
    step's tokens in the model's dtype); each row then refers to its row of the new tails."""
    arena = caches[0].arena
    tail_keys, tail_values, arrivals, after = old_tails(caches, lengths)
    block_size = caches[0].sequence.block_size
    # On a GPU (tqstore.metal.step_launch): the queries' scale and rotation with the pages in
    # one launch (the output left packed in its work buffer) where the tensor-core kernel fits,
    # else in two; then the epilogue for every row; resolved once per shape. Elsewhere through
    # dispatch one by one (tqstore.metal.batch_step's kernels or their references).
    launch = batch_step_launch(queries, arena, block_tables, block_size)
    if launch is not None:
        out, next_keys, next_values = launch(queries, scale, arena, block_tables, seq_lens,
                                             tail_keys, tail_values, new_keys, new_values, info,
                                             arrivals, after)
    else:
        kc, vc = arena.key_codec, arena.value_codec
        q_rot = rotate_queries(queries, arena.query_rotation, scale)
        pages_out, lse = paged_decode_attention(
            q_rot, arena.key_codes, arena.key_scales, arena.value_codes, arena.value_scales,
            block_tables, seq_lens, kc.codebook, vc.codebook, kc.bits, vc.bits,
            return_lse=True, packed=True)
        out, next_keys, next_values = batched_decode_epilogue(
            pages_out, lse, queries, scale, tail_keys, tail_values, new_keys, new_values, info,
            arena.key_center, arena.output_rotation, block_size)
    shared = SharedTail(next_keys, next_values, arrivals)
    for row, cache in enumerate(caches):
        cache.take_shared_tail(shared, row)
    return out


def append(caches: Seq[PagedLayerCache], keys: mx.array, values: mx.array,
           lengths: list[int]) -> tuple[mx.array, mx.array]:
    """This step's token of every row (keys/values (B, Hkv, 1, D)): counted, with full tails
    committed to the pages where the token opens a block. Returns the tokens as they are: the
    epilogue converts them to fp16 as it appends them (no op of their own)."""
    if 0 in lengths:  # some row's token opens a block (one step in block_size)
        commit_full_tails(caches, lengths)
    for cache, n_old in zip(caches, lengths):
        cache.shared_tail_append(n_old)
    return keys, values


def commit_full_tails(caches: Seq[PagedLayerCache], lengths: list[int]) -> None:
    """Rows whose token opens a new block commit their full tail first. Where several do in
    one step (sequences at the same position in their blocks: a batch that started together)
    and their tails are rows of one buffer, all of them in one gather, one quantization and
    one write per page array, not a chain of ops per row (codes are per vector: the same
    bytes). Others are left to each row's own commit (shared_tail_append)."""
    rows = [(b, c) for b, (c, n) in enumerate(zip(caches, lengths))
            if n == 0 and c.offset > c.committed]
    refs = [c.shared_tail_ref() for _, c in rows]
    bs = caches[0].sequence.block_size
    if len(rows) < 2 or any(r is None or r[0] is not refs[0][0] or r[2] != bs for r in refs):
        return
    ids = []
    for _, cache in rows:
        block_ids, slots = cache.sequence.prepare_write(cache.committed, bs)
        if slots is not None:
            return  # not whole blocks (nothing written yet): each row commits its own
        ids.append(cache.sequence.blocks[cache.committed // bs].block_id)
    shared, where = refs[0][0], padded_array([r[1] for r in refs])

    def tokens(buffer: mx.array) -> mx.array:  # (R, Hkv, bs, D) -> (Hkv, R * bs, D)
        picked = mx.swapaxes(buffer[where], 0, 1)
        return picked.reshape(picked.shape[0], -1, picked.shape[-1])

    caches[0].arena.write(padded_array(ids), None, tokens(shared.keys), tokens(shared.values))
    for _, cache in rows:
        cache.tail_committed_by_batch()
