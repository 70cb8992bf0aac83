"""Stock mlx-lm architectures (llama, qwen2, qwen3, mistral) run on our caches unmodified.

Tiny random-weight models from mlx-lm's own classes: fp16-policy caches give mlx-lm KVCache's
logits; with TurboQuant pages, the routed decode path (install) gives the same logits as stock
SDPA over the dequantized pages (the unrouted fallback), and is really taken.
"""

import numpy as np
import pytest

import tqstore  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import _get_classes
from tqstore.codec import CodecConfig
from tqstore.metal import dispatch
from tqstore.paged import (FP16_POLICY, CachePolicy, PagedLayerCache, install, make_prompt_cache,
                           pool_for_model, uninstall)

from tests.seeding import seeded_rng
from tests.tolerance import ATTENTION_TF32, rtol

BASE = dict(hidden_size=64, num_hidden_layers=3, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97, max_position_embeddings=512,
            tie_word_embeddings=True, rope_theta=10000.0)
CONFIGS = {
    "llama": dict(model_type="llama", rope_traditional=True),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=32),
    "mistral": dict(model_type="mistral", head_dim=16),  # mlx-lm maps mistral to llama.py
}


def tiny_model(name: str):
    config = {**BASE, **CONFIGS[name]}
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(int(seeded_rng().integers(1 << 30)))
    model = model_cls(args_cls.from_dict(config))
    mx.eval(model.parameters())
    return model


def run(model, caches, prompt, steps):
    """Prefill the prompt in two chunks, then greedy-decode ``steps`` tokens; all logits."""
    out = [model(mx.array(prompt[:7])[None], cache=caches)]
    out.append(model(mx.array(prompt[7:])[None], cache=caches))
    tok = mx.argmax(out[-1][:, -1], axis=-1)
    for _ in range(steps):
        out.append(model(tok[None], cache=caches))
        tok = mx.argmax(out[-1][:, -1], axis=-1)
        mx.eval(tok)
    return [np.array(o[0, -1], dtype=np.float64) for o in out]


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp16_policy_matches_mlx_lm_kvcache(rng, name):
    model = tiny_model(name)
    install(model)
    prompt = [int(t) for t in rng.integers(3, 97, 19)]
    want = run(model, [KVCache() for _ in model.layers], prompt, 6)
    pool = pool_for_model(model, policy=FP16_POLICY, budget_bytes=1 << 20, block_size=4)
    got = run(model, make_prompt_cache(pool, prompt), prompt, 6)
    for g, w in zip(got, want):
        assert rel(g, w) < 2e-3  # fp16 storage of K/V vs the model's fp32


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_routed_decode_equals_stock_sdpa_over_dequantized_pages(rng, device, name, monkeypatch):
    model = tiny_model(name)
    prompt = [int(t) for t in rng.integers(3, 97, 21)]
    policy = CachePolicy(codec=CodecConfig(4, 4), fp16_first=1)  # layer 0 dense, 1-2 paged
    uninstall(model)
    pool = pool_for_model(model, policy=policy, budget_bytes=1 << 20, block_size=8)
    fallback = run(model, make_prompt_cache(pool, prompt), prompt, 5)

    # The prefill's multi-token steps take MLX's attention in both runs: on the CPU the routed
    # one would otherwise take the C softmax (dispatch.multi_token_attention), whose ~1e-6
    # differences can flip a token's 4-bit code (seed 8745619: 7.7e-3 apart).
    monkeypatch.setattr(dispatch, "multi_token_attention", lambda *a, **k: None)
    calls = []
    original = PagedLayerCache.attend
    monkeypatch.setattr(PagedLayerCache, "attend",
                        lambda self, *a, **k: calls.append(self.layer) or original(self, *a, **k))
    patched = install(model)
    assert patched and all(n.startswith("mlx_lm.models.") for n in patched)
    # A fresh pool: the first one now holds this prompt's blocks and would share them.
    pool = pool_for_model(model, policy=policy, budget_bytes=1 << 20, block_size=8)
    routed = run(model, make_prompt_cache(pool, prompt), prompt, 5)
    # 5 decode steps x 2 TurboQuant layers; the prefill chunks and fp16 layer 0 are not routed.
    assert sorted(calls) == [1] * 5 + [2] * 5
    for r, f in zip(routed, fallback):  # the same model, attention computed two ways
        assert rel(r, f) < rtol(1e-4, ATTENTION_TF32)
    uninstall(model)
    quantized_diff = max(rel(r, w) for r, w in zip(routed, run(
        model, [KVCache() for _ in model.layers], prompt, 5)))
    assert quantized_diff > 1e-6  # the pages really are quantized


def test_dispatch_passes_other_caches_through(rng):
    model = tiny_model("qwen3")
    install(model)
    install(model)  # idempotent
    prompt = [int(t) for t in rng.integers(3, 97, 12)]
    a = run(model, [KVCache() for _ in model.layers], prompt, 3)
    uninstall(model)
    b = run(model, [KVCache() for _ in model.layers], prompt, 3)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
