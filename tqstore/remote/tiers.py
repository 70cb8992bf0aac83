"""Tiers: the daemon's local BlockStore in front, the shared remote tier (RedisTier) behind it.

- Lookup: the local hit, then, for the rest of the chain, the blocks present in full in the
  remote (within its deadline; none if it is down or slow). Stats count tokens hit by tier.
- Fetch (`blocks`): local blocks while they last, then remote blocks, each verified like a
  local read. A block served from the remote is copied into the local tier in the background
  (a filler thread, queue bounded in bytes), so the next hit on this host is local. The copy
  goes to the local tier only: it never goes back up to the remote.
- Put: the local tier makes the blocks durable and only then is the Put acknowledged; the copy
  to the remote is queued after that. A crash between the two loses no acknowledged block: it
  is on the local disk, only missing from the shared tier (other hosts recompute it once).

Trailing partial blocks (tqstore/ssd/chain.py: the tokens after a chain's last full block) live
in the local tier only: lookup_partial asks it alone, `blocks(partial=True)` serves one from it
after the full blocks, and a Put's partial is never uploaded (the remote's values and its
presence test are for full blocks; a partial is cheap to recompute on another host).

Without a remote this is the local store and nothing else runs.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Iterator, Sequence

import numpy as np

from tqstore.blocks import BlockPayload
from tqstore.errors import Corruption, NotFound, TqstoreError
from tqstore.prefix_hash import Namespace
from tqstore.remote.redis_tier import RedisTier, UploadJob
from tqstore.ssd.chain import chain_hashes, token_array
from tqstore.ssd.store import BlockStore

log = logging.getLogger("tqstore.tiers")
_FILL_TRIES = 50  # a block whose parent is still missing after this many passes stays remote


class Tiers:
    def __init__(self, local: BlockStore, remote: RedisTier | None = None,
                 fill_queue_bytes: int = 512 << 20) -> None:
        self.local = local
        self.remote = remote
        self.counters: collections.Counter[str] = collections.Counter()
        self._lock = threading.Condition()
        # (namespace, tokens, block index, payload, tries)
        self._fills: collections.deque[tuple[Namespace, np.ndarray, int, BlockPayload, int]] = \
            collections.deque()
        self._fill_bytes = 0
        self._fill_limit = fill_queue_bytes
        self._fill_busy = False
        self._stopping = False
        self._filler = None
        if remote is not None:
            self._filler = threading.Thread(target=self._fill_loop, name="tqstore-remote-fill",
                                            daemon=True)
            self._filler.start()

    # -- Lookup ----------------------------------------------------------------------------------
    def lookup(self, ns: Namespace, token_ids: Sequence[int]) -> int:
        """Leading full blocks available from either tier."""
        tokens = token_array(token_ids)
        hashes = chain_hashes(ns, tokens)
        local = self.local.lookup_hashes(ns, hashes)
        remote = 0
        if self.remote is not None and local < len(hashes):
            remote = self.remote.present(ns, hashes, local)
        bs = ns.block_size
        self.local.count_lookup(len(tokens), (local + remote) * bs)
        with self._lock:
            self.counters["local_hit_tokens"] += local * bs
            self.counters["remote_hit_tokens"] += remote * bs
            self.counters["lookup_tokens"] += len(tokens)
        return local + remote

    def lookup_partial(self, ns: Namespace, token_ids: Sequence[int]) -> int:
        """Tokens of the trailing partial block of token_ids available (0 if none): the local
        store's answer, since the remote never holds partials. Counted as local hit tokens of
        the lookup (lookup() counted the full blocks)."""
        found = self.local.lookup_partial(ns, token_ids)
        self.local.count_partial_hit(found)
        with self._lock:
            self.counters["local_hit_tokens"] += found
        return found

    # -- Fetch -----------------------------------------------------------------------------------
    def blocks(self, ns: Namespace, token_ids: Sequence[int], first: int, count: int,
               partial: bool = False) -> Iterator[tuple[int, BlockPayload]]:
        """Verified blocks first .. first+count-1 in order, ending early at the first that no
        tier can serve. With partial, once the full blocks served reach index k = len // size
        (count 0 with first == k included), the trailing partial follows as (k, payload) if the
        local tier holds it verified (a miss just ends the iteration). NotFound (raised before
        anything is yielded) if nothing at all can be served."""
        tokens = token_array(token_ids)
        index, end = first, first + count
        while index < end:
            try:
                payload = self.local.get_block(ns, tokens, index)
            except (NotFound, Corruption):
                break
            yield index, payload
            index += 1
        if index < end and self.remote is not None:
            hashes = chain_hashes(ns, tokens, end)
            for i, payload in self.remote.get_blocks(ns, hashes, tokens, index, end - index):
                self._fill(ns, tokens, i, payload)
                yield i, payload
                index = i + 1
        served = index > first
        if partial and len(tokens) % ns.block_size and index == len(tokens) // ns.block_size:
            try:
                yield index, self.local.get_block(ns, tokens, index, partial=True)
                served = True
            except (NotFound, Corruption):
                pass
        if not served:
            raise NotFound("block not stored")

    def _fill(self, ns: Namespace, tokens: np.ndarray, index: int, payload: BlockPayload) -> None:
        nbytes = payload.keys.nbytes + payload.values.nbytes
        with self._lock:
            if self._fill_bytes + nbytes > self._fill_limit:
                self.counters["fills_dropped"] += 1
                return
            self._fills.append((ns, tokens, index, payload, 0))
            self._fill_bytes += nbytes
            self._lock.notify_all()

    def _fill_loop(self) -> None:
        """Copy remote blocks into the local tier. put_blocks needs a block's parent first;
        a client's parallel Fetch streams serve a chain's ranges concurrently, so a block may
        come before its parent: it goes back in the queue, a few times, behind the others."""
        while True:
            with self._lock:
                while not self._fills and not self._stopping:
                    self._lock.wait()
                if not self._fills:
                    return
                ns, tokens, index, payload, tries = self._fills.popleft()
                self._fill_busy = True
            outcome = "fills"
            try:
                self.local.put_blocks(ns, tokens[:(index + 1) * ns.block_size], index, [payload])
            except NotFound as exc:  # the parent is not local (yet)
                outcome = "retry" if tries < _FILL_TRIES else "fills_failed"
                log.debug("local copy of remote block %d waits for its parent: %s", index, exc)
            except TqstoreError as exc:  # budget, bad state: the block stays remote-only
                outcome = "fills_failed"
                log.debug("local copy of remote block %d not kept: %s", index, exc)
            except Exception:  # noqa: BLE001 - never kill the filler
                outcome = "fills_failed"
                log.exception("local copy of a remote block failed")
            with self._lock:
                self._fill_busy = False
                if outcome == "retry":
                    self._fills.append((ns, tokens, index, payload, tries + 1))
                    if all(entry[4] for entry in self._fills):
                        self._lock.wait(0.02)  # only waiting blocks left: let parents arrive
                    continue
                self.counters[outcome] += 1
                self._fill_bytes -= payload.keys.nbytes + payload.values.nbytes
                self._lock.notify_all()

    # -- Put -------------------------------------------------------------------------------------
    def put_blocks(self, ns: Namespace, token_ids: Sequence[int], first: int,
                   payloads: Sequence[BlockPayload], partial: bool = False) -> list[bytes]:
        """Durable in the local tier when this returns; queued for the remote after that. With
        partial, the last payload is the trailing partial (BlockStore.put_blocks): local only,
        the remote gets the full blocks before it (nothing if it was the only payload)."""
        tokens = token_array(token_ids)
        stored = self.local.put_blocks(ns, tokens, first, payloads, partial=partial)
        full = list(payloads[:-1] if partial else payloads)
        if self.remote is not None and full:
            hashes = chain_hashes(ns, tokens, first + len(full))
            self.remote.upload(UploadJob(ns, hashes, tokens[:(first + len(full)) * ns.block_size],
                                         first, full))
        return stored

    # -- lifecycle / stats -----------------------------------------------------------------------
    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until queued uploads and local copies are done (tests, benchmarks)."""
        ok = self.remote.wait_uploads(timeout) if self.remote is not None else True
        with self._lock:
            ok = self._lock.wait_for(lambda: not self._fills and not self._fill_busy, timeout) and ok
        return ok

    def stats(self) -> dict[str, object]:
        with self._lock:
            out: dict[str, object] = dict(self.counters)
            out["fill_queue_bytes"] = self._fill_bytes
        if self.remote is not None:
            out.update({f"remote_{k}": v for k, v in self.remote.stats().items()})
        return out

    def close(self, drain_s: float = 5.0) -> None:
        """Stop the background copies (uploads get up to drain_s); the local store stays open."""
        if self.remote is None:
            return
        self.remote.close(drain_s)
        with self._lock:
            self._stopping = True
            self._fills.clear()
            self._lock.notify_all()
        if self._filler is not None:
            self._filler.join(timeout=30)
