"""What `BlockStore.stats()` reports (and `tqstore inspect` prints), read from the index."""

from __future__ import annotations

from dataclasses import dataclass, field

from tqstore.ssd.records import NamespaceRecord, RecordError


@dataclass(frozen=True)
class NamespaceStats:
    digest: str  # Namespace.digest_hex()
    model: str
    layout: tuple[int, int, int, int]  # (num_layers, num_kv_heads, block_size, head_dim)
    block_size: int
    format_version: int
    blocks: int
    bytes: int  # allocated payload bytes


@dataclass(frozen=True)
class StoreStats:
    """Counters since the store was created (persisted, batched like last access) plus the live
    size of the store. Hit rate is counted in tokens, as vLLM does."""

    blocks: int
    bytes_on_disk: int  # payload_bytes + index_bytes: what max_bytes bounds
    payload_bytes: int
    index_bytes: int
    logical_bytes: int  # fp16 K+V bytes of the live blocks
    max_bytes: int
    compression: str
    lookups: int
    lookup_tokens: int
    hit_tokens: int
    gets: int
    get_hits: int
    evictions: int
    verification_failures: int
    quarantined: int
    namespaces: list[NamespaceStats] = field(default_factory=list)
    block_size_histogram: dict[int, int] = field(default_factory=dict)  # tokens/block -> blocks
    # Rebuilds of a damaged or missing index from the payload files (opening.py, rebuilds.json;
    # they survive the index). Lost blocks: payload files that failed verification or whose
    # parent was lost. The usage counters above restart from zero at a rebuild.
    index_rebuilds: int = 0
    rebuild_recovered_blocks: int = 0
    rebuild_lost_blocks: int = 0
    last_rebuild_time_ns: int = 0  # ns since epoch; 0: never
    last_rebuild_reason: str = ""
    last_rebuild_seconds: float = 0.0
    # Damaged index records rewritten from their verified payload files instead of quarantining
    # the block and its subtree (heal.py; each also counts as a verification failure).
    healed_records: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


def read_stats(idx, pending: dict[str, int], max_bytes: int, compression: str) -> StoreStats:
    """The persisted counters plus `pending` (counted, not yet flushed), the live namespaces
    (records that fail to decode are left out) and the index's size. idx: tqstore.ssd.index.Index."""
    with idx.env.begin() as txn:
        c = idx.counters(txn)
        rows: list[NamespaceStats] = []
        hist: dict[int, int] = {}
        for k, v in txn.cursor(db=idx.namespaces):
            try:
                r = NamespaceRecord.decode(v)
            except RecordError:
                continue
            if r.blocks <= 0:
                continue
            rows.append(NamespaceStats(bytes(k).hex()[:16], r.model,
                                       (r.num_layers, r.num_kv_heads, r.block_size, r.head_dim),
                                       r.block_size, r.format_version, r.blocks, r.bytes))
            hist[r.block_size] = hist.get(r.block_size, 0) + r.blocks
    for k, v in pending.items():
        c[k] = c.get(k, 0) + v
    index_bytes = idx.used_bytes()
    return StoreStats(
        blocks=c["blocks"], bytes_on_disk=c["payload_bytes"] + index_bytes,
        payload_bytes=c["payload_bytes"], index_bytes=index_bytes,
        logical_bytes=c["logical_bytes"], max_bytes=max_bytes, compression=compression,
        lookups=c["lookups"], lookup_tokens=c["lookup_tokens"], hit_tokens=c["hit_tokens"],
        gets=c["gets"], get_hits=c["get_hits"], evictions=c["evictions"],
        verification_failures=c["verification_failures"], quarantined=c["quarantined"],
        namespaces=sorted(rows, key=lambda r: (-r.bytes, r.digest)),
        block_size_histogram=dict(sorted(hist.items())), healed_records=c["healed"])
