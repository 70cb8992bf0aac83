"""Trailing partial blocks stay local: a Put's partial is never uploaded to the shared Redis (the
full blocks before it are), and another host gets the full blocks from the remote and no partial."""

import numpy as np

from tqstore.blocks import BlockPayload
from tqstore.config import RemoteConfig
from tqstore.prefix_hash import Namespace
from tqstore.remote.redis_tier import RedisTier
from tqstore.remote.tiers import Tiers
from tqstore.remote.value_format import block_keys
from tqstore.ssd import BlockStore, StoreConfig
from tqstore.ssd.chain import chain_hashes, partial_hash, token_array

NS = Namespace("test-model", num_layers=2, num_kv_heads=2, head_dim=16, block_size=8)


def payload(rng, n: int) -> BlockPayload:
    shape = (NS.num_layers, NS.num_kv_heads, n, NS.head_dim)
    return BlockPayload(rng.standard_normal(shape).astype(np.float16),
                        rng.standard_normal(shape).astype(np.float16))


def test_partial_is_never_uploaded(tmp_path, rng, redis_server):
    toks = token_array(rng.integers(0, 49152, 2 * NS.block_size + 5))
    pls = [payload(rng, NS.block_size) for _ in range(2)] + [payload(rng, 5)]
    hashes = chain_hashes(NS, toks)
    pkey = partial_hash(hashes[1], toks[2 * NS.block_size:])
    cfg = StoreConfig(map_size=1 << 28)
    remote_a = RedisTier(RemoteConfig(url=redis_server.url, lookup_deadline_s=2.0))
    remote_b = RedisTier(RemoteConfig(url=redis_server.url, lookup_deadline_s=2.0))
    with BlockStore(tmp_path / "a", cfg) as a, BlockStore(tmp_path / "b", cfg) as b:
        assert remote_a.connect(10) and remote_b.connect(10)
        ta, tb = Tiers(a, remote_a), Tiers(b, remote_b)
        try:
            assert ta.put_blocks(NS, toks, 0, pls, partial=True) == hashes + [pkey]
            other = np.concatenate([toks[:-1], [(int(toks[-1]) + 1) % 49152]]).astype("<u4")
            ta.put_blocks(NS, other, 2, [payload(rng, 5)], partial=True)  # the partial alone
            assert ta.settle(30)
            st = remote_a.stats()
            assert st.get("uploaded_blocks") == 2 and not st.get("uploads_failed")
            client = redis_server.client()
            assert client.exists(*block_keys(NS, hashes[1])) == len(block_keys(NS, hashes[1]))
            assert client.exists(*block_keys(NS, pkey)) == 0
            assert ta.lookup_partial(NS, toks) == 5
            # host B: the full blocks come from the remote, the partial from nowhere
            assert tb.lookup(NS, toks) == 2 and tb.lookup_partial(NS, toks) == 0
            got = list(tb.blocks(NS, toks, 0, 2, partial=True))
            assert [i for i, _ in got] == [0, 1]
            assert all(p.keys.tobytes() == pls[i].keys.tobytes() for i, p in got)
        finally:
            ta.close()
            tb.close()
