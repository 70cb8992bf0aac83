"""A prefill chunk and the running decode steps in ONE forward pass (a mixed step).

Why: on a CPU a decode step of B sequences costs about as much reading the weights as it does
attending, and a prefill chunk of one arriving request stalls every running stream for as long
as it runs (seconds on SmolLM2 for 256 tokens; the serving bench's 8 agents spent about a
third of their decode time waiting on such chunks). Carried in the chunk's forward pass, the B
decode rows add B rows to matmuls of T rows (a few percent) instead of a step of their own,
and the running streams get a token per chunk instead of none.

Measured (docs/BENCHMARKS.md): on the 2-core CPU VM it does not pay. A decode row's cost there
is mostly its attention over its own pages, which a mixed step still pays, so a mixed step
cost about the chunk plus a whole decode step, and 8 agents' later turns got slower. Off by
default (ServingConfig.mixed_steps); where weights dominate a step (a GPU's small batches), it
is the candidate to measure.

Layout: mlx-lm's model code sees (T + B, 1) tokens: the chunk's T tokens as T rows of one token,
then the B decode rows. Every projection and MLP is then one matmul of T + B rows; RoPE takes
one position per row (the array offset ``BatchedLayerCache`` already hands it). Per layer,
``MixedLayerCache`` turns the chunk's rows back into the (1, H, T, D) step its own cache would
have seen alone (same update_and_fetch, same mask from its make_mask, same attention path) and
attends the decode rows as a ``BatchedLayerCache`` does.

Exactness: a chunk's K/V go to the daemon, and a later hit must reproduce them bit for bit
(tqstore.generator.prefill_bounds). Attention sees the chunk in exactly its alone shape, so the
chunk's rows are equal to a chunk alone iff each matmul row and RoPE row does not depend on how
many rows share the call. That is a property of the backend's kernels (this VM's OpenBLAS: true
from 10 rows on; CUDA's tiled GEMMs choose tiles by row count), so ``exact_rows`` checks it once
per model on the model's own layers, and the engine mixes exact requests' chunks only where it
holds (requests that start from pool pages are never exact and always may mix).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence as Seq

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import scaled_dot_product_attention as stock_attention

from tqstore.errors import InvalidArgument
from tqstore.metal import dispatch as kernels
from tqstore.paged.batch import BatchedLayerCache, batch_caches
from tqstore.paged.cache import PagedLayerCache

log = logging.getLogger("tqstore.serving")

# Chunks shorter than this run alone: small matmuls take other kernel paths (on this VM's
# OpenBLAS rows differ below 10), and a short chunk stalls the streams only briefly anyway.
MIN_MIXED_CHUNK = 16


class MixedLayerCache:
    """One layer of a mixed step: one sequence's chunk of T tokens, then B decode rows."""

    def __init__(self, prefill: PagedLayerCache, decode: BatchedLayerCache, chunk: int,
                 mask: Any, offsets: mx.array) -> None:
        self.prefill, self.decode, self.chunk, self.mask = prefill, decode, chunk, mask
        self.offset = offsets  # one position per row: the chunk's, then each decode row's
        self.decode_pending = False
        self._prefill_kv: tuple[mx.array, mx.array] | None = None

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        if N != 1 or window_size is not None:
            raise InvalidArgument("a mixed step takes one token per row and no sliding window")
        return None

    @staticmethod
    def _as_chunk(rows: mx.array) -> mx.array:
        return rows.transpose(2, 1, 0, 3)  # (T, H, 1, D) <-> (1, H, T, D)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        T = self.chunk
        if keys.shape[2] != 1 or keys.shape[0] != T + len(self.decode.caches):
            raise InvalidArgument(f"mixed step of {T} + {len(self.decode.caches)} rows got keys "
                                  f"{keys.shape}")
        self._prefill_kv = self.prefill.update_and_fetch(self._as_chunk(keys[:T]),
                                                         self._as_chunk(values[:T]))
        self.decode.update_and_fetch(keys[T:], values[T:])
        self.decode_pending = True
        return keys, values

    def attend(self, queries: mx.array, scale: float, mask: Any = None) -> mx.array:
        """(T + B, Hq, 1, D) -> (T + B, Hq, 1, Dv): the chunk as its own step would, then the
        decode rows as a batched step would."""
        self.decode_pending = False
        T = self.chunk
        q = self._as_chunk(queries[:T])
        keys, values = self._prefill_kv
        self._prefill_kv = None
        # What integration.dispatch does for a multi-token step of a PagedLayerCache.
        out = kernels.multi_token_attention(q, keys, values, scale, self.mask)
        if out is None:
            out = stock_attention(q, keys, values, cache=self.prefill, scale=scale,
                                  mask=self.mask)
        return mx.concatenate([self._as_chunk(out), self.decode.attend(queries[T:], scale)],
                              axis=0)

    @property
    def state(self) -> list[mx.array]:
        return self.prefill.state + self.decode.state


