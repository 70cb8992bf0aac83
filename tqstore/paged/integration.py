"""The one integration point between stock mlx-lm models and paged decode attention.

mlx-lm model modules do ``from .base import scaled_dot_product_attention`` at import time and
call it as ``scaled_dot_product_attention(q, k, v, cache=cache, scale=, mask=)``. ``install(model)``
replaces that name in the module of every attention layer of ``model`` with ``dispatch``, which
routes to ``PagedLayerCache.attend`` only when the cache is ours and holds a pending decode
step; a multi-token step of one of our caches (a prefill chunk) goes to
``dispatch.multi_token_attention`` where that serves (the CPU: MLX's softmax there is slow);
everything else calls the original function unchanged (other caches, fp16 layers, the GPU).

Scope and safety: the replacement is per model MODULE (e.g. mlx_lm.models.llama), so other models
of that architecture in the process also pass through ``dispatch``, which is a no-op for them.
``install`` is idempotent; ``uninstall`` restores the originals. Without ``install`` our caches
still give the same results through stock SDPA over dequantized pages, only slower.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from tqstore.metal import dispatch as kernels
from tqstore.paged.batch import BatchedLayerCache
from tqstore.paged.cache import PagedLayerCache
from tqstore.paged.mixed import MixedLayerCache

# The caches whose decode steps go to their own attend(): one sequence, a batch of them, or a
# batch carried by a prefill chunk (its rows are one token each).
_ROUTED = (PagedLayerCache, BatchedLayerCache, MixedLayerCache)

_ATTR = "scaled_dot_product_attention"
_originals: dict[str, Callable[..., mx.array]] = {}


def _make_dispatch(original: Callable[..., mx.array]) -> Callable[..., mx.array]:
    def dispatch(queries: mx.array, keys: mx.array, values: mx.array, cache: Any,
                 scale: float, mask: Any = None, sinks: Any = None, **kwargs: Any) -> mx.array:
        if (isinstance(cache, _ROUTED) and cache.decode_pending and sinks is None
                and queries.shape[2] == 1 and (mask is None or isinstance(mask, str))):
            return cache.attend(queries, scale, mask)
        if isinstance(cache, PagedLayerCache) and sinks is None and queries.shape[2] > 1:
            out = kernels.multi_token_attention(queries, keys, values, scale, mask)
            if out is not None:
                return out
        if sinks is not None:
            kwargs["sinks"] = sinks
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, **kwargs)

    dispatch.tqstore_dispatch = True  # type: ignore[attr-defined]
    return dispatch


def _attention_modules(model: nn.Module) -> set[str]:
    names = set()
    for _, module in model.named_modules():
        mod_name = type(module).__module__
        if hasattr(sys.modules.get(mod_name), _ATTR):
            names.add(mod_name)
    return names


def install(model: nn.Module) -> list[str]:
    """Route paged decode attention for ``model``; returns the patched module names."""
    patched = []
    for name in sorted(_attention_modules(model)):
        module = sys.modules[name]
        current = getattr(module, _ATTR)
        if not getattr(current, "tqstore_dispatch", False):
            _originals[name] = current
            setattr(module, _ATTR, _make_dispatch(current))
        patched.append(name)
    if not patched:
        raise ValueError(f"{type(model).__name__}: no module calls {_ATTR}; cannot route attention")
    PagedLayerCache.attention_routed = True
    return patched


def uninstall(model: nn.Module) -> None:
    for name in _attention_modules(model) | set(_originals):
        if name in _originals and name in sys.modules:
            setattr(sys.modules[name], _ATTR, _originals.pop(name))
    PagedLayerCache.attention_routed = bool(_originals)
