"""Fixtures for the paged-cache tests: small pools with random layouts."""

import pytest

import tqstore  # noqa: F401  (BLAS preload before mlx)
from tqstore.codec import CodecConfig
from tqstore.paged.kv_pool import PagedKVPool
from tqstore.paged.policy import CachePolicy


@pytest.fixture
def small_pool():
    def build(block_size: int = 4, num_blocks: int = 64, num_layers: int = 2, heads: int = 2,
              head_dim: int = 16, policy: CachePolicy | None = None) -> PagedKVPool:
        return PagedKVPool(num_layers=num_layers, num_kv_heads=heads, key_head_dim=head_dim,
                           block_size=block_size, num_blocks=num_blocks,
                           policy=policy or CachePolicy(codec=CodecConfig(4, 4)),
                           model_fingerprint="test-model")
    return build