def mixed_caches(prefill: Seq[PagedLayerCache], decode: Seq[Seq[PagedLayerCache]],
                 chunk: int) -> list[MixedLayerCache]:
    """Per-layer caches of a mixed step: ``prefill[layer]`` takes the next ``chunk`` tokens,
    each of ``decode[b][layer]`` one token. Built before the step (the chunk's mask is made
    from its caches' state before the chunk, as the model would make it alone)."""
    if not decode or chunk < 2:
        raise InvalidArgument("a mixed step needs decode rows and a chunk of 2 or more tokens")
    batched = batch_caches(decode)
    start = prefill[0].offset
    offsets = mx.concatenate([mx.arange(start, start + chunk, dtype=mx.int32),
                              batched[0].offset])
    # mlx-lm makes one mask from the first layer's cache (create_attention_mask) for all layers.
    mask = prefill[0].make_mask(chunk)
    return [MixedLayerCache(p, b, chunk, mask, offsets) for p, b in zip(prefill, batched)]


def logits_head(model: nn.Module) -> tuple[Callable, Callable] | None:
    """(body, head) with model(x, cache) == head(body(x, cache)) for mlx-lm's common layout
    (a ``model`` body, then tied embeddings or ``lm_head``), so a mixed step projects only the
    rows it samples (T + B rows of a 49k vocabulary would cost more than the step); None for
    other layouts, and for models whose __call__ does more after the head (Granite's
    logits_scaling): the equality is checked on the model, bitwise, on a few tokens."""
    body = getattr(model, "model", None)
    if not callable(body):
        return None
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False):
        embed = getattr(body, "embed_tokens", None)
        split = (body, embed.as_linear) if embed is not None else None
    else:
        head = getattr(model, "lm_head", None)
        split = (body, head) if head is not None else None
    if split is None:
        return None
    tokens = mx.array([[1, 2, 3, 4]])
    return split if mx.array_equal(model(tokens), split[1](split[0](tokens))).item() else None


class MixPolicy:
    """Mixed steps for one model in one engine: which chunks may carry the decode rows, and
    the forward pass that carries them."""

    def __init__(self, model: nn.Module, chunk: int, max_rows: int) -> None:
        self.model, self.chunk, self.max_rows = model, chunk, max_rows
        self.split = logits_head(model)  # None: this model's layout cannot mix
        self._exact: bool | None = None  # checked at the first exact request that could mix

    def allows(self, tokens: int, exact: bool) -> bool:
        """Whether a chunk of `tokens` may mix. A request that must stay exact (its blocks go
        to the daemon, a hit must match its cold run) needs the backend's rows to be exact; one
        that starts from pool pages never is and may always mix."""
        if self.split is None or tokens < MIN_MIXED_CHUNK:
            return False
        if exact and self._exact is None:
            self._exact = exact_rows(self.model, self.chunk, self.max_rows)
            log.info("mixed steps: %s", "every request" if self._exact else
                     "requests from pool pages only (this backend's rows are not exact)")
        return not exact or self._exact

    def forward(self, prefill: Seq[PagedLayerCache], chunk_ids: Seq[int],
                decode: Seq[Seq[PagedLayerCache]], tokens: Seq[int],
                last: bool) -> tuple[mx.array, list[MixedLayerCache]]:
        """One forward pass of the chunk and one token per decode row: (logits of the decode
        rows, then of the chunk's last token when `last`; the step's caches)."""
        T = len(chunk_ids)
        caches = mixed_caches(prefill, decode, T)
        body, head = self.split
        hidden = body(mx.array([[t] for t in chunk_ids] + [[t] for t in tokens]),
                      cache=caches)[:, 0, :]  # (T + B, hidden)
        picked = mx.concatenate([hidden[T:], hidden[T - 1:T]]) if last else hidden[T:]
        return head(picked), caches


