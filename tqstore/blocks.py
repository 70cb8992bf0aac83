"""The block the wire carries: one prompt block's fp16 K/V, all layers.

Below both sides (design.md, "The parts and which way they depend"): the client and the
generator build and receive these, the daemon serves them, the store writes and verifies them.
Only numpy here, so the generator side never loads the store (lmdb) to name a block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class BlockPayload:
    """One block: all layers, K and V, fp16, shape (num_layers, num_kv_heads, block_size, head_dim)."""

    keys: np.ndarray
    values: np.ndarray


@dataclass
class PrefixKV:
    """A run of consecutive fetched blocks laid out as the cache wants them: keys and values
    (num_layers, num_kv_heads, tokens, head_dim) fp16, so a restore takes each layer as a slice
    with no concatenation. Blocks are written straight into place by the same-host reader and by
    the gRPC fetch alike. len() is the count of FULL blocks (0: none); `tokens` may run on
    into a trailing partial block (fewer than block_size tokens) after them."""

    keys: np.ndarray
    values: np.ndarray
    block_size: int
    source: str = ""  # "direct", "grpc", "direct+grpc": where the bytes came from

    @classmethod
    def empty(cls, layout: tuple[int, int, int, int], blocks: int, partial_tokens: int = 0,
              allocate: Callable[[list[tuple[int, ...]]], list[np.ndarray]] | None = None
              ) -> "PrefixKV":
        """Uninitialized room for `blocks` blocks of layout (layers, heads, block_size, dim),
        plus a trailing partial block of `partial_tokens` tokens. allocate(shapes) gives the
        fp16 K and V arrays (default np.empty; a CUDA client passes pinned staging memory)."""
        layers, heads, block_size, dim = layout
        shape = (layers, heads, blocks * block_size + partial_tokens, dim)
        if allocate is None:
            return cls(np.empty(shape, np.float16), np.empty(shape, np.float16), block_size)
        keys, values = allocate([shape, shape])
        return cls(keys, values, block_size)

    def __len__(self) -> int:
        return self.keys.shape[2] // self.block_size

    def __bool__(self) -> bool:  # a trailing partial block alone is a hit too
        return self.tokens > 0

    @property
    def tokens(self) -> int:
        """Positions held: the full blocks and the trailing partial block, if any."""
        return self.keys.shape[2]

    def slot_tokens(self, slot: int) -> int:
        """Tokens of block `slot` of the run (block_size, or fewer for the trailing partial;
        0 past the end)."""
        return max(0, min(self.block_size, self.tokens - slot * self.block_size))

    def block(self, index: int) -> BlockPayload:
        """Block `index` of the run as views (no copy)."""
        cut = slice(index * self.block_size, (index + 1) * self.block_size)
        return BlockPayload(keys=self.keys[:, :, cut], values=self.values[:, :, cut])

    def head(self, blocks: int, partial_tokens: int = 0) -> "PrefixKV":
        """The first `blocks` blocks and `partial_tokens` tokens of the next (views)."""
        cut = slice(0, blocks * self.block_size + partial_tokens)
        return PrefixKV(self.keys[:, :, cut], self.values[:, :, cut], self.block_size, self.source)
