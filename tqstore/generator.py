"""Generation with the daemon in the loop: the hit path end to end.

For a prompt: Lookup the longest cached prefix, Fetch it as fp16, restore it into a fresh paged
cache, prefill only the rest (attending to the restored prefix), decode over the compressed
pages, and Put the new full blocks' fp16 KV in the background.

fetch_form="turboquant" instead restores the daemon's re-quantized codes straight into the pages
(4x fewer bytes on the wire, no local quantization of the prefix); the rest of the prompt then
attends to the dequantized prefix, so the output is close to a cold run's but not identical, and
such a hit uploads nothing (it holds no fp16). `tqstore bench hit --forms` measures both.

Why a hit reproduces a cold run bit for bit (tested on SmolLM2):
- The store holds the exact fp16 K/V a cold prefill computed, and the paged cache keeps prefill
  K/V in fp16 too, so the restored prefix equals what a cold run holds at that point.
- The generator prefills in chunks of exactly one store block aligned at token 0 (the last
  chunk holds the last prompt token), so a hit of h blocks starts the rest at a chunk boundary
  the cold run also has: every chunk sees identical inputs and shapes, hence identical float
  results (a matmul's result may depend on its shape, so a cold run prefilled in 2048-token
  chunks would not match).
- Quantization happens once, when prefill ends, and is deterministic per vector. The cache is
  told the prompt length, so the whole prompt attends in fp16; the first greedy token comes from
  the last chunk's logits and is returned before the first decode step quantizes the prefill:
  the quantization pass is not part of TTFT (it shows in `first_step_s`).
The last prompt token is always a step of its own (as in mlx-lm), and every chunk before it
ends on a block boundary or at that token. So the store is asked for prompt[:-1]: its full
blocks, then its trailing partial block (the chunk that ends at the last token). Both hold the
floats of a chunk every cold run of a prompt with those tokens computes alike, and a repeated
prompt restores all but its last token (a full hit, the trailing partial block included).
A block that contains the last token is never stored: its floats came from chunks of a
different shape ([start, last) and [last, last+1)) than a longer prompt's cold run (one chunk),
so it would break that run's exactness. When prefill ends, the new full blocks of prompt[:-1]
and its trailing partial block (of at least MIN_PARTIAL_TOKENS) are uploaded from the fp16 K/V.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step

from tqstore.blocks import BlockPayload, PrefixKV
from tqstore.client import KvStoreClient
from tqstore.device_memory import host_to_device, warm_up
from tqstore.errors import NotFound, TqstoreError, Unavailable
from tqstore.metal.attention_kernel import gpu_backend
from tqstore.models.loader import LoadedModel
from tqstore.paged import CachePolicy, install, make_prompt_cache, pool_for_model, release_prompt_cache
from tqstore.paged.cache import model_kv_layout
from tqstore.prefix_hash import Namespace
from tqstore.upload_landing import land, then, warm_up_landing

DEFAULT_STORE_BLOCK = 256  # tokens per SSD block: oMLX and LMCache use 256 too
# On CUDA the prefill chunk (= the store block, for exact hits) decides the cold TTFT: on an H100
# an 8B shape prefills 8k tokens in 0.30 s in 2048-token steps and 0.62 s in 256-token steps
# (stock mlx-lm both; tools/prefill_profile.py, docs/BENCHMARKS.md). A multi-turn hit then
# recomputes up to one block, ~75 ms there.
CUDA_STORE_BLOCK = 2048
# ... but one block must fit one Put piece (a 70B shape's 2048-token block is 671 MB).
MAX_AUTO_BLOCK_BYTES = 256 << 20
# A shorter trailing partial block is not uploaded: a file and a Fetch round trip for it would
# save less than one 16-token prefill chunk (the store's smallest block).
MIN_PARTIAL_TOKENS = 16
_RESTORE_COUNTS = ("staged", "in_place")  # restore_times entries that count, not seconds


@dataclass
class GenerationReport:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    hit_tokens: int
    ttft_s: float
    decode_tokens_per_s: float  # tokens after the first / time since the first
    cache_status: str  # "hit", "miss", "no daemon", "daemon unreachable: ..."
    kv_bytes: int
    kv_fp16_bytes: int
    # The first decode step after the first token: includes quantizing the prefill once.
    first_step_s: float = 0.0
    upload: Future | None = field(default=None, repr=False)
    # Where TTFT went: "fetch" (Lookup and the blocks' bytes), "restore" (into the cache, on the
    # device), "prefill" (the rest of the prompt and the first token).
    phases: dict[str, float] = field(default_factory=dict)


class CachedGenerator:
    """Runs one mlx-lm model with the paged TurboQuant cache and (optionally) the daemon."""

    def __init__(self, loaded: LoadedModel, client: KvStoreClient | None = None, *,
                 policy: CachePolicy | None = None, block_size: int | None = None,
                 pool_budget_bytes: int = 512 << 20, fetch_form: str = "fp16") -> None:
        if fetch_form not in ("fp16", "turboquant"):
            raise TqstoreError(f"fetch_form must be 'fp16' or 'turboquant', got {fetch_form!r}")
        self.loaded = loaded
        self.client = client
        self.policy = policy or CachePolicy.default(loaded.fingerprint)
        layout = model_kv_layout(loaded.model)
        if block_size is not None and block_size <= 0:
            raise TqstoreError(f"store block must be a positive number of tokens, got {block_size}")
        block_size = self.block_size = block_size or default_store_block(layout)
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
        self.staging_cap = client.config.staging_cap if client is not None else 0
        if client is not None:
            # CUDA: the hit's copy kernel and the upload landing's address kernel compiled (and
            # their buffers pinned) before any request.
            warm_up(self.staging_cap)
            warm_up_landing(self.staging_cap)
        # The TurboQuant form needs every layer compressed with the policy's codec; fp16 layers
        # (or an fp16 policy) restore from fp16.
        dense = any(arena.dense for arena in self.pool.arenas)
        self.fetch_form = "fp16" if dense or self.policy.codec is None else fetch_form
        # Where the last restore went (host_to_device's parts, the caches' "eval"; "staged":
        # copies from the staging buffer, "in_place": arrays the fetch read into MLX's own
        # memory): GenerationReport.phases reports the seconds as restore_<part>.
        self.restore_times: dict[str, float] = {}

    # -- the daemon side ----------------------------------------------------------------------
    def fetch_prefix(self, prompt_ids: Sequence[int], better_than: int = 0) -> tuple[list | PrefixKV, str]:
        """The verified prefix of prompt_ids[:-1] (see the module docstring): a PrefixKV (fp16
        form: full blocks and the trailing partial block) or a list of dicts of codes
        (TurboQuant form, re-quantized by the daemon with this generator's codec: full blocks
        only), and a status. Nothing is fetched (status "no gain") unless the hit covers more
        than ``better_than`` tokens (what the caller already holds in memory)."""
        if self.client is None:
            return [], "no daemon"
        stored = list(prompt_ids[:-1])
        exact = self.fetch_form == "fp16"
        try:
            found = self.client.lookup(self.namespace, stored, trailing_partial=exact)
            hit, partial = found.hit_blocks, found.partial_tokens
            if hit == 0 and partial == 0:
                return [], "miss"
            if hit * self.block_size + partial <= better_than:
                return [], "no gain"
            if not exact:
                blocks = self.client.fetch_turboquant(self.namespace, stored,
                                                      self.policy.codec, 0, hit)
            else:
                blocks = self.client.fetch_fp16_prefix(self.namespace, stored, 0, hit,
                                                       trailing_partial=partial > 0, staged=True)
        except NotFound:
            return [], "miss"  # evicted between Lookup and Fetch: a miss, never garbage
        except Unavailable as exc:
            return [], f"daemon unreachable: {exc}"
        return blocks, "hit" if blocks else "miss"

    def held_tokens(self, blocks: list | PrefixKV) -> int:
        """Prompt positions a fetch_prefix answer restores."""
        return blocks.tokens if isinstance(blocks, PrefixKV) else len(blocks) * self.block_size

    def restore(self, caches, blocks: list, tokens: int) -> None:
        """Load the first `tokens` positions of the fetched blocks into every layer's cache."""
        if self.fetch_form == "turboquant":
            for layer, cache in enumerate(caches):
                widths = {"key_codes": cache.arena.key_codec.code_bytes,
                          "value_codes": cache.arena.value_codec.code_bytes}
                codes = {}
                for name in ("key_codes", "key_scales", "value_codes", "value_scales"):
                    joined = np.concatenate([b[name][layer] for b in blocks], axis=1)[:, :tokens]
                    if name in widths:  # the wire pads narrower per-layer codes to the widest
                        joined = joined[..., : widths[name]]
                    codes[name] = mx.array(np.ascontiguousarray(joined))
                cache.load_turboquant_prefix(codes)
            return
        self.restore_times = {}
        # K and V as MLX arrays in the layout the fetch wrote; each layer is then a 4-D slice
        # (the cache takes it as it is; a 3-D slice would get a batch axis added by reshaping
        # a strided view). On unified memory the fetch read into MLX's own arrays, taken as
        # they are; on CUDA one copy, read over the bus from the pinned staging buffer the
        # fetch filled (or by cudaMemcpy), not by page faults (device_memory).
        keys = host_to_device(blocks.keys, self.restore_times)
        values = host_to_device(blocks.values, self.restore_times)
        for layer, cache in enumerate(caches):
            cut = (slice(layer, layer + 1), slice(None), slice(0, tokens))
            cache.load_fp16_prefix(keys[cut], values[cut])

    def upload_hook(self, caches, prompt_ids: list[int], held: int,
                     started: list[Future]) -> Callable:
        """A prefill listener that Puts, once every layer reported, the full blocks of
        prompt_ids[:-1] past the `held` positions restored from the daemon, and its trailing
        partial block unless that was restored too (see the module docstring)."""
        per_layer: dict[int, tuple[mx.array, mx.array]] = {}
        num_layers, bs = len(caches), self.block_size

        def on_prefill(layer: int, keys: mx.array, values: mx.array) -> None:
            per_layer[layer] = (keys, values)
            if len(per_layer) < num_layers:
                return
            stored = min(keys.shape[2], len(prompt_ids) - 1)  # never the last token's block
            first, full = held // bs, stored // bs
            tail = stored - full * bs
            if tail < MIN_PARTIAL_TOKENS or held >= stored:
                tail = 0
            if full <= first and not tail:
                return
            # This runs inside the first decode step: the copy to the host only starts here
            # (the copy engine into pinned memory on CUDA, views on unified memory); the
            # landing thread waits for it and cuts the blocks as soon as they arrive, and the
            # upload thread, when it reaches this Put, takes them from there
            # (tqstore.upload_landing).
            a, b = first * bs, full * bs + tail
            landing = land([per_layer[i] for i in range(num_layers)], a, b, self.staging_cap)
            blocks = then(landing, lambda keys, values: _payloads(keys, values, full - first,
                                                                  bs, tail))
            started.append(self.client.put_async_lazy(self.namespace, prompt_ids[:b], first,
                                                      blocks.result))

        return on_prefill

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], max_tokens: int = 128,
                 on_text: Callable[[str], None] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> GenerationReport:
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise TqstoreError("empty prompt")
        start = time.perf_counter()
        self.restore_times = {}
        blocks, status = self.fetch_prefix(prompt_ids)
        fetched = time.perf_counter()
        # The last prompt token is always computed (its logits give the first token), so a hit of
        # the whole prompt restores all but that one token.
        hit_tokens = self.held_tokens(blocks)
        caches = make_prompt_cache(self.pool)
        caches[0].sequence.prompt_length = len(prompt_ids)
        uploads: list[Future] = []
        try:
            if blocks:
                self.restore(caches, blocks, hit_tokens)
                loaded = time.perf_counter()
                mx.eval([c.state for c in caches])
                self.restore_times["eval"] = time.perf_counter() - loaded
            restored = time.perf_counter()
            # A TurboQuant-form hit holds no fp16 prefill to upload (a documented trade-off).
            if (self.client is not None and not status.startswith("daemon unreachable")
                    and not (blocks and self.fetch_form == "turboquant")):
                caches[0].sequence.prefill_listeners.append(
                    self.upload_hook(caches, prompt_ids, hit_tokens, uploads))
            first, ttft = self._prefill(caches, prompt_ids, hit_tokens, progress, start)
            tokens, text, decode_tps, first_step = self._decode(caches, first, max_tokens, on_text)
            kv_bytes = sum(c.nbytes for c in caches)
            kv_fp16 = sum(c.fp16_nbytes for c in caches)
        finally:
            release_prompt_cache(caches)
        phases = {"fetch": fetched - start, "restore": restored - fetched,
                  "prefill": ttft - (restored - start)}
        phases.update({f"restore_{k}": v for k, v in self.restore_times.items()
                       if k not in _RESTORE_COUNTS})
        return GenerationReport(text, tokens, len(prompt_ids), hit_tokens, ttft, decode_tps,
                                status, kv_bytes, kv_fp16, first_step,
                                uploads[0] if uploads else None, phases)

    def _prefill(self, caches, prompt_ids: list[int], hit_tokens: int,
                 progress: Callable[[int, int], None] | None, start: float) -> tuple[int, float]:
        """Prefill prompt_ids[hit_tokens:] in store-block-aligned chunks, all in fp16 (the cache
        knows the prompt length); returns the greedy first token and the time to it."""
        model = self.loaded.model
        total = len(prompt_ids)
        bounds = prefill_bounds(hit_tokens, total, self.block_size)
        logits = None
        for begin, end in zip(bounds, bounds[1:]):
            if end <= begin:
                continue
            logits = model(mx.array([prompt_ids[begin:end]]), cache=caches)
            # Only the last chunk's logits are used: an earlier chunk evaluates its KV alone
            # (as mlx-lm's prefill does), so the lm_head never runs over its positions.
            mx.eval(logits if end == total else [], [c.state for c in caches])
            if progress is not None:
                progress(end - hit_tokens, total - hit_tokens)
        first = int(mx.argmax(logits[0, -1]).item())
        return first, time.perf_counter() - start

    def _decode(self, caches, first: int, max_tokens: int,
                on_text: Callable[[str], None] | None) -> tuple[list[int], str, float, float]:
        """Greedy decode after the first token. The first step past the prompt quantizes the
        prefill into pages (once), so it runs after the first token is out."""
        tokenizer = self.loaded.tokenizer
        eos = set(tokenizer.eos_token_ids)
        detok = tokenizer.detokenizer
        detok.reset()
        pieces: list[str] = []

        def flush() -> None:
            segment = detok.last_segment  # reading it consumes it
            if segment:
                pieces.append(segment)
                if on_text is not None:
                    on_text(segment)

        def emit(token: int) -> None:
            detok.add_token(token)
            flush()

        tokens = [first]
        first_step = decode_tps = 0.0
        if first not in eos:
            emit(first)
            t0 = time.perf_counter()
            for n, (token, _) in enumerate(generate_step(
                    mx.array([first]), self.loaded.model, max_tokens=max_tokens - 1,
                    prompt_cache=caches)):
                if n == 0:
                    first_step = time.perf_counter() - t0
                tokens.append(int(token))
                if token in eos:
                    break
                emit(int(token))
            if len(tokens) > 1:
                decode_tps = (len(tokens) - 1) / (time.perf_counter() - t0)
        detok.finalize()
        flush()
        return tokens, "".join(pieces), decode_tps, first_step


