"""The generator-side paged KV cache: block pool, TurboQuant arenas, decode attention over
compressed pages, and the mlx-lm adapter (see docs/fragments/paged.md).

Typical use with a stock mlx-lm model:
    pool = pool_for_model(model, policy=CachePolicy(), model_fingerprint=fp)
    install(model)                      # the one attention integration point
    cache = make_prompt_cache(pool, prompt_ids)
    mlx_lm.generate(model, tokenizer, prompt_ids[cache[0].offset:], prompt_cache=cache)
"""

from tqstore.paged.block_pool import NULL_BLOCK_ID, BlockPool, FreeBlockQueue, KVBlock
from tqstore.paged.cache import (PagedLayerCache, make_prompt_cache, model_kv_layout,
                                 pool_for_model, release_prompt_cache)
from tqstore.paged.integration import install, uninstall
from tqstore.paged.kv_pool import DEFAULT_BLOCK_SIZE, PagedKVPool
from tqstore.paged.policy import FP16_POLICY, CachePolicy
from tqstore.paged.sequence import Sequence

__all__ = [
    "DEFAULT_BLOCK_SIZE", "FP16_POLICY", "NULL_BLOCK_ID", "BlockPool", "CachePolicy",
    "FreeBlockQueue", "KVBlock", "PagedKVPool", "PagedLayerCache", "Sequence", "install",
    "make_prompt_cache", "model_kv_layout", "pool_for_model", "release_prompt_cache", "uninstall",
]
