"""The mlx-lm cache adapter: one ``PagedLayerCache`` per layer, all over one ``Sequence``.

mlx-lm's attention calls ``cache.offset``, ``keys, values = cache.update_and_fetch(k, v)``, then
``scaled_dot_product_attention(q, keys, values, cache=cache, ...)``; the first layer's cache makes
the mask; ``generate_step`` evaluates ``[c.state for c in cache]``.

Life of a layer cache:
- Prefill (chunks of L > 1 tokens): K/V are kept dense in fp16 and returned whole for stock SDPA
  (a prefix restored in fp16, ``load_fp16_prefix``, must be attended exactly as a cold run).
  As each chunk arrives, the blocks that will certainly be committed are also quantized into
  the pages (``_write_prefill_blocks``): per-vector codes are the same bytes whenever they are
  made, and temporaries stay bounded by the chunk (the anchors quantized a whole prefill at
  once and blew up activation memory).
- ``finish_prefill()`` (explicit, or at the first L == 1 call past ``sequence.prompt_length``
  when the caller set it, else at the first L == 1 call): the fp16 K/V go to the prefill
  listeners (the daemon upload hook), the rest (the newest block) is written, and the fp16
  copy is dropped. The first decode step so has at most one block left to quantize.
- Decode (L == 1): the new token is quantized into its page; attention runs over the pages via
  ``tqstore.paged.integration`` -> ``PagedLayerCache.attend`` -> ``tqstore.metal.dispatch``.
  ``update_and_fetch`` still returns lazily dequantized K/V, so a model whose attention was not
  routed (integration not installed) computes the same result, only slower; when it is routed,
  those lazy arrays are never evaluated.
- Multi-token steps after prefill (a chat's next turn, teacher forcing, a prefix shared from the
  pool): the chunk is quantized into pages as appended and attended by stock SDPA over the
  dequantized pages with the model's causal mask, which equals token-by-token decode.
- With ``policy.fp16_tail`` the newest, not yet full block stays fp16 until it fills
  (tqstore.paged.tail has the one rule every path follows): decode merges the kernel's softmax
  over the pages with the fp16 tail's, and a multi-token step hands stock SDPA an extended key
  layout plus the mask from ``make_mask``, so it still equals token-by-token decode.

No attribute is named ``bits``: mlx-lm would route such a cache to its own affine path.
"""

from __future__ import annotations

from typing import Any, Sequence as Seq

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import create_attention_mask

from tqstore.errors import InvalidArgument
from tqstore.metal.dispatch import (decode_epilogue, fused_decode_step,
                                    fused_decode_step_possible, paged_decode_attention)
from tqstore.metal.reference import merge_with_tail
from tqstore.paged import shared_tail
from tqstore.paged.arenas import KV_DTYPE, dense_state_bytes
from tqstore.paged.kv_pool import DEFAULT_BLOCK_SIZE, PagedKVPool
from tqstore.paged.policy import CachePolicy
from tqstore.paged.sequence import Sequence
from tqstore.paged.tail import commit_point, exact_start, extended_mask
from tqstore.paged.tail_storage import TailStorage


# A decode step of one sequence off the C path (GPUs, the reference) as a batch of one
# (tqstore.paged.shared_tail) instead of its own composition. On: with its launches resolved
# once (tqstore.metal.step_launch) it beat the composed step in every H100 run of
# tools/attention_e2e.py --ab-alone, in the step form (32k: 0.75-0.85x fp16 against
# 0.62-0.69x; 128k: 1.19x against 0.91x) and in three launches (0.76x, 1.18x; the form other
# shapes and Metal take; docs/BENCHMARKS.md). Off is kept for the A/B and for tests that
# compare the two paths.
SHARED_STEP_ALONE = True


