"""Shared fixtures for the SSD tier tests: real LMDB files in tmp dirs, fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest

import tqstore  # noqa: F401  (entry point convention: loads OpenBLAS first)
from tqstore.blocks import BlockPayload
from tqstore.prefix_hash import Namespace
from tqstore.ssd import BlockStore, StoreConfig

NS = Namespace("test-model@abc123", num_layers=3, num_kv_heads=2, head_dim=16, block_size=8)


def random_payload(rng: np.random.Generator, ns: Namespace = NS) -> BlockPayload:
    shape = (ns.num_layers, ns.num_kv_heads, ns.block_size, ns.head_dim)
    return BlockPayload(rng.standard_normal(shape).astype(np.float16),
                        rng.standard_normal(shape).astype(np.float16))


def random_tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(0, 49152, n).tolist()


def same_bits(a: BlockPayload, b: BlockPayload) -> bool:
    return (a.keys.shape == b.keys.shape and a.values.shape == b.values.shape
            and np.array_equal(a.keys.view(np.uint16), b.keys.view(np.uint16))
            and np.array_equal(a.values.view(np.uint16), b.values.view(np.uint16)))


@pytest.fixture
def store(tmp_path):
    s = BlockStore(tmp_path / "store", StoreConfig(map_size=1 << 28))
    yield s
    s.close()


def fill_chains(path, rng, chains=3, n=12):
    """Chains long enough that the blocks database has branch pages (~12 records a page)."""
    data = []
    with BlockStore(path) as s:
        for _ in range(chains):
            toks = random_tokens(rng, n * NS.block_size)
            pls = [random_payload(rng) for _ in range(n)]
            s.put_blocks(NS, toks, 0, pls)
            data.append((toks, pls))
    return data