def default_store_block(layout: dict) -> int:
    """The store block (and prefill chunk) when the caller names none: DEFAULT_STORE_BLOCK, or
    on CUDA the largest of CUDA_STORE_BLOCK, 1024, 512 whose fp16 block fits
    MAX_AUTO_BLOCK_BYTES (see there), else DEFAULT_STORE_BLOCK as everywhere. Blocks of
    different sizes are different namespaces, so a fleet that shares one store should name its
    block size (--store-block)."""
    if gpu_backend() != "cuda":
        return DEFAULT_STORE_BLOCK
    per_token = 2 * layout["num_layers"] * layout["num_kv_heads"] * (
        layout["key_head_dim"] + layout["value_head_dim"])
    block = CUDA_STORE_BLOCK
    while block > DEFAULT_STORE_BLOCK and block * per_token > MAX_AUTO_BLOCK_BYTES:
        block //= 2
    return block


def prefill_bounds(start: int, total: int, chunk: int) -> list[int]:
    """Chunk boundaries for prefilling tokens [start, total): absolute multiples of ``chunk``,
    and the last prompt token a step of its own. A cold run and a run after any hit whose length
    is a multiple of ``chunk`` then see identical chunks (shapes and inputs), hence identical
    floats. Consecutive equal bounds are dropped."""
    bounds = [start]
    bounds += range((start // chunk + 1) * chunk, total - 1, chunk)
    bounds += [total - 1, total]
    return [b for i, b in enumerate(bounds) if i == 0 or b > bounds[i - 1]]


def _payloads(keys: np.ndarray, values: np.ndarray, count: int, block: int,
              tail: int) -> tuple[list[BlockPayload], BlockPayload | None]:
    """`count` fp16 blocks and a trailing partial block of `tail` tokens (None if 0) from
    host K and V (layers, H, count * block + tail, D)."""

    def cut(a: int, b: int) -> BlockPayload:
        return BlockPayload(keys=np.ascontiguousarray(keys[:, :, a:b]),
                            values=np.ascontiguousarray(values[:, :, a:b]))
    full = [cut(i * block, (i + 1) * block) for i in range(count)]
    return full, cut(count * block, count * block + tail) if tail else None
