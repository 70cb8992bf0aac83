"""With routing installed, decode steps skip the dense K/V view; a model whose attention is NOT
routed must then fail loudly instead of attending to a placeholder."""

import pytest

import tqstore  # noqa: F401
import mlx.core as mx
from tqstore.errors import InvalidArgument
from tqstore.paged import install, make_prompt_cache, pool_for_model, uninstall

from tests.paged.test_integration import run, tiny_model


def test_unrouted_model_fails_loudly_while_another_is_routed():
    routed, unrouted = tiny_model("llama"), tiny_model("qwen2")
    install(routed)
    try:
        prompt = list(range(1, 14))
        run(routed, make_prompt_cache(pool_for_model(routed)), prompt, steps=2)  # fine
        caches = make_prompt_cache(pool_for_model(unrouted))
        with pytest.raises(InvalidArgument, match="install"):
            run(unrouted, caches, prompt, steps=2)
    finally:
        uninstall(routed)
