"""Generation with the daemon in the loop: the hit path end to end.

For a prompt: Lookup the longest cached prefix, Fetch it as fp16, restore it into a fresh paged
cache, prefill only the rest (attending to the restored prefix), decode over the compressed
pages, and Put the new full blocks' fp16 KV in the background.

Why a hit reproduces a cold run bit for bit (tested on SmolLM2):
- The store holds the exact fp16 K/V a cold prefill computed, and the paged cache keeps prefill
  K/V in fp16 too, so the restored prefix equals what a cold run holds at that point.
- Prefill runs in chunks of exactly one store block (prefill_step_size = block_size) aligned at
  token 0, so a hit of h blocks starts the rest at a chunk boundary the cold run also has: every
  chunk then sees identical inputs and shapes, hence identical float results (a matmul's result
  may depend on its shape, so a cold run prefilled in 2048-token chunks would not match).
- Quantization happens once when prefill ends and is deterministic per vector. The generator
tells the cache the prompt length, so the last prompt token (mlx-lm feeds it as a single-token
step) still attends in fp16 and the quantization pass runs while the first token is already
being returned: it is not part of TTFT.
The last prompt token is always left to the model, so at most (len(prompt) - 1) // block_size
blocks are restored, and full blocks are uploaded from the whole prompt's fp16 K/V.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm import stream_generate

from tqstore.client import KvStoreClient
from tqstore.errors import NotFound, TqstoreError, Unavailable
from tqstore.models.loader import LoadedModel
from tqstore.paged import CachePolicy, install, make_prompt_cache, pool_for_model, release_prompt_cache
from tqstore.paged.cache import model_kv_layout
from tqstore.prefix_hash import Namespace
from tqstore.ssd.store import BlockPayload

DEFAULT_STORE_BLOCK = 256  # tokens per SSD block: oMLX and LMCache use 256 too


@dataclass
class GenerationReport:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    hit_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    cache_status: str  # "hit", "miss", "no daemon", "daemon unreachable: ..."
    kv_bytes: int
    kv_fp16_bytes: int
    upload: Future | None = field(default=None, repr=False)


class CachedGenerator:
    """Runs one mlx-lm model with the paged TurboQuant cache and (optionally) the daemon."""

    def __init__(self, loaded: LoadedModel, client: KvStoreClient | None = None, *,
                 policy: CachePolicy | None = None, block_size: int = DEFAULT_STORE_BLOCK,
                 pool_budget_bytes: int = 512 << 20) -> None:
        self.loaded = loaded
        self.client = client
        self.policy = policy or CachePolicy()
        self.block_size = block_size
        layout = model_kv_layout(loaded.model)
        if layout["key_head_dim"] != layout["value_head_dim"]:
            raise TqstoreError("the SSD tier stores one head_dim for K and V")
        self.namespace = Namespace(loaded.fingerprint, layout["num_layers"], layout["num_kv_heads"],
                                   layout["key_head_dim"], block_size)
        self.pool = pool_for_model(loaded.model, policy=self.policy, budget_bytes=pool_budget_bytes,
                                   model_fingerprint=loaded.fingerprint)
        if block_size % self.pool.block_size:
            raise TqstoreError(f"store block {block_size} must be a multiple of the page size "
                               f"{self.pool.block_size}")
        install(loaded.model)

    # -- the daemon side ----------------------------------------------------------------------
    def _fetch_prefix(self, prompt_ids: Sequence[int]) -> tuple[list[BlockPayload], str]:
        if self.client is None:
            return [], "no daemon"
        usable = (len(prompt_ids) - 1) // self.block_size
        try:
            hit = min(self.client.lookup(self.namespace, prompt_ids).hit_blocks, usable)
            if hit == 0:
                return [], "miss"
            blocks = self.client.fetch_fp16(self.namespace, prompt_ids, 0, hit)
        except NotFound:
            return [], "miss"  # evicted between Lookup and Fetch: a miss, never garbage
        except Unavailable as exc:
            return [], f"daemon unreachable: {exc}"
        return blocks, "hit" if blocks else "miss"

    def _restore(self, caches, blocks: list[BlockPayload]) -> None:
        for layer, cache in enumerate(caches):
            keys = np.concatenate([b.keys[layer] for b in blocks], axis=1)
            values = np.concatenate([b.values[layer] for b in blocks], axis=1)
            cache.load_fp16_prefix(mx.array(keys), mx.array(values))

    def _upload_hook(self, caches, prompt_ids: list[int], first_block: int,
                     started: list[Future]) -> Callable:
        """A prefill listener that Puts the new full blocks once every layer reported."""
        per_layer: dict[int, tuple[mx.array, mx.array]] = {}
        num_layers = len(caches)

        def on_prefill(layer: int, keys: mx.array, values: mx.array) -> None:
            per_layer[layer] = (keys, values)
            if len(per_layer) < num_layers:
                return
            full = min(keys.shape[2], len(prompt_ids)) // self.block_size
            if full <= first_block:
                return
            # MLX must not evaluate on two threads at once, so the device-to-host copy of the
            # new blocks happens here on the generating thread (a memcpy: ~20 ms for 4k tokens
            # of SmolLM2); slicing into blocks and the upload run on the upload thread.
            a, b = first_block * self.block_size, full * self.block_size
            host = [(np.array(per_layer[i][0][0, :, a:b]), np.array(per_layer[i][1][0, :, a:b]))
                    for i in range(num_layers)]
            started.append(self.client.put_async_lazy(
                self.namespace, prompt_ids[:b], first_block,
                lambda: _payloads(host, full - first_block, self.block_size)))

        return on_prefill

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], max_tokens: int = 128,
                 on_text: Callable[[str], None] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> GenerationReport:
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise TqstoreError("empty prompt")
        start = time.perf_counter()
        blocks, status = self._fetch_prefix(prompt_ids)
        hit_tokens = len(blocks) * self.block_size
        caches = make_prompt_cache(self.pool)
        caches[0].sequence.prompt_length = len(prompt_ids)
        uploads: list[Future] = []
        try:
            if blocks:
                self._restore(caches, blocks)
            if self.client is not None and not status.startswith("daemon unreachable"):
                caches[0].sequence.prefill_listeners.append(
                    self._upload_hook(caches, prompt_ids, len(blocks), uploads))
            tokens: list[int] = []
            text: list[str] = []
            ttft = decode_tps = 0.0
            for response in stream_generate(
                    self.loaded.model, self.loaded.tokenizer, prompt_ids[hit_tokens:],
                    max_tokens=max_tokens, prompt_cache=caches, prefill_step_size=self.block_size,
                    prompt_progress_callback=progress):
                if not tokens:
                    ttft = time.perf_counter() - start
                tokens.append(response.token)
                text.append(response.text)
                decode_tps = response.generation_tps
                if on_text is not None:
                    on_text(response.text)
            kv_bytes = sum(c.nbytes for c in caches)
            kv_fp16 = sum(c.fp16_nbytes for c in caches)
        finally:
            release_prompt_cache(caches)
        return GenerationReport("".join(text), tokens, len(prompt_ids), hit_tokens, ttft, decode_tps,
                                status, kv_bytes, kv_fp16, uploads[0] if uploads else None)


def _payloads(host: list[tuple[np.ndarray, np.ndarray]], count: int, block: int) -> list[BlockPayload]:
    """`count` fp16 blocks from per-layer host copies (H, count * block, D) of K and V."""
    keys = np.stack([k for k, _ in host])  # (layers, H, T, D)
    values = np.stack([v for _, v in host])
    return [BlockPayload(keys=np.ascontiguousarray(keys[:, :, i * block:(i + 1) * block]),
                         values=np.ascontiguousarray(values[:, :, i * block:(i + 1) * block]))
            for i in range(count)]
