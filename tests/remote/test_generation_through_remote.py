"""The real SmolLM2 through two hosts' daemons: a prompt prefilled through daemon A is a hit
through daemon B (empty store, same Redis), and B's generation equals the cold one."""

import pytest

from tqstore.client import KvStoreClient
from tqstore.generator import CachedGenerator
from tqstore.models.loader import chat_prompt_ids
from tqstore.models.smollm2 import load_smollm2

from tests.remote.test_shared_tier import start_daemon

BLOCK = 128


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_a_hit_through_the_remote_tier_reproduces_the_cold_run(tmp_path, smollm2, redis_server):
    from tqstore.demo import demo_document

    text = " ".join(demo_document().split(" ")[:330])
    ids = chat_prompt_ids(smollm2.tokenizer, text + "\n\nWho wrote this license?")
    a = start_daemon(tmp_path / "a", redis_server.url)
    b = start_daemon(tmp_path / "b", redis_server.url)
    try:
        with KvStoreClient(a.address) as client:
            cold = CachedGenerator(smollm2, client, block_size=BLOCK).generate(ids, max_tokens=16)
            assert cold.cache_status == "miss"
            assert cold.upload.result() == len(ids) // BLOCK
        assert a.tiers.settle(60)
        with KvStoreClient(b.address) as client:
            hit = CachedGenerator(smollm2, client, block_size=BLOCK).generate(ids, max_tokens=16)
            tiers = client.stats().tiers
        assert hit.cache_status == "hit"
        assert hit.hit_tokens == min((len(ids) // BLOCK) * BLOCK, len(ids) - 1)
        assert hit.token_ids == cold.token_ids and hit.text == cold.text
        assert tiers.remote_hit_tokens == (len(ids) // BLOCK) * BLOCK
        assert tiers.local_hit_tokens == 0
    finally:
        a.stop(grace=1)
        b.stop(grace=1)
