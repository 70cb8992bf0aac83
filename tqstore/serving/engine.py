"""The serving engine: continuous batching over the paged TurboQuant pool, three prefix tiers.

One thread (the engine thread) does all MLX work: MLX must not evaluate on two threads at
once. HTTP threads call ``submit`` (validation, admission control) and read each request's
event queue; they never touch an MLX array.

A request's life, each state moved only by the engine thread:
  waiting  -> planned: the longest prefix of full pages already in the pool (memory tier) is
              peeked; if the daemon could add more, its Lookup + Fetch run on a worker thread
              (fetching), so the engine keeps decoding meanwhile.
  ready    -> admitted when a batch slot is free and its worst case (prompt + max_tokens) fits
              in the pool next to every admitted request's worst case: decode never runs out of
              pages, and nothing is ever killed for memory. FIFO: the head waits, later requests
              wait behind it (no starvation).
  prefill  -> chunks (tqstore.generator.prefill_bounds) for up to prefill_slice_s per engine
              iteration; while others decode, only on the credit their decode steps earn
              (tqstore.serving.schedule: decode keeps at least decode_share of the time).
  decode   -> every decoding sequence advances in ONE batched model step
              (tqstore.paged.batch); a request alone decodes through its own caches exactly as
              `tqstore generate` does.
  finished -> its pages go back to the pool at once (also on cancel: a client that went away).

Prefix tiers, fastest first (the tiers a request used are reported in its usage):
  memory:  full pages other requests left in the pool, shared by reference count (codes: the
           rest of the prompt attends the dequantized prefix: close to cold, not identical, and
           such K/V are never uploaded: the daemon keeps only exact prefill snapshots);
  daemon:  fp16 blocks restored exactly (a hit reproduces a cold run bit for bit), the
           prompt's trailing partial block included: a repeated prompt computes only its last
           token;
  computed: the rest. New full blocks of a prompt prefilled in fp16 go to the daemon in the
           background (tqstore.generator.CachedGenerator.upload_hook).
The daemon wins when its blocks cover as much as the pool's pages, give or take one store block
(_prefer_daemon): the request is then exact and its own blocks reach the daemon. A request whose
prefix another admitted request is computing waits for it (_prefix_in_flight) instead of
computing it twice, and then plans again: the prefix is on the daemon by then.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import random
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlx.core as mx
import numpy as np

from tqstore.client import KvStoreClient
from tqstore.config import ServingConfig
from tqstore.errors import InvalidArgument, ResourceExhausted
from tqstore.generator import CachedGenerator, prefill_bounds
from tqstore.models.loader import LoadedModel
from tqstore.paged import make_prompt_cache, release_prompt_cache
from tqstore.paged.batch import batch_caches
from tqstore.paged.mixed import MixPolicy
from tqstore.prefix_hash import hash_prefix_blocks
from tqstore.serving.request import Request, TokenEvent
from tqstore.serving.live_stats import engine_stats
from tqstore.serving.sampling import SamplingParams, sample_rows
from tqstore.serving.schedule import PrefillBudget

log = logging.getLogger("tqstore.serving")

# A waiting request is held back for a prefix being computed by another only if it would share
# at least this many more tokens (256: a default store block, a prefill chunk's work saved).
WORTH_WAITING = 256
# The daemon is asked when it could add this many tokens beyond the memory hit (or a store block,
# if smaller). Not "a whole block": with CUDA's 2048-token blocks, a replay after a restart of a
# 2k prompt (its trailing partial block) would never be asked for.
ASK_DAEMON = 256


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class Engine:
    """Runs one mlx-lm model for many concurrent requests (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, client: KvStoreClient | None,
                 config: ServingConfig = ServingConfig(), policy=None) -> None:
        self.config = config
        self.loaded = loaded
        self.client = client
        args = getattr(loaded.model, "args", None)
        self.context_tokens = config.context_tokens or getattr(
            args, "max_position_embeddings", None) or 1 << 20
        self.eos = set(loaded.tokenizer.eos_token_ids)
        self._ids = itertools.count(1)
        self._incoming: "queue.Queue[Request]" = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []
        self._uploading: list[Request] = []  # finished, with uploads in flight
        self._landed = 0  # finished requests whose uploads have all landed (an epoch)
        self._lock = threading.Lock()  # guards the counts submit() reads
        self._queued = 0  # submitted and not finished
        self._admitted = 0  # of those, admitted (in self._active)
        self._fetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tqstore-fetch")
        self._stop = False
        self.failed: BaseException | None = None
        self.totals = {"requests": 0, "completed": 0, "cancelled": 0, "rejected": 0,
                       "prompt_tokens": 0, "memory_tokens": 0, "daemon_tokens": 0,
                       "computed_tokens": 0, "generated_tokens": 0, "mixed_steps": 0}
        self._rate: deque[tuple[float, int]] = deque()  # (time, tokens) of recent decode steps
        self._budget = PrefillBudget(config.decode_share)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(policy,), name="tqstore-engine",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.failed is not None:
            raise self.failed

    # -- any thread --------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams) -> Request:
        """Queue a request, or raise InvalidArgument (it can never run: 400) or
        ResourceExhausted (the queue is full: 503, retry later)."""
        if not prompt:
            raise InvalidArgument("the prompt is empty")
        if len(prompt) >= self.context_tokens:
            raise InvalidArgument(f"the prompt has {len(prompt)} tokens; this model's context is "
                                  f"{self.context_tokens} tokens")
        if self._blocks_needed(len(prompt) + min(params.max_tokens, self.context_tokens)) > \
                self.pool.num_blocks - 1:
            raise InvalidArgument(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) needs more KV "
                f"than the whole pool holds ({(self.pool.num_blocks - 1) * self.pool.block_size} "
                "tokens): lower max_tokens or start the server with a larger --pool-mib")
        if not self.healthy:
            raise ResourceExhausted("the engine stopped")
        with self._lock:
            # queue_size counts requests not yet admitted; admitted ones hold batch slots.
            waiting = self._queued - self._admitted
            if waiting >= self.config.queue_size:
                self.totals["rejected"] += 1
                raise ResourceExhausted(f"{waiting} requests are waiting already")
            self._queued += 1
            self.totals["requests"] += 1
        request = Request(next(self._ids), list(prompt), params)
        self._incoming.put(request)
        return request

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self.failed is None

    def stats(self) -> dict[str, Any]:
        """The live figures (tqstore.serving.live_stats); safe on any thread."""
        return engine_stats(self)

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=30)
        self._fetcher.shutdown(wait=False, cancel_futures=True)

    # -- the engine thread -------------------------------------------------------------------
    def _setup(self, policy) -> None:
        # MLX streams are per thread: the pool's arrays (codebooks, rotations, arenas) are made
        # here, on the thread that evaluates every step, never on the caller's thread.
        mx.default_stream(mx.default_device())
        # CachedGenerator owns the daemon side (namespace, fetch, restore, upload) and the pool.
        self.gen = CachedGenerator(self.loaded, self.client, policy=policy,
                                   block_size=self.config.store_block,
                                   pool_budget_bytes=self.config.pool_bytes)
        self.gen.fetch_form = "fp16"  # a daemon hit must reproduce a cold prefill
        self.pool = self.gen.pool
        self.config = dataclasses.replace(self.config, store_block=self.gen.block_size)
        self.chunk = self.config.chunk_for(self.client is not None)
        # Mixed steps (tqstore.paged.mixed), where asked for and the model has no sliding layers.
        self._mixing = (MixPolicy(self.loaded.model, self.chunk, self.config.max_batch)
                        if self.config.mixed_steps and not self.pool.sliding_layers else None)

    def _run(self, policy) -> None:
        try:
            self._setup(policy)
        except BaseException as exc:  # noqa: BLE001 - raised again by __init__
            self.failed = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop:
                self._intake(block=not (self._active or self._waiting))
                self._drop_cancelled()
                self._plan_and_admit()
                prefilling = self._prefill_slice()
                if any(r.state == "decode" for r in self._active):
                    self._decode_step()
                elif not prefilling and self._waiting:
                    time.sleep(0.002)  # waiting on a fetch or on pages
        except BaseException as exc:  # noqa: BLE001 - reported to every request, then re-raised
            self.failed = exc
            log.exception("the serving engine stopped")
            for r in self._active + list(self._waiting):
                r.events.put(("error", exc))
            raise

    def _intake(self, block: bool) -> None:
        try:
            item = self._incoming.get(timeout=0.1) if block else self._incoming.get_nowait()
        except queue.Empty:
            return
        while True:
            self._waiting.append(item)
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                return

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._active + list(self._waiting) if r.cancelled]:
            self._finish(r, None, cancelled=True)
        for r in [r for r in self._active + list(self._waiting) if r.stop_requested]:
            self._finish(r, "stop")

    def _memory_hit_tokens(self, prompt: list[int]) -> int:
        if self.config.exact_hits:
            return 0
        count = 0
        for h in hash_prefix_blocks(self.pool.namespace, prompt[: len(prompt) - 1]):
            if self.pool.block_pool.lookup(h) is None:
                break
            count += 1
        return count * self.pool.block_size

    def _note_landed_uploads(self) -> None:
        still = [a for a in self._uploading if not all(f.done() for f in a.uploads)]
        self._landed += len(self._uploading) - len(still)
        self._uploading = still

    def _plan_and_admit(self) -> None:
        self._note_landed_uploads()
        for r in self._waiting:
            if r.state == "waiting":
                memory = self._memory_hit_tokens(r.prompt)
                gain = len(r.prompt) - 1 - memory >= min(self.config.store_block, ASK_DAEMON)
                if self.client is not None and gain:
                    # Ask for anything within a block of the memory hit: see _prefer_daemon.
                    r.fetch = self._fetcher.submit(self.gen.fetch_prefix, r.prompt,
                                                   max(0, memory - self.config.store_block))
                    r.fetch_epoch, r.state = self._landed, "fetching"
                else:
                    r.state = "ready"
            if r.state == "fetching" and r.fetch.done():
                r.blocks, r.daemon_status = r.fetch.result()
                r.fetch, r.state = None, "ready"
        # FIFO, except that a request whose prefix another request is computing right now
        # waits for those pages (they are shared once written) while later ones go ahead.
        for r in list(self._waiting):
            if len(self._active) >= self.config.max_batch or r.state != "ready":
                break
            if self._prefix_in_flight(r):
                r.held = True
                continue
            if r.held and self.client is not None:
                # The prefix it waited for is on the daemon now: plan again, so that it can
                # start from those exact fp16 blocks (and upload its own) rather than from pages.
                r.held, r.state, r.blocks = False, "waiting", []
                continue
            if r.fetch_epoch is not None and r.fetch_epoch != self._landed and not r.replanned:
                # Uploads landed after its daemon answer (a short request can prefill, answer
                # and upload while this one's Lookup is in flight, so it was never held): the
                # daemon may hold more of its prefix now. Plan once more.
                r.replanned, r.state, r.blocks = True, "waiting", []
                continue
            if not self._start(r):
                break  # no pages for the oldest that could run: nobody overtakes it
            self._waiting.remove(r)
            self._active.append(r)
            with self._lock:
                self._admitted += 1

    def _prefix_in_flight(self, r: Request) -> bool:
        """Whether an admitted request whose pages are not yet written (or, with a daemon, whose
        blocks are not yet uploaded) shares at least WORTH_WAITING more tokens of r's prompt
        than r has already (from the pool or the daemon): eight agents with one system prompt:
        the first computes it, the others then start from its blocks."""
        if self.config.exact_hits:
            return False
        blocks = memory = None
        # Finished requests count until their uploads land: a short answer ends before its
        # blocks reach the daemon, and the waiter would then plan without them.
        for a in self._active + self._uploading:
            uploading = self.client is not None and not all(f.done() for f in a.uploads)
            if a.pages_written and not uploading:
                continue
            shared = _common_prefix(a.prompt_ids, r.prompt_ids)
            if shared >= WORTH_WAITING:
                if blocks is None:  # what r has already: daemon blocks, pool pages
                    blocks = self.gen.held_tokens(r.blocks)
                    memory = self._memory_hit_tokens(r.prompt)
                # While a's blocks are uploading, r waits for them even though a's pages are
                # in the pool: they are exact and r's own blocks then reach the daemon too
                # (from pages, nothing computed over them is uploaded).
                held = blocks if uploading else max(blocks, memory)
                if shared - held >= WORTH_WAITING:
                    return True
        return False

    def _prefer_daemon(self, daemon: int, memory: int) -> bool:
        """Daemon blocks over pool pages when they cover as much, give or take one store block:
        the rest then prefills exactly (a cold run's floats) and its new blocks are uploaded;
        a prefix from pages is close, not exact, and nothing computed over it is uploaded."""
        return daemon > 0 and daemon >= memory - self.config.store_block

    def _blocks_needed(self, tokens: int) -> int:
        return -(-tokens // self.pool.block_size)

    def _worst_case(self, r: Request) -> int:
        return min(len(r.prompt) + r.params.max_tokens, self.context_tokens)

    def _start(self, r: Request) -> bool:
        """Create the request's caches if its worst case fits; False leaves it waiting."""
        outstanding = sum(max(0, self._blocks_needed(self._worst_case(a))
                              - len(a.caches[0].sequence.blocks)) for a in self._active)
        if self._blocks_needed(self._worst_case(r)) > \
                self.pool.block_pool.num_free_blocks - outstanding:
            return False
        hit = self.gen.held_tokens(r.blocks)
        from_daemon = bool(r.blocks) and self._prefer_daemon(hit, self._memory_hit_tokens(r.prompt))
        # Shared pages hold codes: a prefix from the daemon (exact fp16) or in exact mode starts
        # fresh; its pages are still published for others once written.
        share = not (from_daemon or self.config.exact_hits)
        caches = make_prompt_cache(self.pool, r.prompt if share else [])
        if not share:
            caches[0].sequence.append_token_ids(r.prompt)
        if from_daemon:
            self.gen.restore(caches, r.blocks, hit)
            r.daemon_tokens = hit
        else:
            r.memory_tokens = caches[0].offset
        start = caches[0].offset
        caches[0].sequence.prompt_length = len(r.prompt)
        uploadable = (self.client is not None and r.memory_tokens == 0
                      and not r.daemon_status.startswith("daemon unreachable"))
        if uploadable:
            caches[0].sequence.prefill_listeners.append(self.gen.upload_hook(
                caches, r.prompt, r.daemon_tokens, r.uploads))
        r.blocks = []  # restored: drop the host copy
        r.caches, r.state = caches, "prefill"
        if r.memory_tokens:
            # Over pool pages nothing is exact or uploaded, so chunks need no alignment with a
            # cold run's: fewest steps (each gathers the whole context from the pages).
            r.bounds = list(range(start, len(r.prompt), self.chunk)) + [len(r.prompt)]
        else:
            r.bounds = prefill_bounds(start, len(r.prompt), self.chunk)
        r.chunk = 0
        r.key = mx.random.key(r.params.seed if r.params.seed is not None
                              else random.getrandbits(63))
        r.matcher = r.params.stop_sequences.matcher()
        for name, value in (("prompt_tokens", len(r.prompt)), ("memory_tokens", r.memory_tokens),
                            ("daemon_tokens", r.daemon_tokens),
                            ("computed_tokens", r.computed_tokens)):
            self.totals[name] += value
        return True

    def _prefill_slice(self) -> bool:
        """Prefill chunks (oldest request first) for up to prefill_slice_s, on the budget's
        credit while others decode; False if none ran."""
        start = time.perf_counter()
        ran = False
        while True:
            prefilling = [r for r in self._active if r.state == "prefill" and not r.cancelled]
            decoding = any(r.state == "decode" for r in self._active)
            if not prefilling or not self._budget.may_prefill(decoding):
                return ran
            r = prefilling[0]
            mix = decoding and self._mixing is not None and self._mixing.allows(
                r.bounds[r.chunk + 1] - r.bounds[r.chunk], exact=not r.memory_tokens)
            began = time.perf_counter()
            self._prefill_chunk(r, mix)
            if not mix:  # a mixed chunk decoded the streams too: no prefill credit spent
                self._budget.spent_prefill(time.perf_counter() - began, decoding)
            ran = True
            if time.perf_counter() - start >= self.config.prefill_slice_s:
                return ran

    def _prefill_chunk(self, r: Request, mix: bool = False) -> None:
        """r's next chunk; with mix, carrying one decode step of every decoding request in the
        same forward pass (tqstore.paged.mixed: only the rows sampled get logits)."""
        begin, end = r.bounds[r.chunk], r.bounds[r.chunk + 1]
        r.chunk += 1
        done = r.chunk == len(r.bounds) - 1
        if mix:
            began = time.perf_counter()
            self.totals["mixed_steps"] += 1
            rows, published = self._decoding_rows()
            logits, caches = self._mixing.forward(r.caches, r.prompt[begin:end],
                                                  [d.caches for d in rows],
                                                  [d.next_token for d in rows], last=done)
            self._emit(rows + [r] if done else rows, logits, caches)
            self._decoded(rows, published, began)
        else:
            logits = self.loaded.model(mx.array([r.prompt[begin:end]]), cache=r.caches)
            if done:
                self._emit([r], logits[:, -1, :])
            else:
                mx.eval([c.state for c in r.caches])
        if not done:
            r.events.put(("progress", end - r.bounds[0], len(r.prompt) - r.bounds[0]))
        elif r.state == "prefill":
            r.state = "decode"

    def _decoding_rows(self) -> tuple[list[Request], list[Request]]:
        """The decoding requests, each with its new token appended, and those whose prompt
        pages this step writes (the first decode step: finish_prefill)."""
        rows = [r for r in self._active if r.state == "decode"]
        for r in rows:
            r.caches[0].sequence.append_token_ids([r.next_token])
        return rows, [r for r in rows if not r.pages_written]

    def _decoded(self, rows: list[Request], published: list[Request], began: float) -> None:
        for r in published:
            r.pages_written = True
        self._rate.append((time.perf_counter(), len(rows)))
        self._budget.spent_decode(time.perf_counter() - began)
        while len(self._rate) > 256:
            self._rate.popleft()

    def _decode_step(self) -> None:
        began = time.perf_counter()
        rows, published = self._decoding_rows()
        inputs = mx.array([[r.next_token] for r in rows])
        caches = rows[0].caches if len(rows) == 1 else batch_caches([r.caches for r in rows])
        logits = self.loaded.model(inputs, cache=caches)
        self._emit(rows, logits[:, -1, :], caches)
        self._decoded(rows, published, began)

    def _emit(self, rows: list[Request], logits: mx.array, caches=None) -> None:
        """Sample each row's next token, evaluate the step, and hand the tokens out."""
        tokens, logprobs, tops = sample_rows(rows, logits)
        state = ([c.state for c in caches] if caches is not None
                 else [c.state for r in rows for c in r.caches])
        mx.eval(tokens, logprobs, [t for t in tops if t is not None], state)
        now = time.perf_counter()
        tops = [[] if t is None else list(zip(t[0].tolist(), t[1].tolist())) for t in tops]
        for r, token, lp, top in zip(rows, tokens.tolist(), logprobs.tolist(), tops):
            if r.first_token_at is None:
                r.first_token_at = now
            r.generated.append(token)
            r.next_token = token
            reason = None
            if r.matcher.advance(token) or token in self.eos:
                reason = "stop"
            elif len(r.generated) >= r.params.max_tokens or \
                    len(r.prompt) + len(r.generated) >= self.context_tokens:
                reason = "length"
            r.events.put(TokenEvent(token, lp, reason, top))
            if reason is not None:
                self._finish(r, reason)

    def _finish(self, r: Request, reason: str | None, cancelled: bool = False) -> None:
        if r in self._active:
            self._active.remove(r)
            with self._lock:
                self._admitted -= 1
        elif r in self._waiting:
            self._waiting.remove(r)
            if r.fetch is not None:
                r.fetch.cancel()
        if self.client is not None and r.uploads:
            if all(f.done() for f in r.uploads):
                self._landed += 1
            else:
                self._uploading.append(r)
        if r.caches is not None:
            release_prompt_cache(r.caches)  # pages back to the pool now; cached ones stay findable
            r.caches = None
        r.state, r.finished_at = "finished", time.perf_counter()
        with self._lock:
            self._queued -= 1
        self.totals["cancelled" if cancelled else "completed"] += 1
        self.totals["generated_tokens"] += len(r.generated)
        if not cancelled:
            r.events.put(("done", reason))
        decode_s = (r.finished_at - r.first_token_at) if r.first_token_at else 0.0
        log.info("request %d %s: prompt %d tokens (memory %d, daemon %d, computed %d), "
                 "TTFT %s, %d tokens, %.1f tokens/s", r.id,
                 "cancelled" if cancelled else reason, len(r.prompt), r.memory_tokens,
                 r.daemon_tokens, r.computed_tokens,
                 "-" if r.ttft_s is None else f"{r.ttft_s:.3f} s", len(r.generated),
                 (len(r.generated) - 1) / decode_s if decode_s > 0 else 0.0)

