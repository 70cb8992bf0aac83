"""The daemon's Stats answer: the store's statistics, the tiers' counters, recent request hit
rates and the attention path, as one StatsResponse (tqstore.server's Stats handler).

It fits the message limit whatever the store holds: at most max_stats_namespaces namespace
rows (the largest by bytes; the rest counted in namespaces_omitted), strings cut to
max_string_bytes.
"""

from __future__ import annotations

from tqstore.config import ServerConfig
from tqstore.ssd.stats import StoreStats
from tqstore.v1 import tqstore_pb2 as pb


def stats_response(s: StoreStats, recent: list[float], tiers: dict[str, object],
                   config: ServerConfig) -> pb.StatsResponse:
    shown = s.namespaces[:config.max_stats_namespaces]  # largest by bytes first
    cut = config.max_string_bytes
    return pb.StatsResponse(
        blocks=s.blocks, bytes_on_disk=s.bytes_on_disk, logical_bytes=s.logical_bytes,
        max_bytes=s.max_bytes, lookups=s.lookups, lookup_tokens=s.lookup_tokens,
        hit_tokens=s.hit_tokens, evictions=s.evictions,
        verification_failures=s.verification_failures, quarantined=s.quarantined,
        compression=s.compression, payload_bytes=s.payload_bytes, index_bytes=s.index_bytes,
        namespaces=[pb.NamespaceRow(digest=n.digest, model=_cut_text(n.model, cut),
                                    num_layers=n.layout[0], num_kv_heads=n.layout[1],
                                    head_dim=n.layout[3], block_size=n.block_size,
                                    blocks=n.blocks, bytes=n.bytes)
                    for n in shown],
        namespaces_omitted=len(s.namespaces) - len(shown),
        block_size_histogram=dict(s.block_size_histogram),
        recent_request_hit_rates=recent, attention_backend=_attention_backend(),
        tiers=_tier_stats(tiers),
        index_rebuilds=s.index_rebuilds, rebuild_recovered_blocks=s.rebuild_recovered_blocks,
        rebuild_lost_blocks=s.rebuild_lost_blocks,
        last_rebuild_time_ns=s.last_rebuild_time_ns,
        last_rebuild_reason=_cut_text(s.last_rebuild_reason, 1024),
        healed_records=s.healed_records)


def _cut_text(text: str, max_bytes: int) -> str:
    """At most max_bytes of UTF-8, cut at a character boundary (stores written before the
    string bound may hold longer fingerprints: Stats shows them cut rather than failing)."""
    data = text.encode("utf-8", "surrogatepass")
    return text if len(data) <= max_bytes else data[:max_bytes].decode("utf-8", "ignore")


def _tier_stats(stats: dict[str, object]) -> pb.TierStats:
    """Tiers.stats() as the proto message: counters keep their names; the local copies are the
    filler's "fills"."""
    renamed = {"fills": "local_copies", "fills_failed": "local_copies_failed",
               "fills_dropped": "local_copies_dropped"}
    fields = {f.name for f in pb.TierStats.DESCRIPTOR.fields}
    out = {}
    for key, value in stats.items():
        name = renamed.get(key, key)
        if name in fields:
            out[name] = value
    return pb.TierStats(**out)


def _attention_backend() -> str:
    try:
        from tqstore.metal.dispatch import active_backend
    except ImportError:
        return "reference"
    return active_backend()
