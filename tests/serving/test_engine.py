"""The serving engine in process, on the real SmolLM2 (and a real daemon where it matters):
batches keep requests apart, a daemon hit reproduces a cold run bit for bit, the memory tier
shares pages, a cancelled request frees its pages at once, admission waits for pages instead of
failing, and requests that can never run are refused up front."""

from __future__ import annotations

import time

import pytest
from mlx_lm.generate import make_stop_sequences

import tqstore  # noqa: F401  (BLAS preload before mlx)
from tqstore.client import KvStoreClient
from tqstore.config import ServingConfig
from tqstore.errors import InvalidArgument, ResourceExhausted
from tqstore.generator import MIN_PARTIAL_TOKENS
from tqstore.models.loader import chat_prompt_ids
from tqstore.models.smollm2 import load_smollm2
from tqstore.paged import install
from tqstore.paged.mixed import exact_rows
from tqstore.serving.engine import Engine
from tqstore.serving.request import TokenEvent
from tqstore.serving.sampling import SamplingParams

QUESTIONS = ["What is the capital of France?", "Name three colors.",
             "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_smollm2()
    install(loaded.model)
    return loaded


@pytest.fixture(scope="module")
def engine(smollm2):
    eng = Engine(smollm2, None, ServingConfig(pool_bytes=64 << 20))
    yield eng
    eng.close()


def params(loaded, max_tokens=16, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens,
                          stop_sequences=make_stop_sequences(loaded.tokenizer, []), **kw)


def collect(request, timeout=120.0):
    """(tokens, logprobs, finish reason) of a finished request."""
    tokens, logprobs, reason = [], [], None
    deadline = time.monotonic() + timeout
    while True:
        event = request.events.get(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(event, TokenEvent):
            tokens.append(event.token)
            logprobs.append(event.logprob)
            reason = event.finish_reason or reason
        elif event[0] == "done":
            return tokens, logprobs, reason
        elif event[0] == "error":
            raise AssertionError(f"request failed: {event[1]}")


def document_prompt(loaded, words: int, question: str) -> list[int]:
    from tqstore.demo import demo_document

    text = " ".join(demo_document().split(" ")[:words])
    return chat_prompt_ids(loaded.tokenizer, text + "\n\n" + question)


def wait_idle(engine, timeout=30.0):
    deadline = time.monotonic() + timeout
    while engine.stats()["active_sequences"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return engine.stats()


def test_a_batch_gives_each_request_what_it_gets_alone(smollm2, engine):
    prompts = [chat_prompt_ids(smollm2.tokenizer, q) for q in QUESTIONS]
    alone = [collect(engine.submit(p, params(smollm2)))[0] for p in prompts]
    together = [engine.submit(p, params(smollm2)) for p in prompts]
    batched = [collect(r)[0] for r in together]
    # fp32 rows of a (3, d) matmul differ from the (1, d) ones by ~1e-6 relative at most; a
    # greedy token flips only at a top-2 margin that small. A leak between rows (another
    # sequence's pages, positions or tokens) changes whole answers.
    assert batched == alone
    assert "Paris" in smollm2.tokenizer.decode(batched[0])
    assert len({tuple(t) for t in batched}) == 3


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(smollm2, engine):
    prompt = chat_prompt_ids(smollm2.tokenizer, "Tell me a story about a cat.")
    sampled = dict(temperature=0.9, top_p=0.95, top_k=50, min_p=0.02)
    # The prompt's blocks cached first, so that every request below is a hit: a cold prefill
    # attends its prompt in fp16, a hit over the cached pages' codes, so their logits differ
    # (run by itself, alone was cold and again a hit: their 15th tokens differed, the same
    # two tokens as in the H100's xdist run). A request of max_tokens=1 caches no block.
    collect(engine.submit(prompt, params(smollm2)))
    alone = collect(engine.submit(prompt, params(smollm2, seed=7, **sampled)))[0]
    again = collect(engine.submit(prompt, params(smollm2, seed=7, **sampled)))[0]
    others = [engine.submit(chat_prompt_ids(smollm2.tokenizer, q), params(smollm2))
              for q in QUESTIONS]
    batched = collect(engine.submit(prompt, params(smollm2, seed=7, **sampled)))[0]
    for r in others:
        collect(r)
    assert alone == again == batched
    different = [collect(engine.submit(prompt, params(smollm2, seed=s, **sampled)))[0]
                 for s in (1, 2, 3)]
    assert any(d != alone for d in different)


def test_repeated_prompt_shares_pages_from_memory(smollm2, engine):
    prompt = document_prompt(smollm2, 150, "Who wrote this license?")
    cold = engine.submit(prompt, params(smollm2, max_tokens=8))
    cold_tokens, cold_lp, _ = collect(cold)
    hit = engine.submit(prompt, params(smollm2, max_tokens=8))
    hit_tokens, hit_lp, _ = collect(hit)
    # The chat template's system preamble (one page) may be shared from earlier requests.
    assert cold.memory_tokens <= 32 and cold.computed_tokens == len(prompt) - cold.memory_tokens
    page = engine.pool.block_size
    assert hit.memory_tokens == (len(prompt) - 1) // page * page > cold.memory_tokens
    assert hit.computed_tokens == len(prompt) - hit.memory_tokens
    # Memory hits attend the prefix through its TurboQuant codes: close to cold, not identical.
    # The first token's log-probability moves by what 0.30x-of-fp16 codes move it (KL ~0.007
    # on average, docs/fragments/quality.md); a wrong prefix (another prompt's pages, shifted
    # positions) moves it by whole nats.
    assert hit_tokens[0] == cold_tokens[0]
    assert abs(hit_lp[0] - cold_lp[0]) < 0.25


def test_cancel_frees_the_pages_at_once(smollm2, engine):
    before = engine.stats()["totals"]["cancelled"]
    request = engine.submit(chat_prompt_ids(smollm2.tokenizer, "Count from 1 to 500."),
                            params(smollm2, max_tokens=400))
    for _ in range(2):
        assert isinstance(request.events.get(timeout=60), (TokenEvent, tuple))
    assert engine.stats()["pool_bytes_used"] > 0
    request.cancel()
    stats = wait_idle(engine, timeout=5)
    assert stats["active_sequences"] == 0 and stats["pool_bytes_used"] == 0
    assert stats["totals"]["cancelled"] == before + 1
    assert len(request.generated) < 50


def test_admission_waits_for_pages_instead_of_failing(smollm2):
    probe = Engine(smollm2, None, ServingConfig(pool_bytes=8 << 20))
    block_bytes = probe.pool.block_bytes
    probe.close()
    prompts = [chat_prompt_ids(smollm2.tokenizer, q) for q in QUESTIONS[:2]]
    worst = max(-(-(len(p) + 12) // 16) for p in prompts)
    # Room for one request's worst case, not two.
    eng = Engine(smollm2, None, ServingConfig(pool_bytes=(worst + 1) * block_bytes))
    try:
        first, second = (eng.submit(p, params(smollm2, max_tokens=12)) for p in prompts)
        collect(first)
        collect(second)
        assert second.first_token_at > first.finished_at  # it waited for the pages
        assert eng.stats()["totals"]["completed"] == 2
        with pytest.raises(InvalidArgument, match="pool"):
            eng.submit(prompts[0], params(smollm2, max_tokens=4096))
    finally:
        eng.close()


def test_full_queue_and_overlong_prompt_are_refused(smollm2):
    eng = Engine(smollm2, None, ServingConfig(pool_bytes=16 << 20, queue_size=1, max_batch=1))
    try:
        prompt = chat_prompt_ids(smollm2.tokenizer, QUESTIONS[0])
        running = eng.submit(prompt, params(smollm2, max_tokens=8))
        with pytest.raises(ResourceExhausted):
            eng.submit(prompt, params(smollm2, max_tokens=8))
        collect(running)
        collect(eng.submit(prompt, params(smollm2, max_tokens=2)))  # room again
        with pytest.raises(InvalidArgument, match="context"):
            eng.submit([1] * eng.context_tokens, params(smollm2, max_tokens=1))
        assert eng.stats()["totals"]["rejected"] == 1
    finally:
        eng.close()


@pytest.mark.parametrize("block", [128, 1024])
def test_daemon_hit_reproduces_the_cold_run_after_a_restart(smollm2, daemon, block):
    """Also with a store block longer than the prompt (CUDA's default is 2048): the prompt is
    then one trailing partial block, and the daemon must still be asked for it."""
    config = ServingConfig(pool_bytes=64 << 20, store_block=block, prefill_chunk=64,
                           exact_hits=True)
    prompt = document_prompt(smollm2, 340, "Who wrote this license?")
    assert len(prompt) > 2 * 128 and (block == 128 or len(prompt) < block)
    with KvStoreClient(daemon.address) as client:
        first = Engine(smollm2, client, config)
        cold = first.submit(prompt, params(smollm2, max_tokens=12))
        cold_tokens, _, _ = collect(cold)
        assert cold.daemon_tokens == 0
        client.wait_uploads(timeout=60)
        first.close()
        # A new engine: an empty pool, as after a restart; the daemon kept the blocks.
        second = Engine(smollm2, client, config)
        try:
            hit = second.submit(prompt, params(smollm2, max_tokens=12))
            hit_tokens, _, _ = collect(hit)
        finally:
            second.close()
    assert (len(prompt) - 1) % block >= MIN_PARTIAL_TOKENS  # it has a partial block to store
    assert hit.daemon_tokens == len(prompt) - 1  # its trailing partial block included
    assert hit.memory_tokens == 0
    assert hit_tokens == cold_tokens


def test_requests_sharing_a_prefix_in_flight_wait_for_its_pages(smollm2, engine):
    """Agents with one system prompt arriving together: the first computes it, the others
    wait for its pages and share them, while a request with another prompt goes ahead."""
    from tqstore.demo import demo_document

    system = " ".join(demo_document().split(" ")[2000:2300])
    asks = [chat_prompt_ids(smollm2.tokenizer, q, system=system) for q in QUESTIONS]
    other = chat_prompt_ids(smollm2.tokenizer, "Say hello.")
    first, second, unrelated, third = (engine.submit(p, params(smollm2, max_tokens=4))
                                       for p in (asks[0], asks[1], other, asks[2]))
    for r in (first, second, unrelated, third):
        collect(r)
    assert first.computed_tokens >= 256
    for r in (second, third):
        assert r.memory_tokens >= first.computed_tokens - 64, (r.memory_tokens, first.computed_tokens)
        assert r.first_token_at > first.first_token_at
    assert unrelated.first_token_at < second.first_token_at  # it was not held behind them


def test_requests_with_the_prefix_on_the_daemon_do_not_wait_for_each_other(smollm2, daemon):
    config = ServingConfig(pool_bytes=64 << 20, store_block=128)
    first_ask = document_prompt(smollm2, 330, "Who wrote this license?")
    with KvStoreClient(daemon.address) as client:
        warm = Engine(smollm2, client, config)
        collect(warm.submit(first_ask, params(smollm2, max_tokens=2)))
        client.wait_uploads(timeout=60)
        warm.close()
        fresh = Engine(smollm2, client, config)  # empty pool, as after a restart
        try:
            asks = [document_prompt(smollm2, 330, q)
                    for q in ("Can I sell copies?", "Is there a warranty?")]
            requests = [fresh.submit(p, params(smollm2, max_tokens=2)) for p in asks]
            for r in requests:
                collect(r)
        finally:
            fresh.close()
    # Both take the document from the daemon; neither is held for the other's pages.
    assert all(r.daemon_tokens >= 256 and r.memory_tokens == 0 for r in requests), \
        [(r.daemon_tokens, r.memory_tokens) for r in requests]


def test_agents_sharing_a_system_prompt_all_reach_the_daemon(smollm2, daemon):
    """With a daemon, a request held for another's system prompt starts from the daemon's exact
    blocks once they are uploaded, so its own task's blocks are uploaded too: after a restart
    every agent's whole prompt (its full blocks) is a daemon hit."""
    from tqstore.demo import demo_document

    words = demo_document().split(" ")
    system = " ".join(words[3000:3300])
    tasks = [" ".join(words[a:a + 150]) for a in (4000, 4500, 5000)]
    prompts = [chat_prompt_ids(smollm2.tokenizer, t, system=system) for t in tasks]
    config = ServingConfig(pool_bytes=64 << 20, store_block=128)
    with KvStoreClient(daemon.address) as client:
        first = Engine(smollm2, client, config)
        try:
            turn1 = [first.submit(p, params(smollm2, max_tokens=2)) for p in prompts]
            for r in turn1:
                collect(r)
            client.wait_uploads(timeout=60)
        finally:
            first.close()
        assert turn1[0].computed_tokens == len(prompts[0])
        assert all(r.daemon_tokens >= 256 for r in turn1[1:]), \
            [(r.daemon_tokens, r.memory_tokens) for r in turn1]
        replay = Engine(smollm2, client, config)
        try:
            again = [replay.submit(p, params(smollm2, max_tokens=2)) for p in prompts]
            for r in again:
                collect(r)
        finally:
            replay.close()
    assert [r.daemon_tokens for r in again] == [_restorable(len(p), 128) for p in prompts]


def _restorable(prompt_tokens: int, block: int) -> int:
    """What a daemon that has seen a prompt restores of it: all but the last token, less a
    trailing partial block too short to be stored."""
    stored = prompt_tokens - 1
    return stored if stored % block >= MIN_PARTIAL_TOKENS else stored // block * block


def _first_token(request, timeout=120.0) -> list:
    """Events of a request up to its first token (kept, to be finished with collect_rest)."""
    events = []
    while True:
        event = request.events.get(timeout=timeout)
        events.append(event)
        if isinstance(event, TokenEvent) or event[0] in ("done", "error"):
            return events


def test_a_prompt_arriving_mid_decode_carries_the_decode_steps_and_stays_exact(smollm2, daemon):
    """A prompt that arrives while another request decodes prefills in mixed steps (its chunks
    carry the running request's decode rows: tqstore.paged.mixed), and stays exact: a daemon
    hit after a restart reproduces it, and it equals the prompt served alone, unmixed."""
    import dataclasses

    config = ServingConfig(pool_bytes=64 << 20, store_block=128, prefill_chunk=64,
                           exact_hits=True, mixed_steps=True)
    arriving = document_prompt(smollm2, 340, "Who wrote this license?")
    story = chat_prompt_ids(smollm2.tokenizer, "Tell me a long story about a lighthouse.")
    with KvStoreClient(daemon.address) as client:
        first = Engine(smollm2, client, config)
        try:
            runner = first.submit(story, params(smollm2, max_tokens=48))
            _first_token(runner)  # decoding now
            mixed = first.submit(arriving, params(smollm2, max_tokens=12))
            mixed_tokens, _, _ = collect(mixed)
            runner_tokens = len(collect(runner)[0]) + 1
            client.wait_uploads(timeout=60)
            mixed_steps = first.stats()["totals"]["mixed_steps"]
        finally:
            first.close()
        assert runner_tokens == 48 and mixed.computed_tokens == len(arriving)
        if exact_rows(smollm2.model, 64, ServingConfig.max_batch):
            # Its 5 full chunks of 64 (the sixth, the remainder, may be short) rode along.
            assert mixed_steps >= 5
        else:
            # This backend's rows depend on the row count (CUDA's GEMM tiles): an exact
            # request's chunks run alone, or its daemon blocks would not match a cold run.
            assert mixed_steps == 0
        second = Engine(smollm2, client, config)
        try:
            hit = second.submit(arriving, params(smollm2, max_tokens=12))
            hit_tokens, _, _ = collect(hit)
        finally:
            second.close()
    alone_engine = Engine(smollm2, None, dataclasses.replace(config, mixed_steps=False))
    try:
        alone_tokens, _, _ = collect(alone_engine.submit(arriving, params(smollm2, max_tokens=12)))
        assert alone_engine.stats()["totals"]["mixed_steps"] == 0
    finally:
        alone_engine.close()
    assert hit.daemon_tokens == len(arriving) - 1
    assert hit_tokens == mixed_tokens == alone_tokens
