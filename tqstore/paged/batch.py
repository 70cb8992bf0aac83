"""Several sequences in one decode step: a batch is the join of their layer caches, no copy.

mlx-lm's model code runs a step of B sequences as one forward pass over (B, 1) tokens; every
projection and MLP is one batched matmul. ``BatchedLayerCache`` is what one layer sees then: it
holds each sequence's own ``PagedLayerCache`` (its block table, its fp16 tail, its pending
write), hands RoPE the per-sequence positions as an array (as mlx-lm's BatchKVCache does), writes
each row's new token into its own sequence, and attends each row over its own pages through the
same ``PagedLayerCache.attend`` a single sequence uses (so a batched step computes, row by row,
the operations a step of that sequence alone computes; on GPUs those are the kernels).

Joining and leaving cost nothing: a batch is rebuilt from the live sequences' caches before every
step (``batch_caches``), so a request that arrives joins the next step and one that finishes or
is cancelled leaves it, its pages returned to the pool at once.

Only single-token steps are batched; prefill chunks run per sequence (their exactness rests on
per-sequence chunk shapes: tqstore.generator.prefill_bounds).
"""

from __future__ import annotations

from typing import Any, Sequence as Seq

import mlx.core as mx

from tqstore.errors import InvalidArgument
from tqstore.paged.cache import PagedLayerCache, fused_batch_step


class BatchedLayerCache:
    """One layer of B sequences for one decode step (L == 1); mlx-lm cache protocol."""

    def __init__(self, caches: Seq[PagedLayerCache], offsets: mx.array) -> None:
        self.caches = list(caches)
        # Positions before this step, one per row: RoPE takes an array of offsets per batch row.
        self.offset = offsets
        self.decode_pending = False
        self._dense: list[tuple[mx.array, mx.array] | None] = []

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        if N != 1:
            raise InvalidArgument("a batched paged step takes one token per sequence")
        return None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if keys.shape[0] != len(self.caches) or keys.shape[2] != 1:
            raise InvalidArgument(f"batched step of {len(self.caches)} sequences got keys "
                                  f"{keys.shape}")
        self._dense = []
        for row, cache in enumerate(self.caches):
            k, v = cache.update_and_fetch(keys[row:row + 1], values[row:row + 1])
            # Rows whose layer stays fp16 (or whose cache is not routed) attend the dense view.
            self._dense.append(None if cache.decode_pending else (k, v))
        self.decode_pending = True
        return keys, values

    def attend(self, queries: mx.array, scale: float, mask: Any = None) -> mx.array:
        """(B, Hq, 1, D) queries -> (B, Hq, 1, Dv): each row over its own sequence (on the
        CPU all rows in one C call, the same per-row arithmetic)."""
        self.decode_pending = False
        if all(dense is None for dense in self._dense):
            out = fused_batch_step(self.caches, queries, scale)
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


def batch_caches(sequences: Seq[Seq[PagedLayerCache]]) -> list[BatchedLayerCache]:
    """Per-layer batched caches over B sequences' layer caches (``sequences[b][layer]``)."""
    if not sequences:
        raise InvalidArgument("an empty batch")
    num_layers = len(sequences[0])
    if any(len(s) != num_layers for s in sequences):
        raise InvalidArgument("sequences of one batch must come from one model")
    # Every layer of a sequence is at the same position between steps.
    offsets = mx.array([s[0].offset for s in sequences], dtype=mx.int32)
    return [BatchedLayerCache([s[layer] for s in sequences], offsets)
            for layer in range(num_layers)]
