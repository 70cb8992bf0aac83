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
