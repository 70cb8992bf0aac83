"""Several sequences in one decode step: a batch is the join of their layer caches, no copy.

mlx-lm's model code runs a step of B sequences as one forward pass over (B, 1) tokens; every
projection and MLP is one batched matmul. ``BatchedLayerCache`` is what one layer sees then: it
holds each sequence's own ``PagedLayerCache`` (its block table, its fp16 tail, its pending
write), hands RoPE the per-sequence positions as an array (as mlx-lm's BatchKVCache does), writes
each row's new token into its own sequence, and attends each row over its own pages: on the CPU
in one C call whose rows are bit for bit each sequence's step alone (fused_batch_step); on a GPU
in one attention launch for all rows (below); elsewhere row by row through the same
``PagedLayerCache.attend`` a single sequence uses.

Joining and leaving cost nothing: a batch is rebuilt from the live sequences' caches before every
step (``batch_caches``), so a request that arrives joins the next step and one that finishes or
is cancelled leaves it, its pages returned to the pool at once.

On a GPU (and wherever the C step does not serve) a layer's step is a fixed number of launches
whatever B is (tqstore.paged.shared_tail): the batch's tokens converted once, one query
preparation, one attention kernel over every row's block table (padded to the widest, each row
read up to its own length), and one epilogue kernel that merges every row with its fp16 tail
and appends its token, the rows' tails held in one array per layer. Row by row, a step of B
sequences cost B launch chains and B times the Python that builds them per layer. On a GPU a
row's bits in a batch are not those of the row alone anyway (fp32 matmuls of B rows run on TF32
tensor cores, tests/tolerance.py); on the CPU the C step keeps them exact (fused_batch_step).
Rows in an unusual state for one step (see shared_tail) take ``gpu_batch_step``: the pages in
one launch, then each row's own epilogue.

Only single-token steps are batched; prefill chunks run per sequence (their exactness rests on
per-sequence chunk shapes: tqstore.generator.prefill_bounds).
"""

from __future__ import annotations

from typing import Any, Sequence as Seq

import mlx.core as mx
import numpy as np

from tqstore.errors import InvalidArgument
from tqstore.metal.dispatch import (fused_decode_step_possible, fused_decode_step_rows,
                                    gpu_kernels_possible, paged_decode_attention)
from tqstore.paged import shared_tail
from tqstore.paged.arenas import KV_DTYPE
from tqstore.paged.cache import PagedLayerCache, prepare_queries
from tqstore.small_arrays import padded_array

# How a batch's rows share a step off the C path (benchmarks' A/B): "shared" (the default: one
# epilogue launch per layer over the rows' shared tails), "pages" (one attention launch for
# the rows' pages, then each row's epilogue: gpu_batch_step) or "rows" (each row alone).
BATCH_MODE = "shared"


class StepTables:
    """The block tables and lengths of a batch, (B, widest table) and (B,) int32, built once
    and shared by its layers and steps (every layer of a sequence attends the same blocks; a
    table that changes, a new block or a copy-on-write, is seen by the sequence's
    ``table_version``, never by a table array of its own: making B of those at every block
    opening cost 4 ms of an H100 host's step at B=8). Layers whose lengths differ within a
    step (a sliding window's commit schedule) each keep an entry."""

    ENTRIES = 4

    def __init__(self) -> None:
        self._entries: dict[tuple[int, ...], tuple[tuple[int, ...], tuple[mx.array, mx.array]]] = {}

    def get(self, caches: Seq[PagedLayerCache]) -> tuple[mx.array, mx.array]:
        versions = tuple(c.sequence.table_version for c in caches)
        lens = tuple(c.committed for c in caches)
        entry = self._entries.get(lens)
        if entry is not None and entry[0] == versions:
            return entry[1]
        ids_per_row = [c.sequence.block_ids or [0] for c in caches]
        host = np.zeros((len(caches), max(len(ids) for ids in ids_per_row)), dtype=np.int32)
        for row, ids in enumerate(ids_per_row):
            host[row, :len(ids)] = ids  # past a row's own blocks: never read (its length)
        # Straight from the host array (a 32 x 2048 table took ~6 ms through a Python list).
        arrays = (padded_array(host.ravel()).reshape(host.shape), padded_array(list(lens)))
        if len(self._entries) >= self.ENTRIES:
            self._entries.clear()
        self._entries[lens] = (versions, arrays)
        return arrays


# Kept from step to step: a batch's tables change only when a row commits a block (every
# block_size steps), and rebuilding a (B, 2048) table cost ~1 ms a step on an H100's host.
_STEP_TABLES = StepTables()


