"""BlockStore: durable, verified fp16 boundary snapshots of prompt blocks.

Layout of a store directory:
    index/        LMDB environment (index and metadata, see index.py)
    blocks/       one payload file per block, <hash hex>.blk (see payload.py for why files)
    writer.lock   flock held by the one writer process; readonly openers never take it
    store.id      random, rewritten by each writer open: a same-host reader that reads the id
                  the daemon told it from here shares the daemon's file system (locate())
    rebuilds.json, index.damaged-*, space.reserve: see opening.py and nospace.py (all 0600/0700)
Damage to the index never crashes: opening walks it in a child process and rebuilds it from the
payload files, which describe themselves (opening.py). A full disk is a ResourceExhausted.

Durability (a put is acknowledged only when durable): payload files are written to temp names,
fsynced, renamed, the directory fsynced, and only then is the index committed (LMDB synced
commit). A crash leaves at worst payload files without index records (orphans, deleted when a
writer opens the store) or temp files (same): nothing torn is ever reachable through the index.

Verification (a corrupt store never serves a wrong block and never crashes the reader): get_block
checks the record frame CRC, namespace, parent, stored token ids and layout, then the payload
header, self-description CRC and every chunk CRC. Any mismatch is counted, the block and its
subtree are quarantined (writer) and the caller gets NotFound; but a writer heals a damaged
record (frame CRC, undecodable) from its verified payload file and serves it (heal.py). lookup
verifies the frame CRC of the records its binary search touches; it relies on prefix closure
(index.py) to be O(log n) in the chain length.

Trailing partial blocks (chain.py): a chain's last block may hold the m < block_size tokens after
its last full block, so that a repeated prompt is a full hit. It is a leaf like any other (its
parent stays until it is gone), stored, verified, healed, quarantined, evicted and rebuilt exactly
as a full block; only its key, token ids and layout (L, H, m, D) differ (targets.py). It is a
local block only: the remote tier never gets one (remote/tiers.py).

Concurrency: one writer process (flock); within it, writes are serialized by a lock and reads run
concurrently. Other processes open readonly and read while the writer writes (LMDB MVCC; a payload
file evicted under a reader is a plain miss, a replaced one is re-checked against a fresh record).
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import lmdb

from tqstore.blocks import BlockPayload
from tqstore.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from tqstore.prefix_hash import BlockHash, Namespace
from tqstore.ssd import payload as pl
from tqstore.ssd.chain import chain_hashes, token_array
from tqstore.ssd.check import CheckReport, run_check
from tqstore.config import StoreConfig
from tqstore.ssd.eviction import Evicted, evict_in_steps, evict_lru
from tqstore.ssd.heal import Healed, heal_record, layout_of, record_mismatch, undecodable_sizes
from tqstore.ssd.leases import Leases
from tqstore.ssd.nospace import SpaceReserve, space_errors
from tqstore.ssd.opening import open_reader_index, open_writer_index, prepare_writer, read_history
from tqstore.ssd.payload import PayloadError
from tqstore.ssd.rebuild import RebuildOutcome
from tqstore.ssd.records import KIND_BLOCK, BlockRecord, NamespaceRecord, RecordError, check_frame
from tqstore.ssd.selfdesc import encode_description
from tqstore.ssd.stats import StoreStats, read_stats
from tqstore.ssd.targets import (get_target, locate_records, locate_targets, partial_target,
                                 put_targets)

# Budget headroom for LMDB growth of one put: copy-on-write can dirty a root-to-leaf path in each
# of the six databases before freed pages become reusable, plus about 3x each new record (record,
# children and leaf entries, page slack). LMDB's used pages are a high-water mark, so the estimate
# errs high.
_INDEX_TXN_PAGES = 16
_INDEX_BYTES_PER_BLOCK = 2400
log = logging.getLogger("tqstore.ssd.store")


class BlockStore:
    """The SSD tier. See the module docstring for the invariants."""

    def __init__(self, path: str | os.PathLike, config: StoreConfig | None = None, *,
                 readonly: bool = False) -> None:
        self.path = os.fspath(path)
        self.config = config or StoreConfig()
        self.readonly = readonly
        self.blocks_dir = os.path.join(self.path, "blocks")
        self._lock = threading.RLock()
        self._pending_touch: dict[bytes, list[int]] = {}
        self._pending: dict[str, int] = {}
        self._last_flush = time.monotonic()
        self._clock = 0
        self._lock_fd: int | None = None
        self.leases = Leases()
        self._reserve = SpaceReserve(self.path)
        self.store_id = ""
        self.rebuild: RebuildOutcome | None = None  # set when this open rebuilt the index
        if readonly:
            if not os.path.isdir(os.path.join(self.path, "index")):
                raise NotFound(f"no store at {self.path}")
        else:
            os.makedirs(self.blocks_dir, mode=pl.DIR_MODE, exist_ok=True)
            self._lock_fd = os.open(os.path.join(self.path, "writer.lock"), os.O_RDWR | os.O_CREAT, pl.FILE_MODE)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                self._lock_fd = None
                raise Unavailable(f"another process is writing the store at {self.path}") from None
        try:
            if readonly:
                self._idx = open_reader_index(self.path, self.config.map_size)
            else:
                self._idx, self.rebuild = open_writer_index(self.path, self.config.map_size)
        except BaseException:
            self._release_lock()
            raise
        threads = self.config.read_threads - 1
        self._executor = ThreadPoolExecutor(threads, "tqstore-ssd-read") if threads > 0 else None
        if not readonly:
            self.recovered_orphans, self.store_id = prepare_writer(self.path, self._idx, self._reserve)

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_idx", None) is None:
            return
        if not self.readonly:
            try:  # a full disk at SIGTERM loses batched access times, not a clean exit
                self.flush()
            except Exception as exc:
                log.error("store close: batched access times and counters not persisted: %s", exc)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._idx.env.close()
        self._idx = None  # type: ignore[assignment]
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "BlockStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _file(self, key: bytes) -> str:
        return os.path.join(self.blocks_dir, key.hex() + ".blk")

    def _now(self) -> int:
        """Strictly increasing ns timestamps, so LRU order within a process is total."""
        self._clock = max(time.time_ns(), self._clock + 1)
        return self._clock

    # -- put ------------------------------------------------------------------------------------
    def put_blocks(self, namespace: Namespace, token_ids: Sequence[int], first_block: int,
                   payloads: Sequence[BlockPayload], partial: bool = False) -> list[BlockHash]:
        """Store blocks first_block .. first_block+len(payloads)-1 of the chain of token_ids;
        with partial, the last payload is the trailing partial block (chain.py, (L, H, m, D) for
        the m = len % block_size tail tokens) at index len // block_size, the others the full
        blocks before it. Blocks before first_block must be present (NotFound otherwise: no
        orphans). Idempotent. Returns their hashes (the partial's last) once durable (payload
        fsynced, index committed)."""
        if self.readonly:
            raise InvalidArgument("store opened readonly")
        tokens = token_array(token_ids)
        hashes, targets = put_targets(namespace, tokens, first_block, payloads, partial)
        root = namespace.root_hash()
        cfg = self.config
        with self._lock, space_errors("put", self.path):
            with self._idx.env.begin(db=self._idx.blocks) as txn:
                for i in range(first_block):
                    if txn.get(hashes[i]) is None:
                        raise NotFound(f"block {i} of the chain is not stored; put it first")
                new = [j for j, t in enumerate(targets) if txn.get(t.key) is None]
            if not new:
                return [BlockHash(t.key) for t in targets]
            now = self._now()
            ns_rec = NamespaceRecord.of(namespace, now)
            encoded, records = {}, {}
            for j in new:  # each file describes itself (selfdesc.py): the index is rebuildable
                t = targets[j]
                e = pl.encode(payloads[j], cfg.compression, cfg.zstd_level, cfg.checksum_chunk)
                rec = BlockRecord(
                    ns=root, parent=t.parent, index=t.index, tokens=t.tokens,
                    n_tokens=t.n_tokens, layout=layout_of(namespace, t.n_tokens),
                    dtype=namespace.kv_dtype, format_version=namespace.format_version,
                    compression=e.compression, raw_size=e.raw_size, stored_size=e.stored_size,
                    file_size=0, chunks=e.chunks, created=now, access=now)
                encoded[j] = e.described(encode_description(rec, ns_rec))
                records[j] = dataclasses.replace(rec, file_size=encoded[j].file_size)
            need = sum(pl.allocated(e.file_size) for e in encoded.values())
            need += _INDEX_TXN_PAGES * 4096 + len(new) * (
                3 * 4 * namespace.block_size + _INDEX_BYTES_PER_BLOCK)
            self._make_room(need, frozenset(hashes) | {t.key for t in targets})
            written: list[str] = []
            try:
                for j in new:
                    path = self._file(targets[j].key)
                    pl.write_file(path, targets[j].key, encoded[j])
                    written.append(path)
                pl.fsync_dir(self.blocks_dir)
                with self._idx.env.begin(write=True) as txn:
                    self._flush_in(txn)
                    if txn.get(root, db=self._idx.namespaces) is None:
                        txn.put(root, ns_rec.encode(), db=self._idx.namespaces)
                    for j in new:  # parents first: prefix closure holds inside the txn too
                        self._idx.insert(txn, targets[j].key, records[j])
            except BaseException:
                for path in written:  # never acknowledged: remove now rather than at next open
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
                raise
        return [BlockHash(t.key) for t in targets]

    def _make_room(self, need: int, protect: frozenset[bytes]) -> None:
        with self._idx.env.begin(db=self._idx.meta) as txn:
            used = self._idx.counters(txn)["payload_bytes"]
        over = used + self._idx.used_bytes() + need - self.config.max_bytes
        if over <= 0:
            return
        # Leased blocks go last: a same-host reader was just told where they are.
        freed = self._evict(over, protect | self.leases.live())
        if freed < over:
            freed += self._evict(over - freed, protect)
        if freed < over:
            raise ResourceExhausted(f"put needs {need} bytes; the budget of {self.config.max_bytes} "
                                    f"cannot make room without evicting the chain itself")

    # -- lookup / get ---------------------------------------------------------------------------
    def lookup(self, namespace: Namespace, token_ids: Sequence[int]) -> int:
        """Number of leading full blocks present (records' frame CRC verified; counts stats)."""
        tokens = token_array(token_ids)
        found = self.lookup_hashes(namespace, chain_hashes(namespace, tokens))
        self.count_lookup(len(tokens), found * namespace.block_size)
        return found

    def count_lookup(self, lookup_tokens: int, hit_tokens: int) -> None:
        """Count one lookup in the persisted stats (the daemon's tiers count hits of both)."""
        self._count({"lookups": 1, "lookup_tokens": lookup_tokens, "hit_tokens": hit_tokens})

    def count_partial_hit(self, tokens: int) -> None:
        """Add a trailing partial block's tokens to the hit tokens of the lookup just counted."""
        if tokens:
            self._count({"hit_tokens": tokens})

    def lookup_hashes(self, namespace: Namespace, hashes: Sequence[bytes]) -> int:
        """lookup() for a chain the caller already hashed (the generator hashes its prompt
        anyway; SHA-256 of 128k tokens alone costs ~1.5 ms here). Does not count stats.

        A binary search over the chain, valid because presence is prefix-closed (index.py).
        It verifies the frame CRC of every record it visits; a damaged record there is healed
        or quarantined (writer, heal.py) and the search repeated. Records it does not visit are
        verified by get_block (which heals, or quarantines the block and its subtree): a caller
        treats the first NotFound from get_block as the end of its hit."""
        found = 0
        for _attempt in range(3):
            bad = None
            with self._idx.env.begin(db=self._idx.blocks, buffers=True) as txn:
                lo, hi = 0, len(hashes)  # blocks < lo present, blocks >= hi absent or bad
                while lo < hi:
                    mid = (lo + hi) // 2
                    raw = txn.get(hashes[mid])
                    if raw is None:
                        hi = mid
                        continue
                    try:
                        check_frame(KIND_BLOCK, raw)
                        lo = mid + 1
                    except RecordError:
                        bad, hi = mid, mid
                found = lo
            if bad is None:
                break
            self._fail(hashes[bad], hashes[bad - 1] if bad else namespace.root_hash(),
                       "index record corrupt (lookup)", None, namespace, heal=True)
            if self.readonly:
                break
        return found

    def lookup_partial(self, namespace: Namespace, token_ids: Sequence[int]) -> int:
        """m if the trailing partial block of token_ids (its m = len % block_size tail tokens,
        chain.py) is stored with its record's frame CRC verified and all k full blocks before it
        are present; else 0 (also when there is no tail). Counts no stats (the caller counted
        the lookup). A damaged partial record is healed from its file or quarantined (writer),
        as in lookup_hashes, which then repeats its search: a healed partial is a hit."""
        tokens = token_array(token_ids)
        k = len(tokens) // namespace.block_size
        hashes = chain_hashes(namespace, tokens, k)
        t = partial_target(namespace, tokens, hashes)
        if t is None or self.lookup_hashes(namespace, hashes) < k:
            return 0
        for _attempt in range(2):
            with self._idx.env.begin(db=self._idx.blocks, buffers=True) as txn:
                raw = txn.get(t.key)
                if raw is None:
                    return 0
                try:
                    check_frame(KIND_BLOCK, raw)
                    return t.n_tokens
                except RecordError:
                    pass
            if self._fail(t.key, t.parent, "index record corrupt (lookup)", None, namespace,
                          heal=True, tokens=t.tokens) is None:
                return 0
        return 0

    def get_block(self, namespace: Namespace, token_ids: Sequence[int], index: int,
                  partial: bool = False) -> BlockPayload:
        """Block `index` of the chain, verified; NotFound on a miss or a failed verification.
        partial and index == len // block_size (a non-empty tail): the trailing partial block,
        keys and values (L, H, m, D), verified and healed or quarantined exactly as a full one."""
        t = get_target(namespace, token_array(token_ids), index, partial)
        key, parent, want_tokens = t.key, t.parent, t.tokens
        reason, raw = "", None
        for _attempt in range(2):
            heal = False  # set only by a record that fails to decode, never by its payload
            with self._idx.env.begin(db=self._idx.blocks) as txn:
                raw = txn.get(key)
            if raw is None:
                self._count({"gets": 1})
                raise NotFound("block not stored")
            try:
                rec = BlockRecord.decode(raw)
                reason = record_mismatch(rec, parent, namespace, want_tokens)
                if not reason:
                    body = pl.read_file(self._file(key), key, rec.file_size, rec.stored_size,
                                        rec.raw_size, rec.compression, rec.chunks, self._executor)
                    block = pl.decode(body, rec.layout)
                    self._touch(key)
                    return block
            except FileNotFoundError:
                reason = "payload file missing"
            except (RecordError, PayloadError) as exc:
                reason, heal = str(exc), isinstance(exc, RecordError)
            except Exception as exc:  # a corrupt store must never crash the reader
                reason = f"unexpected {type(exc).__name__}: {exc}"
            with self._idx.env.begin(db=self._idx.blocks) as txn:
                again = txn.get(key)
            if again is None:  # evicted under us: a plain miss, not corruption
                self._count({"gets": 1})
                raise NotFound("block evicted")
            if again == raw:
                break  # same record, still bad: corruption
        healed = self._fail(key, parent, reason, raw, namespace, heal, want_tokens)
        if healed is not None:
            self._touch(key)
            return healed.block
        self._count({"gets": 1})
        raise NotFound(f"block failed verification: {reason}")

    def locate(self, namespace: Namespace, token_ids: Sequence[int], first_block: int,
               num_blocks: int, lease_s: float, partial: bool = False) -> list[tuple[int, BlockRecord]]:
        """The index records of blocks first_block .. (at most num_blocks; 0: all present) whose
        records verify (frame CRC, namespace, parent, token ids, layout), for a reader that
        verifies the payload bytes itself; they are leased against eviction for lease_s. A
        record that fails is healed, or quarantined and ends the list, as in get_block.
        partial: the trailing partial block instead (first_block its index len // block_size,
        num_blocks 0 or 1): [] or its one record."""
        targets = locate_targets(namespace, token_array(token_ids), first_block, num_blocks,
                                 partial)
        keys = {t.index: t.key for t in targets}
        for _attempt in range(3):  # again after a healed record (heal.py)
            found, bad = locate_records(self._idx, namespace, targets)
            if not bad or self._fail(*bad) is None:
                break
        if found:
            self.leases.grant([keys[i] for i, _ in found], lease_s)
            for i, _ in found:
                self._touch(keys[i])
        return found

    def _fail(self, key: bytes, parent: bytes, reason: str, raw: bytes | None, ns: Namespace,
              heal: bool = False, tokens: bytes | None = None) -> Healed | None:
        """Count a verification failure. A writer heals a damaged record (heal: the record, not
        the payload, failed; tokens: the block's token ids if known) from its verified payload
        file (heal.py) and returns what it healed, or else quarantines the block and its
        subtree (None)."""
        if self.readonly:
            self._count({"verification_failures": 1})
            return None
        with self._lock:
            if heal and (healed := heal_record(self._idx, self._file(key), key, parent, ns, tokens,
                                               self._now(), self._executor)) is not None:
                return healed
            doomed: list[bytes] = []
            with self._idx.env.begin(write=True) as txn:
                self._idx.add_counters(txn, {"verification_failures": 1})
                cur = txn.get(key, db=self._idx.blocks)
                if cur is None:
                    return None
                for k in self._idx.subtree(txn, key) + [key]:
                    kraw = txn.get(k, db=self._idx.blocks)
                    try:
                        krec = BlockRecord.decode(kraw) if kraw is not None else None
                    except RecordError:
                        krec = None
                    sizes = None if krec else undecodable_sizes(
                        self._file(k), ns, len(tokens) // 4 if k == key and tokens else None)
                    self._idx.remove(txn, k, krec, parent if k == key else None, sizes)
                    if k == key:
                        self._idx.quarantine_record(txn, k, reason, self._now(), bytes(cur))
                        self._idx.add_counters(txn, {"quarantined": 1})
                    doomed.append(k)
            for k in doomed:
                self._pending_touch.pop(k, None)
                try:
                    os.unlink(self._file(k))
                except FileNotFoundError:
                    pass
        return None

    # -- access batching ------------------------------------------------------------------------
    def _count(self, delta: dict[str, int]) -> None:
        with self._lock:
            for k, v in delta.items():
                self._pending[k] = self._pending.get(k, 0) + v
        self._maybe_flush()

    def _touch(self, key: bytes) -> None:
        with self._lock:
            entry = self._pending_touch.setdefault(key, [0, 0])
            entry[0] = self._now()
            entry[1] += 1
            self._pending["gets"] = self._pending.get("gets", 0) + 1
            self._pending["get_hits"] = self._pending.get("get_hits", 0) + 1
        self._maybe_flush()

    def _maybe_flush(self, force: bool = False) -> None:
        if self.readonly:
            return
        if (force or len(self._pending_touch) >= self.config.access_flush_count
                or time.monotonic() - self._last_flush >= self.config.access_flush_interval_s):
            try:
                self.flush()
            except (lmdb.Error, OSError) as exc:  # a full disk must not fail the read that flushes
                self._last_flush = time.monotonic()
                log.warning("access times and counters not persisted: %s", exc)

    def flush(self) -> None:
        """Persist batched last-access times, hit counts and counters (one txn)."""
        if self.readonly:
            return
        with self._lock:
            if self._pending_touch or self._pending:
                with self._idx.env.begin(write=True) as txn:
                    self._flush_in(txn)
            self._last_flush = time.monotonic()

    def _flush_in(self, txn: lmdb.Transaction) -> None:
        for key, (access, hits) in self._pending_touch.items():
            self._idx.touch(txn, key, access, hits)
        self._idx.add_counters(txn, self._pending)
        self._pending_touch, self._pending = {}, {}

    # -- evict / stats / check ------------------------------------------------------------------
    def evict(self, bytes_to_free: int) -> int:
        """Evict LRU leaves until at least bytes_to_free payload bytes are freed; returns freed."""
        if self.readonly:
            raise InvalidArgument("store opened readonly")
        with space_errors("evict", self.path):
            freed = self._evict(bytes_to_free, self.leases.live())
            if freed < bytes_to_free:
                freed += self._evict(bytes_to_free - freed, frozenset())
        return freed

    def _evict(self, bytes_to_free: int, protect: frozenset[bytes]) -> int:
        with self._lock:
            return evict_in_steps(bytes_to_free, lambda n: self._evict_txn(n, protect),
                                  self.blocks_dir, self._reserve)

    def _evict_txn(self, bytes_to_free: int, protect: frozenset[bytes]) -> list[Evicted]:
        with self._idx.env.begin(write=True) as txn:
            self._flush_in(txn)
            return evict_lru(self._idx, txn, bytes_to_free, protect)

    def stats(self) -> StoreStats:
        with self._lock:
            pending = dict(self._pending)
        stats = read_stats(self._idx, pending, self.config.max_bytes, self.config.compression)
        return dataclasses.replace(stats, **dataclasses.asdict(read_history(self.path)))

    def check(self, repair: bool = False) -> CheckReport:
        """Walk the whole store (every record, every payload byte); optionally repair."""
        if repair and self.readonly:
            raise InvalidArgument("repair needs the writer (store opened readonly)")
        with self._lock, space_errors("check", self.path):
            self._maybe_flush(force=True)
            return run_check(self._idx, self.blocks_dir, self._executor, repair, self._now)
