"""Mixed steps (tqstore.paged.mixed) on the real SmolLM2: a prefill chunk that carries the
decode rows gives the chunk's sequence what the chunk alone gives (bit for bit where the
backend's rows are exact: the daemon's hits depend on it) and the decode rows what a batched
step gives."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import tqstore  # noqa: F401  (BLAS preload before mlx)
from tqstore.errors import InvalidArgument
from tqstore.models.smollm2 import load_smollm2
from tqstore.paged import CachePolicy, install, make_prompt_cache, pool_for_model, uninstall
from tqstore.paged.batch import batch_caches
from tqstore.paged.mixed import _rows_equal, exact_rows, logits_head, mixed_caches


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_smollm2()
    install(loaded.model)
    yield loaded
    uninstall(loaded.model)  # routing is process-wide: later tests expect it off


def _pool(loaded):
    return pool_for_model(loaded.model, policy=CachePolicy.default(loaded.fingerprint),
                          budget_bytes=64 << 20, model_fingerprint=loaded.fingerprint)


def _ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, 40000, n).tolist()


def _decoding(model, pool, seed: int, prompt: int, steps: int):
    """A sequence prefilled alone and decoded `steps` greedy tokens: (caches, next token)."""
    ids = _ids(seed, prompt)
    caches = make_prompt_cache(pool)
    caches[0].sequence.append_token_ids(ids)
    caches[0].sequence.prompt_length = prompt
    logits = model(mx.array([ids]), cache=caches)
    token = int(mx.argmax(logits[0, -1]).item())
    for _ in range(steps):
        caches[0].sequence.append_token_ids([token])
        logits = model(mx.array([[token]]), cache=caches)
        token = int(mx.argmax(logits[0, -1]).item())
    mx.eval([c.state for c in caches])
    return caches, token


def _scene(loaded, pool, chunks: list[int], over_pages: bool):
    """Two decoding sequences, and a third whose last chunk is still to run: fresh (a prompt
    prefilled chunk by chunk) or over pages (a later turn's tokens after its decode)."""
    model = loaded.model
    decoders = [_decoding(model, pool, seed, 70 + 9 * seed, 3) for seed in (1, 2)]
    if over_pages:
        caches, _ = _decoding(model, pool, 3, 90, 2)
        ids = _ids(4, chunks[-1])
        caches[0].sequence.append_token_ids(ids)
    else:
        ids = _ids(5, sum(chunks))
        caches = make_prompt_cache(pool)
        caches[0].sequence.append_token_ids(ids)
        caches[0].sequence.prompt_length = len(ids)
        for a, b in zip(np.cumsum([0] + chunks[:-1]), np.cumsum(chunks[:-1])):
            model(mx.array([ids[a:b]]), cache=caches)
            mx.eval([c.state for c in caches])
    return decoders, caches, ids[len(ids) - chunks[-1]:]


def _kv(caches):
    """The sequence's newest K/V of every layer: the fp16 prefill copy, else the tail."""
    out = []
    for c in caches:
        kv = c.prefill_kv()
        out.append(kv if kv is not None else (c._tail_keys, c._tail_values))
    return out


@pytest.mark.parametrize("over_pages", [False, True], ids=["prefill", "over-pages"])
def test_a_mixed_step_gives_the_chunk_and_the_decode_rows_their_own_results(smollm2, over_pages):
    model = smollm2.model
    body, head = logits_head(model)
    chunks = [64, 40] if not over_pages else [20]
    # Alone: the chunk, then a batched decode step of the two decoders.
    decoders, caches, chunk = _scene(smollm2, _pool(smollm2), chunks, over_pages)
    alone_logits = model(mx.array([chunk]), cache=caches)[0, -1]
    for d, token in decoders:
        d[0].sequence.append_token_ids([token])
    batch = batch_caches([d for d, _ in decoders])
    step_logits = model(mx.array([[t] for _, t in decoders]), cache=batch)[:, -1]
    alone_kv = _kv(caches)
    mx.eval(alone_logits, step_logits, alone_kv, [c.state for c in batch])
    # Mixed: the same scene built again, one forward pass.
    decoders, caches, chunk = _scene(smollm2, _pool(smollm2), chunks, over_pages)
    for d, token in decoders:
        d[0].sequence.append_token_ids([token])
    T = len(chunk)
    mixed = mixed_caches(caches, [d for d, _ in decoders], T)
    hidden = body(mx.array([[t] for t in chunk] + [[t] for _, t in decoders]), cache=mixed)
    logits = head(mx.concatenate([hidden[T:, 0], hidden[T - 1:T, 0]]))
    mixed_kv = _kv(caches)
    mx.eval(logits, mixed_kv, [c.state for c in mixed])

    # The decode rows: what the batched step gives, within the rounding of matmuls of another
    # row count (this VM: ~1e-6 relative; the H100's CUDA GEMMs: up to 0.013 on logits of
    # ~20); a row fed another sequence's pages or position moves logits by whole units.
    np.testing.assert_allclose(np.array(logits[:2]), np.array(step_logits), atol=0.05)
    np.testing.assert_allclose(np.array(logits[2]), np.array(alone_logits), atol=0.05)
    assert np.array_equal(np.argmax(np.array(logits[:2]), -1), np.argmax(np.array(step_logits), -1))
    # The chunk's K/V: bit for bit where this backend's rows are exact (this VM's OpenBLAS:
    # they are), else within rounding.
    exact = exact_rows(model, 256, 16)
    for (ka, va), (km, vm) in zip(alone_kv, mixed_kv):
        for a, m in ((ka, km), (va, vm)):
            a, m = np.array(a.astype(mx.float32)), np.array(m.astype(mx.float32))
            if exact and not over_pages:
                assert np.array_equal(a, m)
            else:
                # fp16 K/V of matmuls of another row count: a few fp16 ulps.
                np.testing.assert_allclose(a, m, rtol=1e-2, atol=5e-2)


def test_exact_rows_catches_a_row_count_dependence(smollm2):
    x = mx.array(np.random.default_rng(0).standard_normal((40, 8)), dtype=mx.float32)
    w = mx.array(np.random.default_rng(1).standard_normal((8, 8)), dtype=mx.float32)
    # Elementwise: row-independent by construction on every backend (a matmul may not be).
    assert _rows_equal(lambda a: a * 2.0 + 1.0, x, 32)
    # A kernel whose rows depend on how many rows share the call (a planted bug).
    assert not _rows_equal(lambda a: a @ w + 1e-3 * a.shape[0], x, 32)


def test_a_mixed_step_refuses_shapes_it_cannot_carry(smollm2):
    pool = _pool(smollm2)
    caches = make_prompt_cache(pool)
    with pytest.raises(InvalidArgument):
        mixed_caches(caches, [], 8)
    with pytest.raises(InvalidArgument):
        mixed_caches(caches, [make_prompt_cache(pool)], 1)
