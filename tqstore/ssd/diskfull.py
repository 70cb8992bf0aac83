"""Disk-full harness: fill a store on a real small file system until puts fail, then prove the
store stayed honest.

On a directory that is a small file system of its own (tests and tools/disk_full.py mount a
tmpfs), with a ballast file beside the store and a byte budget far above the file system's size
(so the disk fills before the store would evict), it puts chains until several puts in a row
fail, then asserts:
- every failed put raised ResourceExhausted (nothing else: no bare OSError or lmdb.Error);
- no temp payload file remains, and check is clean (no orphan of a failed put);
- every acknowledged block reads back bitwise (content is a function of the hash, soak.py);
- after deleting the ballast, puts work again; after filling again, evict() frees room and puts
  work again; close() is clean (it flushes on a full disk) and a reopen sees every block.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from tqstore.errors import ResourceExhausted
from tqstore.prefix_hash import Namespace
from tqstore.config import StoreConfig
from tqstore.ssd.chain import chain_hashes, token_array
from tqstore.ssd.soak import expected_payload

DISK_NAMESPACE = Namespace("disk-full-model", num_layers=4, num_kv_heads=2, head_dim=64,
                           block_size=16)
CHAIN = 4
log = logging.getLogger("tqstore.ssd.diskfull")


@dataclass
class DiskFullReport:
    acked_blocks: int = 0
    failed_puts: int = 0  # ResourceExhausted
    failure_causes: dict[str, int] = field(default_factory=dict)  # what the disk raised first
    wrong_errors: list[str] = field(default_factory=list)  # any other exception from a put
    temp_files_left: int = 0
    verified_blocks: int = 0
    lost_or_wrong: int = 0
    check_ok: bool = False
    put_after_freeing: bool = False
    put_after_evict: bool = False
    close_clean: bool = False
    reopen_verified: int = 0

    @property
    def ok(self) -> bool:
        return (self.failed_puts > 0 and not self.wrong_errors and not self.temp_files_left
                and not self.lost_or_wrong and self.check_ok and self.put_after_freeing
                and self.put_after_evict and self.close_clean
                and self.reopen_verified == self.acked_blocks)


def _tokens(family: int) -> np.ndarray:
    rng = np.random.default_rng(family)
    return token_array(rng.integers(0, 49152, CHAIN * DISK_NAMESPACE.block_size))


def _put(store, family: int, report: DiskFullReport, acked: dict[int, int]) -> bool:
    """Put one chain; True if acknowledged, False on ResourceExhausted."""
    ns = DISK_NAMESPACE
    toks = _tokens(family)
    try:
        store.put_blocks(ns, toks, 0, [expected_payload(ns, h) for h in chain_hashes(ns, toks)])
    except ResourceExhausted as exc:
        report.failed_puts += 1
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "budget"
        report.failure_causes[cause] = report.failure_causes.get(cause, 0) + 1
        return False
    except Exception as exc:  # noqa: BLE001  (the point: nothing but ResourceExhausted)
        report.wrong_errors.append(f"{type(exc).__name__}: {exc}")
        return False
    acked[family] = CHAIN
    return True


def _fill(store, start: int, report: DiskFullReport, acked: dict[int, int], limit: int) -> int:
    """Put fresh chains until 3 puts in a row fail; returns the next family number."""
    fam, misses = start, 0
    while misses < 3 and fam < start + limit:
        misses = 0 if _put(store, fam, report, acked) else misses + 1
        fam += 1
    return fam


def _verify(store, acked: dict[int, int]) -> int:
    """How many acknowledged blocks (the first acked[family] of each chain) read back bitwise."""
    from tqstore.errors import NotFound

    ns, good = DISK_NAMESPACE, 0
    for fam, count in acked.items():
        toks = _tokens(fam)
        for i, h in enumerate(chain_hashes(ns, toks, count)):
            try:
                got = store.get_block(ns, toks, i)
            except NotFound:
                continue
            want = expected_payload(ns, h)
            if (np.array_equal(got.keys.view(np.uint16), want.keys.view(np.uint16))
                    and np.array_equal(got.values.view(np.uint16), want.values.view(np.uint16))):
                good += 1
    return good


def run_disk_full(mount: str, ballast_bytes: int = 1 << 20, limit: int = 2000) -> DiskFullReport:
    """Run the scenario in `mount`, a small file system of its own (see the module docstring)."""
    from tqstore.ssd.store import BlockStore

    report = DiskFullReport()
    ballast = os.path.join(mount, "ballast")
    with open(ballast, "wb") as f:
        f.write(os.urandom(ballast_bytes))
    path = os.path.join(mount, "store")
    acked: dict[int, int] = {}  # family -> leading blocks acknowledged (and not evicted)
    cfg = StoreConfig(max_bytes=1 << 40, map_size=1 << 26)
    store = BlockStore(path, cfg)
    try:
        fam = _fill(store, 0, report, acked, limit)
        report.temp_files_left = sum(not n.endswith(".blk") for n in os.listdir(store.blocks_dir))
        report.acked_blocks = sum(acked.values())
        report.verified_blocks = _verify(store, acked)
        report.lost_or_wrong = report.acked_blocks - report.verified_blocks
        report.check_ok = store.check().ok
        os.unlink(ballast)
        report.put_after_freeing = _put(store, fam, report, acked)
        fam = _fill(store, fam + 1, report, acked, limit)
        freed = store.evict(4 * ballast_bytes)
        for f in acked:  # eviction takes LRU leaves: a chain may keep a prefix
            acked[f] = store.lookup(DISK_NAMESPACE, _tokens(f))
        report.put_after_evict = freed > 0 and _put(store, fam, report, acked)
        report.temp_files_left += sum(not n.endswith(".blk") for n in os.listdir(store.blocks_dir))
        report.acked_blocks = sum(acked.values())
    finally:
        try:
            store.close()
            report.close_clean = True
        except Exception as exc:  # noqa: BLE001
            report.wrong_errors.append(f"close: {type(exc).__name__}: {exc}")
    with BlockStore(path, cfg) as again:
        report.reopen_verified = _verify(again, acked)
        report.check_ok = report.check_ok and again.check().ok
    return report
