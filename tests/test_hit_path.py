"""The hit path end to end on the real SmolLM2: daemon (real gRPC + LMDB) + generator.

- A hit reproduces the cold run exactly (same greedy tokens); a repeated prompt restores all but
  its last token (its trailing partial block included), and a block that held a prompt's last
  token is never stored (a longer prompt's cold run computes it in another chunk shape).
- The daemon's re-quantized codes equal the generator's own pages from a fresh prefill.
- An unreachable daemon means generation without the cache, said so, not a failure.
"""

import pytest

from tqstore.client import KvStoreClient
from tqstore.generator import MIN_PARTIAL_TOKENS, CachedGenerator
from tqstore.models.loader import chat_prompt_ids
from tqstore.models.smollm2 import load_smollm2

from tests.page_compare import assert_fetched_codes_equal_fresh_pages

BLOCK = 128


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


@pytest.fixture(scope="module")
def document():
    return _gpl_text()


def _gpl_text() -> str:
    from tqstore.demo import demo_document
    return demo_document()


def _prompt(loaded, document, words=330):
    text = " ".join(document.split(" ")[:words])
    return chat_prompt_ids(loaded.tokenizer, text + "\n\nWho wrote this license?")


def test_hit_output_identical_to_cold_and_prefix_is_reused(smollm2, document, daemon):
    ids = _prompt(smollm2, document, words=340)
    assert len(ids) > 3 * BLOCK
    with KvStoreClient(daemon.address) as client:
        generator = CachedGenerator(smollm2, client, block_size=BLOCK)
        cold = generator.generate(ids, max_tokens=16)
        assert cold.cache_status == "miss" and cold.hit_tokens == 0
        tail = (len(ids) - 1) % BLOCK
        assert tail >= MIN_PARTIAL_TOKENS  # this prompt has a trailing partial block to store
        assert cold.upload.result() == (len(ids) - 1) // BLOCK + 1  # full blocks, the partial
        hit = generator.generate(ids, max_tokens=16)
        assert hit.cache_status == "hit"
        assert hit.hit_tokens == len(ids) - 1  # a full hit: only the last token is computed
        assert hit.token_ids == cold.token_ids and hit.text == cold.text
        # A different question over the same document reuses the document's blocks.
        other = chat_prompt_ids(smollm2.tokenizer, " ".join(document.split(" ")[:330])
                                + "\n\nCan I sell copies?")
        shared = next(i for i, (a, b) in enumerate(zip(ids, other)) if a != b)
        partial = generator.generate(other, max_tokens=4)
        assert partial.hit_tokens == (shared // BLOCK) * BLOCK > 0


def test_daemon_requantized_codes_equal_generator_pages(smollm2, document, daemon):
    ids = _prompt(smollm2, document, words=260)
    assert len(ids) > 2 * BLOCK
    with KvStoreClient(daemon.address) as client:
        generator = CachedGenerator(smollm2, client, block_size=BLOCK)
        generator.generate(ids, max_tokens=1).upload.result()
        config = generator.policy.codec
        fetched = client.fetch_turboquant(generator.namespace, ids, config)
    assert len(fetched) == len(ids) // BLOCK >= 1
    assert_fetched_codes_equal_fresh_pages(smollm2.model, generator, ids, fetched, BLOCK)


def test_whole_prompt_cached_restores_all_but_the_last_token(smollm2, document, daemon):
    # A prompt of exactly 3 blocks: its third block holds the last token, so it is stored as a
    # partial block of BLOCK - 1 tokens; a hit restores 3 * BLOCK - 1 tokens and computes one.
    ids = _prompt(smollm2, document)[: 3 * BLOCK]
    longer = _prompt(smollm2, document)[: 3 * BLOCK + 40]
    with KvStoreClient(daemon.address) as client:
        generator = CachedGenerator(smollm2, client, block_size=BLOCK)
        cold = generator.generate(ids, max_tokens=6)
        assert cold.upload.result() == 3  # two full blocks and the partial one
        hit = generator.generate(ids, max_tokens=6)
        # A longer prompt takes only the two full blocks: the cold run of `longer` computes
        # positions [256, 384) as one chunk, where `ids` computed [256, 383) and [383, 384).
        extended = generator.generate(longer, max_tokens=6)
    assert hit.hit_tokens == 3 * BLOCK - 1
    assert hit.token_ids == cold.token_ids
    assert extended.hit_tokens == 2 * BLOCK
    alone = CachedGenerator(smollm2, None, block_size=BLOCK).generate(longer, max_tokens=6)
    assert extended.token_ids == alone.token_ids


def test_unreachable_daemon_generates_without_cache(smollm2):
    from tqstore.cli.generate import connect

    said = []
    assert connect("127.0.0.1:1", log=said.append) is None
    assert "unreachable" in said[0]
    ids = chat_prompt_ids(smollm2.tokenizer, "What is the capital of France?")
    with KvStoreClient("127.0.0.1:1") as client:
        report = CachedGenerator(smollm2, client).generate(ids, max_tokens=12)
    assert report.cache_status.startswith("daemon unreachable")
    assert "Paris" in report.text


def test_turboquant_form_hit_restores_codes_and_answers_alike(smollm2, document, daemon):
    ids = _prompt(smollm2, document)
    with KvStoreClient(daemon.address) as client:
        fp16_gen = CachedGenerator(smollm2, client, block_size=BLOCK)
        cold = fp16_gen.generate(ids, max_tokens=8)
        cold.upload.result()
        tq_gen = CachedGenerator(smollm2, client, block_size=BLOCK, fetch_form="turboquant")
        hit = tq_gen.generate(ids, max_tokens=8)
    assert hit.cache_status == "hit" and hit.upload is None
    assert hit.hit_tokens == (len(ids) - 1) // BLOCK * BLOCK  # full blocks only in this form
    # Not bit-identical by design (the rest attends to a dequantized prefix), but the same
    # greedy start on this prompt.
    assert hit.token_ids[:3] == cold.token_ids[:3]


@pytest.mark.parametrize("block", [0, -256])
def test_a_store_block_that_is_not_positive_is_refused(smollm2, block):
    """`--store-block 0` used to fall back to the default silently."""
    from tqstore.errors import TqstoreError

    with pytest.raises(TqstoreError, match="positive"):
        CachedGenerator(smollm2, None, block_size=block)
