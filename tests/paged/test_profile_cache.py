"""Paged cache with a quality profile: per-layer widths, and decode over residual keys equals
attention over the full (mean added back) keys: softmax ignores q . mean."""

import numpy as np
import mlx.core as mx

from tqstore.codec import CodecConfig
from tqstore.codec.profile import QualityProfile
from tqstore.paged import CachePolicy, make_prompt_cache


def test_decode_over_residual_keys_equals_attention_over_full_keys(rng, small_pool):
    H, D, L = 2, 16, 2
    means = rng.standard_normal((L, H, D)) * 4  # a large mean: most of the key energy
    profile = QualityProfile.build("test-model", means, key_bits=(4, 6), value_bits=(3, 4))
    pool = small_pool(num_layers=L, heads=H, head_dim=D,
                      policy=CachePolicy(codec=CodecConfig(6, 4, profile=profile)))
    assert [a.key_codec.bits for a in pool.arenas] == [4, 6]
    assert [a.key_codes.shape[-1] for a in pool.arenas] == [8, 12]
    assert pool.block_bytes == 4 * H * ((8 + 2 + 6 + 2) + (12 + 2 + 8 + 2))
    caches = make_prompt_cache(pool)
    T = 11
    for layer, cache in enumerate(caches):
        k = mx.array((rng.standard_normal((1, H, T, D)) + means[layer][None, :, None]).astype(np.float32))
        v = mx.array(rng.standard_normal((1, H, T, D)).astype(np.float32))
        cache.update_and_fetch(k[:, :, :10], v[:, :, :10])
        cache.finish_prefill()
        rk, _ = cache.update_and_fetch(k[:, :, 10:], v[:, :, 10:])  # one decode token
        assert cache.decode_pending
        q = mx.array(rng.standard_normal((1, 4, 1, D)).astype(np.float32))
        got = np.array(cache.attend(q, 0.25))[0, :, 0]
        arena = cache.arena
        qk, qv = arena.quantized(cache.sequence.block_table()[0], T)
        full_k = np.array(arena.key_codec.dequantize(qk), dtype=np.float64)
        vals = np.array(arena.value_codec.dequantize(qv), dtype=np.float64)
        # update_and_fetch hands SDPA the residual keys: the full keys minus the mean.
        assert np.allclose(np.array(rk[0]) + means[layer][:, None].astype(np.float16), full_k, atol=1e-4)
        for h in range(4):
            s = 0.25 * full_k[h // 2] @ np.array(q, dtype=np.float64)[0, h, 0]
            p = np.exp(s - s.max())
            want = (p / p.sum()) @ vals[h // 2]
            assert np.allclose(got[h], want, rtol=1e-4, atol=1e-5), (layer, h)
