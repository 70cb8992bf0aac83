"""What `BlockStore.stats()` reports (and `tqstore inspect` prints)."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0
