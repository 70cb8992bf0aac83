import numpy as np
import pytest

from tqstore.blocks import BlockPayload
from tqstore.client import KvStoreClient
from tqstore.config import ServerConfig, StoreConfig
from tqstore.prefix_hash import Namespace
from tqstore.daemon import Daemon

from tests.seeding import seeded_rng

MiB = 1 << 20


@pytest.fixture
def namespace() -> Namespace:
    return Namespace("test-model", num_layers=4, num_kv_heads=2, head_dim=64, block_size=16)


def random_blocks(ns: Namespace, n: int, rng=None) -> list[BlockPayload]:
    rng = rng or seeded_rng()
    shape = (ns.num_layers, ns.num_kv_heads, ns.block_size, ns.head_dim)
    return [BlockPayload(keys=(rng.standard_normal(shape) * 2).astype(np.float16),
                         values=rng.standard_normal(shape).astype(np.float16)) for _ in range(n)]


@pytest.fixture
def daemon(tmp_path):
    config = ServerConfig(path=str(tmp_path / "kv"), listen="127.0.0.1:0", drain_seconds=2,
                          max_put_bytes=8 * MiB, store=StoreConfig(max_bytes=512 * MiB,
                                                                   map_size=256 * MiB))
    d = Daemon(config).start()
    yield d
    d.stop(grace=1)


@pytest.fixture
def client(daemon):
    with KvStoreClient(daemon.address) as c:
        yield c
