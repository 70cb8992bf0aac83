"""Shared check: the daemon's re-quantized blocks equal the pages of a fresh prefill."""

import numpy as np
import mlx.core as mx

from tqstore.paged import make_prompt_cache, release_prompt_cache


def assert_fetched_codes_equal_fresh_pages(model, generator, ids, fetched, block_size) -> None:
    """Prefill ids' fetched blocks into a fresh cache of `generator`'s pool (same chunking as the
    generator), quantize once, and compare every layer's pages with the daemon's codes byte for
    byte (the wire zero-pads narrower per-layer codes to the widest layer)."""
    caches = make_prompt_cache(generator.pool)
    try:
        for start in range(0, len(fetched) * block_size, block_size):
            mx.eval(model(mx.array([ids[start:start + block_size]]), cache=caches))
        # One more token: with an fp16 tail the newest block is quantized only once a later
        # token arrives; this one commits every fetched block (its own value does not matter).
        mx.eval(model(mx.array([[ids[0]]]), cache=caches))
        pages = caches[0].sequence.block_ids
        per_block = block_size // generator.pool.block_size
        for layer, cache in enumerate(caches):
            arena = cache.arena
            mx.eval(arena.arrays)
            for b, block in enumerate(fetched):
                ids_b = mx.array(pages[b * per_block:(b + 1) * per_block])
                for name in ("key_codes", "key_scales", "value_codes", "value_scales"):
                    mine = np.swapaxes(np.array(getattr(arena, name)[ids_b]), 0, 1)
                    theirs = block[name][layer]
                    if name.endswith("codes"):
                        theirs = theirs[..., : mine.shape[-1]]
                    assert mine.reshape(theirs.shape).tobytes() == theirs.tobytes(), (layer, b, name)
    finally:
        release_prompt_cache(caches)