class BatchedLayerCache:
    """One layer of B sequences for one decode step (L == 1); mlx-lm cache protocol."""

    def __init__(self, caches: Seq[PagedLayerCache], offsets: mx.array,
                 tables: StepTables | None = None) -> None:
        self.caches = list(caches)
        self.tables = tables or StepTables()
        # Positions before this step, one per row: RoPE takes an array of offsets per batch row.
        self.offset = offsets
        self.decode_pending = False
        self._dense: list[tuple[mx.array, mx.array] | None] = []
        # A shared-tail step's (tail lengths, new keys, new values), from update to attend.
        self._shared: tuple[list[int], mx.array, mx.array] | None = None

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        if N != 1:
            raise InvalidArgument("a batched paged step takes one token per sequence")
        return None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if keys.shape[0] != len(self.caches) or keys.shape[2] != 1:
            raise InvalidArgument(f"batched step of {len(self.caches)} sequences got keys "
                                  f"{keys.shape}")
        self._dense = []
        self._shared = None
        if BATCH_MODE == "shared" and not fused_decode_step_possible():
            lengths = shared_tail.plan(self.caches)
            if lengths is not None:
                self._shared = (lengths, *shared_tail.append(self.caches, keys, values, lengths))
                self.decode_pending = True
                return keys, values
        new_keys, new_values = keys, values
        if all(c.fp16_tail and not c.arena.dense and not c.prefill_step(1)
               for c in self.caches):
            # Each row's decode update converts its token to the tail's fp16 first (the same
            # values): once for the batch instead of two conversion kernels per row and layer.
            # Not for a row still in a prefill step: its dense view must keep the model's dtype.
            new_keys, new_values = keys.astype(KV_DTYPE), values.astype(KV_DTYPE)
        for row, cache in enumerate(self.caches):
            k, v = cache.update_and_fetch(new_keys[row:row + 1], new_values[row:row + 1],
                                          alone=False)
            # Rows whose layer stays fp16 (or whose cache is not routed) attend the dense view.
            self._dense.append(None if cache.decode_pending else (k, v))
        self.decode_pending = True
        return keys, values

    def attend(self, queries: mx.array, scale: float, mask: Any = None) -> mx.array:
        """(B, Hq, 1, D) queries -> (B, Hq, 1, Dv): each row over its own sequence (on the
        CPU all rows in one C call, the same per-row arithmetic)."""
        self.decode_pending = False
        if self._shared is not None:
            lengths, new_keys, new_values = self._shared
            self._shared = None
            tables, lens = self.tables.get(self.caches)
            return shared_tail.shared_tail_attend(
                self.caches, queries, scale, tables, lens, lengths,
                shared_tail.tail_info(lengths), new_keys, new_values)
        if all(dense is None for dense in self._dense):
            out = fused_batch_step(self.caches, queries, scale)
            if out is None:
                out = gpu_batch_step(self.caches, queries, scale, self.tables)
            if out is not None:
                self._dense = []
                return out
        rows = []
        for row, (cache, dense) in enumerate(zip(self.caches, self._dense)):
            q = queries[row:row + 1]
            if dense is None:
                rows.append(cache.attend(q, scale))
            else:
                k, v = dense
                rows.append(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale))
        self._dense = []
        return mx.concatenate(rows, axis=0)

    @property
    def state(self) -> list[mx.array]:
        return [a for cache in self.caches for a in cache.state]

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for cache in self.caches)


def gpu_batch_step(caches: Seq[PagedLayerCache], queries: mx.array, scale: float,
                   tables: StepTables) -> mx.array | None:
    """One layer's decode attention for a batch on a GPU (every row routed and with a committed
    page): queries (B, Hq, 1, Dk) -> (B, Hq, 1, Dv). The pages of all rows in one kernel launch,
    then each row's epilogue (PagedLayerCache.finish_pages). None (nothing touched) where it
    does not serve: the CPU (fused_batch_step keeps rows exact there), rows in more than one
    pool, a row without pages yet."""
    if not (BATCH_MODE != "rows" and len(caches) > 1 and gpu_kernels_possible()
            and all(c.committed for c in caches)):
        return None
    arena = caches[0].arena
    if any(c.arena is not arena for c in caches):
        return None
    kc, vc = arena.key_codec, arena.value_codec
    q, q_rot = prepare_queries(queries[:, :, 0, :], arena.query_rotation, scale)
    block_tables, seq_lens = tables.get(caches)
    pages_out, lse = paged_decode_attention(
        q_rot, arena.key_codes, arena.key_scales, arena.value_codes, arena.value_scales,
        block_tables, seq_lens, kc.codebook, vc.codebook, kc.bits, vc.bits, return_lse=True)
    rows = [cache.finish_pages(pages_out[b:b + 1], lse[b:b + 1], q[b:b + 1], queries.dtype)
            for b, cache in enumerate(caches)]
    return mx.concatenate(rows, axis=0)


def fused_batch_step(caches: Seq[PagedLayerCache], queries: mx.array,
                     scale: float) -> mx.array | None:
    """One layer's decode attention for a batch of sequences (one routed token each, every
    one with a committed page) in one C call where the CPU's fused step serves: queries
    (B, Hq, 1, Dk) -> (B, Hq, 1, Dv), row b bit for bit what caches[b].attend gives alone.
    None (nothing touched) where it does not serve: the caller attends row by row."""
    if not (fused_decode_step_possible() and all(c.committed for c in caches)):
        return None
    arena = caches[0].arena  # one pool: every sequence's layer lives in the same arenas
    if any(c.arena is not arena for c in caches):
        return None
    kc, vc = arena.key_codec, arena.value_codec
    rows = [c.fused_step_row() for c in caches]
    out = fused_decode_step_rows(
        queries[:, :, 0, :], scale, arena.query_rotation, arena.key_codes, arena.key_scales,
        arena.value_codes, arena.value_scales, rows, kc.codebook, vc.codebook,
        arena.key_center, arena.output_rotation, kc.bits, vc.bits)
    if out is None:
        return None  # rows flushed their pending tokens: attend() takes them as they are
    B, Hq = queries.shape[:2]
    return out.reshape(B, Hq, 1, vc.head_dim).astype(queries.dtype)


def batch_caches(sequences: Seq[Seq[PagedLayerCache]]) -> list[BatchedLayerCache]:
    """Per-layer batched caches over B sequences' layer caches (``sequences[b][layer]``)."""
    if not sequences:
        raise InvalidArgument("an empty batch")
    num_layers = len(sequences[0])
    if any(len(s) != num_layers for s in sequences):
        raise InvalidArgument("sequences of one batch must come from one model")
    # Every layer of a sequence is at the same position between steps.
    offsets = mx.array([s[0].offset for s in sequences], dtype=mx.int32)
    tables = _STEP_TABLES
    return [BatchedLayerCache([s[layer] for s in sequences], offsets, tables)
            for layer in range(num_layers)]
