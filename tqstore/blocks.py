"""The block the wire carries: one prompt block's fp16 K/V, all layers.

Below both sides (design.md, "The parts and which way they depend"): the client and the
generator build and receive these, the daemon serves them, the store writes and verifies them.
Only numpy here, so the generator side never loads the store (lmdb) to name a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockPayload:
    """One block: all layers, K and V, fp16, shape (num_layers, num_kv_heads, block_size, head_dim)."""

    keys: np.ndarray
    values: np.ndarray


@dataclass
class PrefixKV:
    """A run of consecutive fetched blocks laid out as the cache wants them: keys and values
    (num_layers, num_kv_heads, blocks * block_size, head_dim) fp16, so a restore takes each
    layer as a slice with no concatenation. Blocks are written straight into place by the
    same-host reader and by the gRPC fetch alike. len() is the block count (0: no hit)."""

    keys: np.ndarray
    values: np.ndarray
    block_size: int
    source: str = ""  # "direct", "grpc", "direct+grpc": where the bytes came from

    @classmethod
    def empty(cls, layout: tuple[int, int, int, int], blocks: int) -> "PrefixKV":
        """Uninitialized room for `blocks` blocks of layout (layers, heads, block_size, dim)."""
        layers, heads, block_size, dim = layout
        shape = (layers, heads, blocks * block_size, dim)
        return cls(np.empty(shape, np.float16), np.empty(shape, np.float16), block_size)

    def __len__(self) -> int:
        return self.keys.shape[2] // self.block_size

    def block(self, index: int) -> BlockPayload:
        """Block `index` of the run as views (no copy)."""
        cut = slice(index * self.block_size, (index + 1) * self.block_size)
        return BlockPayload(keys=self.keys[:, :, cut], values=self.values[:, :, cut])

    def head(self, blocks: int) -> "PrefixKV":
        """The first `blocks` blocks (views)."""
        cut = slice(0, blocks * self.block_size)
        return PrefixKV(self.keys[:, :, cut], self.values[:, :, cut], self.block_size, self.source)
