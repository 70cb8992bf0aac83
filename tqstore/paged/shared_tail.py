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

import threading
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

    __slots__ = ("keys", "values", "arrivals", "edge")

    def __init__(self, keys: mx.array, values: mx.array, arrivals: mx.array,
                 edge: mx.array) -> None:
        self.keys, self.values = keys, values
        # The step kernel's split-K arrival counters (B * Hkv int32), zero between steps: each
        # launch counts on them and its merging threadgroups zero them again
        # (tqstore.metal.step_launch). Used by the next batched step of exactly these rows in
        # this order only (old_tails), which passes ``edge`` to its step kernel as an unread
        # input: ``edge`` is computed after every launch that has counted on these counters
        # (this step's tail keys, the epilogue's output, where the step kernel ran; else the
        # edge this step was given), so MLX orders the next launch after them: two launches
        # never overlap on the counters.
        self.arrivals, self.edge = arrivals, edge


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
    array (81-110 us a call on an H100's host under cProfile: tools/step_host_cost.py --real).
    Evaluated when made: a cached array is shared by every thread and stream."""
    return _tail_info(tuple(lengths))


@lru_cache(maxsize=256)
def _tail_info(lengths: tuple[int, ...]) -> mx.array:
    info = padded_array([x for n in lengths for x in (n + 1, n)]).reshape(len(lengths), 2)
    mx.eval(info)
    return info


_RECENT_INDEX = threading.local()  # per thread: a lazy array is never shared across threads


def index_array(values: tuple[int, ...]) -> mx.array:
    """int32 ``values`` as an array, kept by value (up to 16 per thread): commit_full_tails'
    block ids and the rows' places in the shared tails are the same for every layer of a step
    (a sequence's block table serves every layer), so a block-opening step makes them once,
    not once per layer (2 host arrays per layer, 51 us each on an H100's host under cProfile:
    docs/BENCHMARKS.md, twenty-first session).
    Not evaluated here: fewer than 4 values are a prefix view of their padded buffer
    (tqstore.small_arrays), and evaluating that when made waited for the GPU's queue, on the
    CPU stream too (4 ms of a B=1 step on an H100 under cProfile); the step that first uses
    it evaluates it, as it does its sequence lengths. Per thread, so two threads' graphs
    never share an unevaluated array."""
    recent = getattr(_RECENT_INDEX, "arrays", None)
    if recent is None:
        recent = _RECENT_INDEX.arrays = {}
    arr = recent.get(values)
    if arr is None:
        if len(recent) >= 16:
            recent.clear()
        arr = recent[values] = padded_array(list(values))
    return arr


def old_tails(caches: Seq[PagedLayerCache], lengths: list[int]
              ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """The rows' tails before this step as block-sized buffers (B, Hkv, block_size, D), the
    step's arrival counters and its ``after`` array (SharedTail.edge: computed after every
    earlier launch on these counters).
    - When every row was row b of the previous batched step of these rows (_previous_step),
      its counters and edge; and its tail buffers as they are (no op) when every row with a
      tail still refers to them. So a step whose every row opens a block makes no host array.
    - Else the tails gathered row by row and new zero counters: a batch that changed, a row
      that joined (also one whose tail is empty: two batches may not share counters)."""
    previous, intact = _previous_step(caches, lengths)
    if intact:
        return previous.keys, previous.values, previous.arrivals, previous.edge
    if previous is not None:
        arrivals, after = previous.arrivals, previous.edge
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


def _previous_step(caches: Seq[PagedLayerCache], lengths: list[int]
                   ) -> tuple[SharedTail | None, bool]:
    """(The shared tails of the last batched step of exactly these rows in this order, or
    None; whether every row with a tail still holds it there). A row's tail may have left its
    buffer since (a block opened, a step alone, a trim): the caller then uses only the
    counters (zero after that step) and the edge. One pass, one call per row: this runs per
    layer and step."""
    shared, intact = None, True
    for row, (cache, n_old) in enumerate(zip(caches, lengths)):
        last = cache.last_shared_step()
        if last is None or last[1] != row or (shared is not None and last[0] is not shared):
            return None, False
        shared = last[0]
        intact = intact and (n_old == 0 or last[2])
    if shared is None or shared.keys.shape[0] != len(caches):
        return None, False
    return shared, intact


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
    counted = launch is not None and launch.counts_arrivals
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
    # The epilogue's output follows this step's kernel; without one, the edge carries over.
    shared = SharedTail(next_keys, next_values, arrivals, next_keys if counted else after)
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


def commit_full_tails(caches: Seq[PagedLayerCache], lengths: Seq[int]) -> None:
    """Rows whose token opens a new block commit their full tail first: the rows whose tails
    are rows of one buffer (a batched step's, also a batch of one's) all together, in one
    quantization per page pair (the gather and the centering inside it on a GPU) and one
    scatter per page array (TurboQuantArena.write_blocks), not a chain of gathers, casts,
    transposes and scatters per row (codes are per vector: the same bytes); one such write per
    buffer. Rows it leaves (own arrays, not whole blocks) keep committed < offset:
    shared_tail_append commits them from their own arrays."""
    bs = caches[0].sequence.block_size
    groups: dict[int, tuple[SharedTail, list[tuple[PagedLayerCache, int]]]] = {}
    for cache, n in zip(caches, lengths):
        ref = cache.shared_tail_ref() if n == 0 and cache.offset > cache.committed else None
        if ref is not None and ref[2] == bs:
            groups.setdefault(id(ref[0]), (ref[0], []))[1].append((cache, ref[1]))
    for shared, rows in groups.values():
        ids = []
        for cache, _ in rows:
            _, slots = cache.sequence.prepare_write(cache.committed, bs)
            if slots is not None:
                break  # not whole blocks (nothing written yet): each row commits its own
            ids.append(cache.sequence.blocks[cache.committed // bs].block_id)
        else:
            rows[0][0].arena.write_blocks(index_array(tuple(ids)), shared.keys, shared.values,
                                          index_array(tuple(row for _, row in rows)))
            for cache, _ in rows:
                cache.tail_committed_by_batch()
