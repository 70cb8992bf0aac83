"""The paged KV pool of one model: block pool + per-layer arenas + prefix-hash namespace.

Sized from a byte budget: num_blocks = budget // (bytes of one block summed over all layers),
plus the null block. One pool serves many sequences; sequences that start with the same full
blocks of tokens share those physical blocks (a system prompt used by 8 requests is stored
once).

The namespace is the SSD tier's (model fingerprint, KV layout, block size, format version) plus
the cache policy's identity (codec settings, fp16 layers): compressed blocks from one codec
must never be found by a pool with another.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence as Seq

import mlx.core as mx

from tqstore.errors import InvalidArgument
from tqstore.paged.arenas import Fp16Arena, LayerArena, TurboQuantArena, dense_state_bytes
from tqstore.paged.block_pool import BlockPool
from tqstore.paged.policy import CachePolicy
from tqstore.paged.sequence import Sequence
from tqstore.prefix_hash import Namespace, hash_prefix_blocks

DEFAULT_BLOCK_SIZE = 16


class PagedKVPool:
    def __init__(self, *, num_layers: int, num_kv_heads: int, key_head_dim: int,
                 value_head_dim: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 policy: CachePolicy | None = None, budget_bytes: int | None = None,
                 num_blocks: int | None = None, model_fingerprint: str = "unnamed-model",
                 sliding_layers: Seq[int] = ()) -> None:
        if (budget_bytes is None) == (num_blocks is None):
            raise InvalidArgument("give exactly one of budget_bytes or num_blocks")
        self.policy = policy or CachePolicy()
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.key_head_dim = key_head_dim
        self.value_head_dim = value_head_dim or key_head_dim
        self.block_size = block_size
        sliding = set(sliding_layers)
        self.sliding_layers = frozenset(sliding)
        self.dense_layers = [self.policy.is_dense(l, num_layers, l in sliding) for l in range(num_layers)]
        dims = (block_size, num_kv_heads, key_head_dim, self.value_head_dim)
        self.block_bytes = sum(
            Fp16Arena.block_bytes(*dims) if dense
            else TurboQuantArena.block_bytes(*dims, self.policy.codec, layer)
            for layer, dense in enumerate(self.dense_layers))
        if num_blocks is None:
            num_blocks = budget_bytes // self.block_bytes + 1
        if num_blocks < 2:
            raise InvalidArgument(
                f"budget of {budget_bytes} bytes holds no block ({self.block_bytes} bytes each)")
        self.num_blocks = num_blocks
        self.block_pool = BlockPool(num_blocks)
        self.arenas: list[LayerArena] = [
            Fp16Arena(l, num_blocks, *dims) if dense
            else TurboQuantArena(l, num_blocks, *dims, self.policy.codec)
            for l, dense in enumerate(self.dense_layers)]
        # Allocate and zero the arenas now. Left lazy, the first write of the first request
        # materialized every arena inside that request's prefill (its TTFT), through a scatter
        # into a broadcast zero: 11 s for an 8 GiB pool on the 2-core VM against 1.3 s warm
        # (tools/prefill_profile.py). A later write then updates the buffer in place.
        mx.eval([arena.arrays for arena in self.arenas])
        extra = {"policy": self.policy.identity()}
        if self.value_head_dim != key_head_dim:
            extra["value_head_dim"] = self.value_head_dim
        self.namespace = Namespace(model_fingerprint, num_layers, num_kv_heads, key_head_dim,
                                   block_size).with_extra(**extra)
        self.stats: Counter[str] = Counter()

    @property
    def ssd_namespace(self) -> Namespace:
        """The codec-neutral namespace of fp16 blocks (what the SSD tier keys by)."""
        extra = tuple((k, v) for k, v in self.namespace.extra if k != "policy")
        return Namespace(self.namespace.model_fingerprint, self.num_layers, self.num_kv_heads,
                         self.key_head_dim, self.block_size, extra=extra)

    def new_sequence(self, token_ids: Seq[int] = ()) -> Sequence:
        """A sequence for a prompt; its longest cached prefix of full blocks is shared.

        At least one prompt token is always left to compute (the model needs it for logits), so
        at most (len - 1) // block_size blocks are shared. ``seq.num_cached_tokens`` says how many
        prompt tokens the caller must skip.
        """
        ids = [int(t) for t in token_ids]
        hashes = hash_prefix_blocks(self.namespace, ids[: max(0, len(ids) - 1)])
        shared = []
        for h in hashes:
            block = self.block_pool.lookup(h)
            if block is None:
                break
            self.block_pool.incref(block)
            shared.append(block)
        self.stats["prefix_hit_tokens"] += len(shared) * self.block_size
        self.stats["prompt_tokens"] += len(ids)
        return Sequence(self, ids, shared, hashes[: len(shared)])

    @property
    def nbytes(self) -> int:
        """Bytes of every arena (allocated, used or not)."""
        return sum(a.nbytes for a in self.arenas)

    def used_bytes(self) -> int:
        """Bytes of blocks currently referenced by some sequence (shared blocks once)."""
        return self.block_pool.num_used_blocks * self.block_bytes

    def bytes_per_token(self) -> float:
        return self.block_bytes / self.block_size

    def fp16_bytes_per_token(self) -> int:
        """What the same tokens cost as dense fp16 K/V in every layer (the baseline)."""
        return self.num_layers * dense_state_bytes(1, self.num_kv_heads, self.key_head_dim,
                                                   self.value_head_dim)