def _linear_layers(layer: nn.Module) -> list[nn.Module]:
    return [m for _, m in layer.named_modules()
            if isinstance(m, (nn.Linear, nn.QuantizedLinear))]


def _rows_equal(fn: Callable[[mx.array], mx.array], x: mx.array, T: int) -> bool:
    """fn over T rows alone (one sequence of T tokens) vs the same T rows among len(x) (rows of
    one token each), bitwise."""
    alone = fn(x[None, :T])[0]
    mixed = fn(x[:, None])[:T, 0]
    mx.eval(alone, mixed)
    return bool(mx.array_equal(alone, mixed).item())


def exact_rows(model: nn.Module, chunk: int, max_rows: int) -> bool:
    """Whether a mixed step leaves a chunk's rows bit for bit as a chunk alone on this backend:
    the first layer's linear layers, the logits head and RoPE, for chunks of MIN_MIXED_CHUNK
    to ``chunk`` tokens beside 1 to ``max_rows`` decode rows (random inputs; shapes decide the
    kernels, values do not). Checked once per model; also False for layouts it cannot check."""
    # Kept on the model object (a plain attribute, not a parameter): it lives as long as the
    # model does, where a table keyed by id() could answer for a later model at that address.
    found = getattr(model, "_tqstore_exact_rows", None)
    if found is None:
        found = {}
        object.__setattr__(model, "_tqstore_exact_rows", found)
    if (chunk, max_rows) not in found:
        found[chunk, max_rows] = _check_exact_rows(model, chunk, max_rows)
    return found[chunk, max_rows]


def _check_exact_rows(model: nn.Module, chunk: int, max_rows: int) -> bool:
    split = logits_head(model)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if split is None or not layers:
        return False
    body, head = split
    attention = next((m for _, m in layers[0].named_modules() if hasattr(m, "rope")), None)
    linears = _linear_layers(layers[0])
    if attention is None or not linears:
        return False
    rng = np.random.default_rng(0)
    args = getattr(model, "args", None)
    hidden, heads = getattr(args, "hidden_size", None), getattr(args, "num_attention_heads", None)
    if not hidden or not heads:
        return False
    head_dim = getattr(args, "head_dim", None) or hidden // heads
    dtype = head(body(mx.array([[1]]))).dtype  # the activations' dtype
    # The ends and an odd size between (kernels pick tiles by row count and remainder).
    for T in sorted({MIN_MIXED_CHUNK, max(MIN_MIXED_CHUNK, chunk // 2 + 1),
                     max(MIN_MIXED_CHUNK, chunk)}):
        for B in sorted({1, max(1, max_rows)}):
            for m in linears + [head]:
                if m is head:
                    width = hidden
                elif isinstance(m, nn.QuantizedLinear):
                    width = m.scales.shape[1] * m.group_size
                else:
                    width = m.weight.shape[1]
                x = mx.array(rng.standard_normal((T + B, width)), dtype=dtype)
                if not _rows_equal(m, x, T):
                    return False
            # RoPE: T positions from an offset as one sequence vs one position per row.
            x = mx.array(rng.standard_normal((T + B, 2, 1, head_dim)), dtype=dtype)
            start = 1000
            alone = attention.rope(x[:T].transpose(2, 1, 0, 3), offset=start)
            offsets = mx.array(list(range(start, start + T)) + [7] * B, dtype=mx.int32)
            mixed = attention.rope(x, offset=offsets)[:T].transpose(2, 1, 0, 3)
            if not mx.array_equal(alone, mixed).item():
                return False
    return True
