"""The serving engine's live figures: GET /v1/stats and `tqstore inspect --addr` of the endpoint
(active sequences, queue depth, pool bytes, live KV tokens, cached tokens by tier, the recent
decode rate, which kernels serve).

Runs on an HTTP thread while the engine thread steps: it reads plain Python numbers and lists
only (copied before use), never an MLX array: touching a cache's arrays here would build MLX
graphs on a thread whose stream the engine cannot evaluate.
"""

from __future__ import annotations

import time
from typing import Any

from tqstore.metal import dispatch

# Decode steps within this many seconds make the decode rate.
RATE_WINDOW_S = 10.0


def engine_stats(engine: Any) -> dict[str, Any]:
    """The figures of a tqstore.serving.engine.Engine, as one JSON-ready dict."""
    now = time.perf_counter()
    recent = [(t, n) for t, n in list(engine._rate) if now - t <= RATE_WINDOW_S]
    tps = 0.0
    if len(recent) > 1:
        tps = sum(n for _, n in recent[1:]) / max(recent[-1][0] - recent[0][0], 1e-9)
    active = list(engine._active)
    return {
        "active_sequences": len(active),
        "decoding": sum(r.state == "decode" for r in active),
        "prefilling": sum(r.state == "prefill" for r in active),
        "queue_depth": engine._queued - engine._admitted,
        "pool_bytes_used": engine.pool.used_bytes(),
        "pool_bytes_budget": (engine.pool.num_blocks - 1) * engine.pool.block_bytes,
        "pool_blocks_free": engine.pool.block_pool.num_free_blocks,
        # Plain ints only (the module docstring says why).
        "kv_tokens_live": sum(c[0].offset for c in (r.caches for r in active) if c),
        "kv_fp16_bytes_per_token": engine.pool.fp16_bytes_per_token(),
        "kv_bytes_per_token": round(engine.pool.bytes_per_token(), 1),
        "decode_tokens_per_s": round(tps, 2),
        "cached_tokens": {"memory": engine.totals["memory_tokens"],
                          "daemon": engine.totals["daemon_tokens"],
                          "computed": engine.totals["computed_tokens"]},
        "totals": dict(engine.totals),
        "daemon": "none" if engine.client is None else engine.client.config.address,
        "healthy": engine.healthy,
        # Which kernels serve (and any that failed their first-use self-check).
        "attention_path": dispatch.active_backend(),
        "kernels": dispatch.kernel_report(),
    }