@mx.compile
def prepare_queries(queries: mx.array, rotation: mx.array,
                    scale: float) -> tuple[mx.array, mx.array]:
    """(B, Hq, Dk) queries -> (scale * q in float32, the same rotated per kv head: q @ R_K^T).
    Rotated with one batched matmul, not the codec's butterflies: queries are never stored, so
    they need no batch-shape-exact arithmetic. Compiled: the cast and scale fuse into one op."""
    B, Hq, Dk = queries.shape
    Hkv = rotation.shape[0]
    q = queries.astype(mx.float32) * scale
    return q, mx.matmul(q.reshape(B, Hkv, Hq // Hkv, Dk), rotation).reshape(B, Hq, Dk)


class PagedLayerCache(TailStorage):
    """mlx-lm cache protocol for one layer of one sequence (batch size 1)."""

    def __init__(self, sequence: Sequence, layer: int) -> None:
        self.sequence = sequence
        self.layer = layer
        self.arena = sequence.pool.arenas[layer]
        self.offset = sequence.num_cached_tokens
        self.in_prefill = self.offset == 0
        self._keys: mx.array | None = None  # fp16 prefill K/V (1, Hkv, T, D)
        self._values: mx.array | None = None
        self.decode_pending = False  # set by an L == 1 update, consumed by attend()
        pool = sequence.pool
        self.fp16_tail = pool.policy.fp16_tail and layer not in pool.sliding_layers
        # Tokens whose K/V are in the pages; with fp16_tail, [committed, offset) are held in
        # _tail_keys/_tail_values (fp16, (1, Hkv, n, D)), else committed == offset after a write.
        self.committed = self.offset
        # The tail's own arrays, or after a batched GPU step a reference to this sequence's
        # row of the batch's buffers, sliced out only when something reads this row's tail
        # alone (tqstore.paged.tail_storage; assigning the tail drops the reference).
        self._tail_keys: mx.array | None = None
        self._tail_values: mx.array | None = None
        # A routed decode step's token that joins the tail block: the decode epilogue appends
        # it (tqstore.metal.epilogue), so the step costs no concatenation. Already counted in
        # offset; _flush_pending() appends it wherever the tail is read otherwise.
        self._pending: tuple[mx.array, mx.array] | None = None
        # A routed decode step taken as a batch of one (shared_tail): (tail length, K, V).
        self._alone: tuple[int, mx.array, mx.array] | None = None

    # Set by tqstore.paged.integration.install(): decode steps of some model are routed to
    # attend(). Then update_and_fetch skips the dense view it would otherwise return.
    attention_routed = False

    # -- the fp16 prefill ------------------------------------------------------------------
    def load_fp16_prefix(self, keys: mx.array, values: mx.array) -> None:
        """Restore an fp16 prefix (1 or no batch axis, Hkv, T, D) into a fresh cache: the rest of
        the prompt then prefills attending to it exactly as a cold run would."""
        if not self.in_prefill or self.offset:
            raise InvalidArgument("load_fp16_prefix needs a fresh cache")
        keys, values = (x if x.ndim == 4 else x[None] for x in (keys, values))
        if keys.shape[0] != 1 or keys.shape[2] != values.shape[2]:
            raise InvalidArgument(f"prefix shapes {keys.shape} / {values.shape} do not match")
        self._keys, self._values = keys.astype(KV_DTYPE), values.astype(KV_DTYPE)
        self.offset = keys.shape[2]

    def load_turboquant_prefix(self, codes: dict[str, mx.array]) -> None:
        """Restore a prefix as codes (key_codes/value_codes (Hkv, T, bytes), key_scales/
        value_scales (Hkv, T)) into a fresh cache. The prefix is then already quantized: the rest
        of the prompt runs as multi-token steps over the dequantized pages, so unlike an fp16
        restore the result is close to, not identical with, a cold run."""
        if not self.in_prefill or self.offset:
            raise InvalidArgument("load_turboquant_prefix needs a fresh cache")
        if self.arena.dense:
            raise InvalidArgument(f"layer {self.layer} keeps fp16 KV: restore it from fp16")
        count = codes["key_scales"].shape[1]
        block_ids, slots = self.sequence.prepare_write(0, count)
        self.arena.write_codes(block_ids, slots, codes)
        self.in_prefill = False
        self.offset = self.committed = count
        self.sequence.note_written(self.layer, count)

    def prefill_kv(self) -> tuple[mx.array, mx.array] | None:
        """The fp16 K/V (1, Hkv, T, D) of the prefill so far, or None once quantized."""
        return None if self._keys is None else (self._keys, self._values)

    def fp16_blocks(self) -> tuple[mx.array, mx.array] | None:
        """fp16 K/V (Hkv, n * block_size, D) of the FULL blocks of the prefill (what the SSD
        tier stores); None once quantized."""
        if self._keys is None:
            return None
        n = (self.offset // self.sequence.block_size) * self.sequence.block_size
        return self._keys[0, :, :n], self._values[0, :, :n]

    def finish_prefill(self) -> None:
        """Quantize the prefill into pages once and drop the fp16 copy (idempotent)."""
        if not self.in_prefill:
            return
        self.in_prefill = False
        if self._keys is None:
            return
        for listener in self.sequence.prefill_listeners:
            listener(self.layer, self._keys, self._values)
        keys, values = self._keys, self._values
        self._keys = self._values = None
        # [0, committed) went to the pages chunk by chunk (_write_prefill_blocks).
        self.offset = self.committed
        if keys.shape[2] > self.committed:
            self._append(keys[:, :, self.committed:], values[:, :, self.committed:])
        self.sequence.note_written(self.layer, self.committed)  # publishes the early blocks

    # -- the mlx-lm protocol ---------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array,
                         alone: bool = True) -> tuple[mx.array, mx.array]:
        """mlx-lm's update. ``alone`` False: this cache is a row of a batch's general per-row
        step (tqstore.paged.batch), never its own batch of one (whose attend it would miss)."""
        if keys.shape[0] != 1:
            raise InvalidArgument("PagedLayerCache holds one sequence: batch size must be 1")
        L = keys.shape[2]
        if self.prefill_step(L):
            k, v = keys.astype(KV_DTYPE), values.astype(KV_DTYPE)
            if self._keys is None:
                self._keys, self._values = k, v
            else:
                self._keys = mx.concatenate([self._keys, k], axis=2)
                self._values = mx.concatenate([self._values, v], axis=2)
            self.offset += L
            self._write_prefill_blocks()
            return self._keys.astype(keys.dtype), self._values.astype(values.dtype)
        self.finish_prefill()
        if self.decode_pending and self.attention_routed:
            # The previous decode step was never attended through integration.dispatch: this
            # model's attention is not routed, and stock SDPA saw only the placeholder below.
            raise InvalidArgument("this model's attention is not routed to the paged cache: call "
                                  "tqstore.paged.install(model) before generating")
        self._flush_pending()
        if L == 1 and alone and SHARED_STEP_ALONE and not fused_decode_step_possible():
            # The step of a batch of one (shared_tail.plan and append for one row, inline: this
            # runs per layer and step; shared_tail_append commits a full tail as append does).
            n_old = self.shared_tail_plan()
            if n_old is not None:
                self.shared_tail_append(n_old)
                self._alone = (n_old, keys, values)
                return keys, values
        self.decode_pending = L == 1 and not self.arena.dense
        routed = self.decode_pending and self.attention_routed
        if routed and self._routed_decode_append(keys, values):
            return keys, values
        start, committed = self.offset, self.committed
        exact = self._append(keys, values)
        if routed:
            # The routed attention reads the pages (attend()); what we return is never used, so
            # don't build a dequantized view of the whole context every step (it cost 39 of 138 ms
            # of graph building per SmolLM2 step).
            return keys, values
        table = self.sequence.block_table().squeeze(0)
        k, v = self.arena.gather_dense(table, self.committed, keys.dtype)
        if exact is not None:
            # The extended layout of tqstore.paged.tail: codes of [0, committed'), then fp16 of
            # [first_exact, offset); make_mask gave the matching mask (none for one token).
            skip = exact_start(committed, start, self.sequence.block_size) - committed
            exact_k, exact_v = self._exact(exact[0][:, :, skip:], exact[1][:, :, skip:], keys.dtype)
            k, v = mx.concatenate([k, exact_k], axis=1), mx.concatenate([v, exact_v], axis=1)
        return k[None], v[None]

    def _write_prefill_blocks(self) -> None:
        """Quantize, as each prefill chunk arrives, the blocks finish_prefill is certain to
        commit (every block before the newest token's; with no fp16 tail every full block),
        instead of the whole prefill at the first decode step (that was a pause of several
        decode steps after the first token). Codes are per vector, so the bytes are the same
        either way, and prefill attention keeps reading the fp16 copy: outputs do not change.
        ``committed`` counts these tokens during the prefill too. fp16 layers have nothing
        to quantize and keep writing at the end (a prefill-only caller, such as calibration,
        may then size an fp16 pool for nothing)."""
        if self.arena.dense:
            return
        bs = self.sequence.block_size
        upto = (commit_point(0, self.offset, bs) if self.fp16_tail
                else (self.offset // bs) * bs)
        if upto > self.committed:
            start = self.committed
            # Not published yet (publish=False): the pool shares these blocks with other
            # sequences only once the prefill ends, as before (the serving engine's tiers
            # depend on it: a request holding for another's prompt takes the daemon's exact
            # blocks, not these codes).
            self._commit(start, self._keys[:, :, start:upto], self._values[:, :, start:upto],
                         publish=False)

    def prefill_step(self, L: int) -> bool:
        """Whether an update of L tokens now is still a prefill step (kept in fp16 and attended
        by stock SDPA in the model's dtype), not a decode step."""
        prompt_left = (self.sequence.prompt_length is not None
                       and self.offset + L <= self.sequence.prompt_length)
        return self.in_prefill and (L > 1 or prompt_left)

    def _routed_decode_append(self, keys: mx.array, values: mx.array) -> bool:
        """The one token of a routed decode step, where the fp16 tail makes it cheap (else
        False: the general _append runs). Joining the tail block: left pending for the decode
        epilogue. Opening a new block: the whole old tail commits as it is (no concatenation)
        and the token alone is the new tail."""
        if not self.fp16_tail or self._tail_keys is None:
            return False
        end, tail_len = self.offset + 1, self._tail_keys.shape[2]
        to_commit = commit_point(self.committed, end, self.sequence.block_size) - self.committed
        keys, values = keys.astype(KV_DTYPE), values.astype(KV_DTYPE)
        if to_commit == 0:
            self._pending = (keys, values)
        elif to_commit == tail_len:
            self._commit(self.committed, self._tail_keys, self._tail_values)
            self._tail_keys, self._tail_values = keys, values
        else:
            return False
        self.offset = end
        return True

    def _flush_pending(self) -> None:
        if self._pending is not None:
            keys, values = self._pending
            self._pending = None
            self._tail_keys = mx.concatenate([self._tail_keys, keys], axis=2)
            self._tail_values = mx.concatenate([self._tail_values, values], axis=2)

    def _append(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array] | None:
        """Add tokens [offset, offset + n) after prefill: straight into the pages, or with
        fp16_tail into the tail, committing every block before the newest token's. Returns the
        fp16 K/V of [committed before, offset after) with fp16_tail (what a multi-token step
        attends exactly), else None."""
        count = keys.shape[2]
        end = self.offset + count
        if not self.fp16_tail:
            self._commit(self.offset, keys, values)
            self.offset = end
            return None
        keys, values = keys.astype(KV_DTYPE), values.astype(KV_DTYPE)
        if self._tail_keys is not None:
            keys = mx.concatenate([self._tail_keys, keys], axis=2)
            values = mx.concatenate([self._tail_values, values], axis=2)
        n = commit_point(self.committed, end, self.sequence.block_size) - self.committed
        if n:
            self._commit(self.committed, keys[:, :, :n], values[:, :, :n])
        self._tail_keys, self._tail_values = keys[:, :, n:], values[:, :, n:]
        self.offset = end
        return keys, values

    def _commit(self, start: int, keys: mx.array, values: mx.array, publish: bool = True) -> None:
        count = keys.shape[2]
        block_ids, slots = self.sequence.prepare_write(start, count)
        self.arena.write(block_ids, slots, keys[0], values[0])
        self.committed = start + count
        if publish:
            self.sequence.note_written(self.layer, self.committed)

    def _exact(self, keys: mx.array, values: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """fp16 K/V (1, Hkv, n, D) as attention sees them: (Hkv, n, D), keys in the pages'
        scoring space (k - mean where keys are centered)."""
        return (self.arena.attention_keys(keys.squeeze(0)).astype(dtype),
                values.squeeze(0).astype(dtype))

    def attend(self, queries: mx.array, scale: float, mask: Any = None) -> mx.array:
        """Decode attention over the compressed pages (and the fp16 tail) for the token just
        written. queries (1, Hq, 1, Dk) -> (1, Hq, 1, Dv) in the queries' dtype.

        Per layer and step on a GPU: one compiled query preparation (scale, rotation), the
        attention kernel over the pages, and with the tail one epilogue kernel (un-rotation,
        merge with the tail, the pending token's append, the cast): decode's cost on a GPU is
        mostly launches (tools/profile_decode.py).
        """
        self.decode_pending = False
        if mask is not None and not isinstance(mask, str):
            raise InvalidArgument("paged decode takes no mask array (sliding layers stay fp16)")
        if self._alone is not None:
            n_old, new_keys, new_values = self._alone
            self._alone = None
            seq = self.sequence
            return shared_tail.shared_tail_attend(
                [self], queries, scale, seq.block_table(), seq.length_array(self.committed),
                [n_old], shared_tail.tail_info((n_old,)), new_keys, new_values)
        B, Hq, L, Dk = queries.shape
        kc, vc = self.arena.key_codec, self.arena.value_codec
        Hkv, G, Dv = kc.num_heads, Hq // kc.num_heads, vc.head_dim
        if self.committed and fused_decode_step_possible():
            # The CPU's C kernel does the whole step in one call.
            self._flush_pending()
            fused = fused_decode_step(
                queries[:, :, 0, :], scale, self.arena.query_rotation, self.arena.key_codes,
                self.arena.key_scales, self.arena.value_codes, self.arena.value_scales,
                self.sequence.block_table(), self.sequence.length_array(self.committed),
                kc.codebook, vc.codebook, self._tail_keys, self._tail_values,
                self.arena.key_center, self.arena.output_rotation, kc.bits, vc.bits)
            if fused is not None:
                return fused.reshape(B, Hq, 1, Dv).astype(queries.dtype)
        q, q_rot = prepare_queries(queries[:, :, 0, :], self.arena.query_rotation, scale)
        if not self.committed:  # no page yet: the fp16 tail alone
            self._flush_pending()
            tail_k, tail_v = self._exact(self._tail_keys, self._tail_values, mx.float32)
            out = merge_with_tail(None, None, q.reshape(Hkv, G, Dk), tail_k, tail_v)
            return out.reshape(B, Hq, 1, Dv).astype(queries.dtype)
        has_tail = self._tail_keys is not None
        result = paged_decode_attention(
            q_rot, self.arena.key_codes, self.arena.key_scales, self.arena.value_codes,
            self.arena.value_scales, self.sequence.block_table(),
            self.sequence.length_array(self.committed), kc.codebook, vc.codebook, kc.bits,
            vc.bits, return_lse=has_tail)
        pages_out, lse = result if has_tail else (result, None)
        return self.finish_pages(pages_out, lse, q, queries.dtype)

    def finish_pages(self, pages_out: mx.array, lse: mx.array | None, q: mx.array,
                     dtype: mx.Dtype) -> mx.array:
        """The rest of this step's attention once the pages are attended: pages_out (1, Hq, Dv)
        in the value-rotated space and its log-sum-exp (1, Hq) (None: no fp16 tail), q (1, Hq,
        Dk) the scaled, unrotated queries -> (1, Hq, 1, Dv) in ``dtype``: un-rotated, merged
        with the fp16 tail, this step's pending token appended to the tail. Shared by attend()
        and a batched GPU step (tqstore.paged.batch), which attends every row's pages at once."""
        self.decode_pending = False
        B, Hq, _ = q.shape
        Hkv, Dv = self.arena.key_codec.num_heads, self.arena.value_codec.head_dim
        if self._tail_keys is None:
            out = mx.matmul(pages_out.reshape(B, Hkv, Hq // Hkv, Dv), self.arena.output_rotation)
            return out.reshape(B, Hq, 1, Dv).astype(dtype)
        new_keys, new_values = self._pending or (None, None)
        self._pending = None
        old_len = self._tail_keys.shape[2]
        length = old_len + (0 if new_keys is None else new_keys.shape[2])
        out, self._tail_keys, self._tail_values = decode_epilogue(
            pages_out, lse, q, self._tail_keys, self._tail_values, new_keys, new_values,
            self.sequence.tail_info_array(length, old_len), self.arena.key_center,
            self.arena.output_rotation, self.sequence.block_size, dtype)
        return out.reshape(B, Hq, 1, Dv)

    def fused_step_row(self) -> tuple[mx.array, mx.array, mx.array | None, mx.array | None]:
        """This sequence's row of a batched fused step (fused_batch_step), the routed token's
        pending append flushed into the tail as attend does: (block table, seq_lens, tail keys,
        tail values)."""
        self.decode_pending = False
        self._flush_pending()
        return (self.sequence.block_table(), self.sequence.length_array(self.committed),
                self._tail_keys, self._tail_values)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        if self.fp16_tail and N > 1 and window_size is None and not self.prefill_step(N):
            # finish_prefill will commit first: predict its commit point
            committed = (commit_point(0, self.offset, self.sequence.block_size)
                         if self.in_prefill else self.committed)
            return extended_mask(committed, self.offset, N, self.sequence.block_size)
        return create_attention_mask(N, self.offset, return_array, window_size)

    @property
    def state(self) -> list[mx.array]:
        """What generate_step evaluates each step: the pending writes of this layer."""
        self._flush_pending()
        if self._keys is not None:
            # With the pages written so far in the prefill (_write_prefill_blocks): a caller
            # evaluating the state after a chunk also runs those writes.
            return [self._keys, self._values] + (self.arena.arrays if self.committed else [])
        return [*self.arena.arrays, *self.tail_state()]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        self._flush_pending()
        n = min(self.offset, n)
        self.offset -= n
        if self._keys is not None:
            self._keys, self._values = self._keys[:, :, : self.offset], self._values[:, :, : self.offset]
            if self.committed > self.offset:  # pages written early past the new end: those
                # positions are written again by the next chunk (nothing was published yet)
                self.committed = (self.offset // self.sequence.block_size) * self.sequence.block_size
        elif self.offset >= self.committed:
            keep = self.offset - self.committed
            if self._tail_keys is not None and keep:
                self._tail_keys = self._tail_keys[:, :, :keep]
                self._tail_values = self._tail_values[:, :, :keep]
            elif self._tail_keys is not None:  # an empty tail is no tail
                self._tail_keys = self._tail_values = None
        else:
            # Into the pages: the tokens left in a partial block are attended through their codes
            self._tail_keys = self._tail_values = None
            self.committed = self.offset
            self.sequence.trim(self.layer, self.offset)
        return n

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def nbytes(self) -> int:
        """Live KV bytes of this layer: the fp16 prefill copy (plus the pages already written
        during the prefill), or this sequence's pages and fp16 tail."""
        if self._keys is not None:
            pages = len(self.sequence.blocks) * self.arena.bytes_per_block if self.committed else 0
            return self._keys.nbytes + self._values.nbytes + pages
        self._flush_pending()
        return len(self.sequence.blocks) * self.arena.bytes_per_block + self.tail_nbytes()

    @property
    def fp16_nbytes(self) -> int:
        """The same tokens as dense fp16 K/V (the baseline)."""
        return dense_state_bytes(self.offset, *self._dims()[1:])

    def _dims(self) -> tuple[int, int, int, int]:
        pool = self.sequence.pool
        return pool.block_size, pool.num_kv_heads, pool.key_head_dim, pool.value_head_dim


# -- building caches for a model -------------------------------------------------------------
def model_kv_layout(model: nn.Module) -> dict[str, Any]:
    """num_layers, num_kv_heads, key/value head dims and sliding layers of an mlx-lm model."""
    layers = model.layers
    attn = layers[0].self_attn
    n_kv = attn.n_kv_heads
    key_dim = getattr(attn, "head_dim", None) or attn.k_proj.weight.shape[0] // n_kv
    value_dim = attn.v_proj.weight.shape[0] // n_kv
    sliding = [i for i, layer in enumerate(layers) if getattr(layer, "use_sliding", False)]
    return dict(num_layers=len(layers), num_kv_heads=n_kv, key_head_dim=key_dim,
                value_head_dim=value_dim, sliding_layers=sliding)


def pool_for_model(model: nn.Module, *, policy: CachePolicy | None = None,
                   budget_bytes: int = 256 << 20, block_size: int = DEFAULT_BLOCK_SIZE,
                   model_fingerprint: str = "unnamed-model") -> PagedKVPool:
    """A pool shaped for ``model`` holding ``budget_bytes`` of KV pages."""
    return PagedKVPool(**model_kv_layout(model), block_size=block_size, policy=policy,
                       budget_bytes=budget_bytes, model_fingerprint=model_fingerprint)


def make_prompt_cache(pool: PagedKVPool, token_ids: Seq[int] = ()) -> list[PagedLayerCache]:
    """Per-layer caches for one new sequence (pass as ``prompt_cache=`` to mlx-lm).

    If the pool already holds full blocks of ``token_ids``' prefix, they are shared and
    ``caches[0].offset`` (== ``caches[0].sequence.num_cached_tokens``) prompt tokens must be
    skipped: feed ``token_ids[offset:]`` to the model. Call ``release_prompt_cache`` when done.
    """
    seq = pool.new_sequence(token_ids)
    return [PagedLayerCache(seq, layer) for layer in range(pool.num_layers)]


def release_prompt_cache(caches: Seq[PagedLayerCache]) -> None:
    """Return the sequence's blocks to the pool (cached blocks stay findable)."""
    if caches:
        caches[0].sequence.release()
