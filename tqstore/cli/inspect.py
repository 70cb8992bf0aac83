"""`tqstore inspect --path P | --addr A | --endpoint URL [--json]`: what a store holds and how
well it hits, or what a serving endpoint is doing.

--path opens the store read-only (works while the daemon writes: LMDB readers never block the
writer); --addr asks a running daemon, which adds per-request hit rates and the attention path;
--endpoint reads a `tqstore openai` endpoint's live figures (its GET /v1/stats).
"""

from __future__ import annotations

import argparse
import json
import string
import sys
import time
from typing import Any

from tqstore.cli.connection_args import add_connection_arguments, client_config_from
from tqstore.units import human_bytes

# The wire names a model only by its fingerprint (sha256 of the weights, tqstore.models.loader):
# names for the models tqstore ships come from here. tests/cli/test_inspect_names.py pins the
# entry against the installed weights.
KNOWN_MODELS = {
    "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53":
        "SmolLM2-135M-Instruct (bundled)",
}
NAME_WIDTH = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--path", help="store directory (opened read-only)")
    where.add_argument("--addr", help="daemon address (unix:/path or host:port)")
    where.add_argument("--endpoint", help="a `tqstore openai` endpoint, e.g. "
                                          "http://127.0.0.1:8080 (its live figures)")
    parser.add_argument("--json", action="store_true",
                        help="machine-readable output (full model fingerprints, raw strings)")
    add_connection_arguments(parser)  # with --addr: the daemon's token and TLS


def printable(text: str) -> str:
    """Client-supplied text made safe to print: control characters, line breaks, escape
    sequences and other non-printables become Python escapes (backslashes doubled, so the
    escaping reads unambiguously); printable Unicode stays as it is."""
    return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in text)


def model_name(fingerprint: str) -> str:
    """A readable name for a namespace's model: the known name, else "unnamed" and the start of
    its weights' sha256, else (a fingerprint that is not a sha256) the client's text, escaped."""
    if fingerprint in KNOWN_MODELS:
        return KNOWN_MODELS[fingerprint]
    kind, _, digest = fingerprint.partition(":")
    if kind == "sha256" and len(digest) == 64 and set(digest) <= set(string.hexdigits):
        return f"unnamed sha256:{digest[:12]}"
    return printable(fingerprint)


def _row(digest: str, model: str, layers: int, heads: int, head_dim: int, block_size: int,
         blocks: int, nbytes: int) -> dict[str, Any]:
    return {"digest": digest, "model": model, "model_name": model_name(model),
            "num_layers": layers, "num_kv_heads": heads, "head_dim": head_dim,
            "block_size": block_size, "blocks": blocks, "bytes": nbytes}


_COUNTERS = ("blocks", "bytes_on_disk", "payload_bytes", "index_bytes", "logical_bytes",
             "max_bytes", "compression", "lookups", "lookup_tokens", "hit_tokens", "evictions",
             "verification_failures", "quarantined")
# Rebuilds of a damaged or missing index from the payload files (tqstore/ssd/opening.py).
_REBUILDS = ("index_rebuilds", "rebuild_recovered_blocks", "rebuild_lost_blocks",
             "last_rebuild_time_ns", "last_rebuild_reason", "healed_records")


def _view(source: str, stats: Any, namespaces: list[dict[str, Any]], rates, backend,
          omitted: int = 0) -> dict[str, Any]:
    """One shape for StoreStats (read from disk) and StatsResponse (from the daemon)."""
    view = {"source": source, **{name: getattr(stats, name) for name in _COUNTERS + _REBUILDS}}
    view.update(namespaces=namespaces, namespaces_omitted=omitted,
                recent_request_hit_rates=rates, attention_backend=backend,
                block_size_histogram={int(k): int(v) for k, v in stats.block_size_histogram.items()})
    return view


def _from_store(path: str) -> dict[str, Any]:
    from tqstore.ssd.store import BlockStore

    with BlockStore(path, readonly=True) as store:
        s = store.stats()
    namespaces = [_row(n.digest, n.model, n.layout[0], n.layout[1], n.layout[3], n.block_size,
                       n.blocks, n.bytes) for n in s.namespaces]
    return _view(f"path {path}", s, namespaces, None, None)


def _from_daemon(config) -> dict[str, Any]:
    from tqstore.client import KvStoreClient

    with KvStoreClient(config) as client:
        s = client.stats()
    namespaces = [_row(n.digest, n.model, n.num_layers, n.num_kv_heads, n.head_dim,
                       n.block_size, n.blocks, n.bytes) for n in s.namespaces]
    view = _view(f"daemon {config.address}", s, namespaces, list(s.recent_request_hit_rates),
                 s.attention_backend, s.namespaces_omitted)
    from google.protobuf.json_format import MessageToDict

    view["tiers"] = MessageToDict(s.tiers, preserving_proto_field_name=True,
                                  always_print_fields_with_no_presence=True)
    return view


def summarize(view: dict[str, Any]) -> dict[str, Any]:
    """Adds the derived figures (hit rate, compression, per-bucket bytes)."""
    view = dict(view)
    view["hit_rate"] = view["hit_tokens"] / view["lookup_tokens"] if view["lookup_tokens"] else 0.0
    view["compression_ratio"] = (view["logical_bytes"] / view["payload_bytes"]
                                 if view["payload_bytes"] else None)
    buckets: dict[int, dict[str, int]] = {}
    for ns in view["namespaces"]:
        b = buckets.setdefault(ns["block_size"], {"blocks": 0, "bytes": 0})
        b["blocks"] += ns["blocks"]
        b["bytes"] += ns["bytes"]
    view["block_size_table"] = [{"tokens": k, **v} for k, v in sorted(buckets.items())]
    rates = view.get("recent_request_hit_rates")
    if rates:
        ordered = sorted(rates)
        view["per_request_hit_rate"] = {"requests": len(rates), "mean": sum(rates) / len(rates),
                                        "p50": ordered[len(ordered) // 2], "min": ordered[0],
                                        "full_hits": sum(r >= 1.0 for r in rates)}
    return view


def render(view: dict[str, Any]) -> str:
    # Every string that did not come from this program goes through printable(): fingerprints
    # are the clients' text, and a daemon's or endpoint's answers are another process's.
    lines = [f"tqstore store ({printable(view['source'])})"]
    ratio = view["compression_ratio"]
    rows = [
        ("hit rate (tokens)", f"{view['hit_rate']:.1%}  ({view['hit_tokens']} of {view['lookup_tokens']} "
                              f"tokens, {view['lookups']} lookups)"),
        ("blocks", str(view["blocks"])),
        ("bytes on disk", f"{human_bytes(view['bytes_on_disk'])} of {human_bytes(view['max_bytes'])} budget "
                          f"(payload {human_bytes(view['payload_bytes'])}, index {human_bytes(view['index_bytes'])})"),
        ("logical fp16 bytes", human_bytes(view["logical_bytes"])),
        ("compression", f"{printable(view['compression'])}, ratio {ratio:.2f}x" if ratio
                        else printable(view["compression"])),
        ("evictions", str(view["evictions"])),
        ("verification failures", f"{view['verification_failures']} ({view['quarantined']} quarantined, "
                                  f"{view.get('healed_records', 0)} index records healed)"),
    ]
    if view.get("index_rebuilds"):
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view["last_rebuild_time_ns"] / 1e9))
        rows.append(("index rebuilds", f"{view['index_rebuilds']}: {view['rebuild_recovered_blocks']} "
                                       f"blocks recovered, {view['rebuild_lost_blocks']} lost (last "
                                       f"{when}: {printable(view['last_rebuild_reason'])})"))
    per = view.get("per_request_hit_rate")
    if per:
        rows.insert(1, ("per request", f"{per['requests']} requests: mean {per['mean']:.1%}, "
                                       f"median {per['p50']:.1%}, {per['full_hits']} full hits"))
    if view.get("attention_backend"):
        rows.append(("attention path", printable(view["attention_backend"])))
    rows += _tier_rows(view.get("tiers"))
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append("\n  block size (tokens)   blocks        bytes")
    for b in view["block_size_table"]:
        lines.append(f"  {b['tokens']:>19}   {b['blocks']:>6}   {human_bytes(b['bytes']):>10}")
    lines.append(f"\n  namespace         {'model':<{NAME_WIDTH}}  layout (L x H x D)"
                 "   blocks        bytes")
    for ns in view["namespaces"]:
        layout = f"{ns['num_layers']} x {ns['num_kv_heads']} x {ns['head_dim']}"
        name = ns["model_name"]
        if len(name) > NAME_WIDTH:
            name = name[:NAME_WIDTH - 1] + "…"
        lines.append(f"  {printable(ns['digest']):<16}  {name:<{NAME_WIDTH}}  {layout:>18}   {ns['blocks']:>6}"
                     f"   {human_bytes(ns['bytes']):>10}")
    if view.get("namespaces_omitted"):
        lines.append(f"  ... and {view['namespaces_omitted']} smaller namespaces not listed")
    return "\n".join(lines)


def _tier_rows(t: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Hits by tier and the remote tier's health (a daemon's own counts since it started)."""
    if not t:
        return []
    def n(key: str) -> int:
        return int(t.get(key, 0))  # proto JSON gives uint64 as strings
    looked = n("lookup_tokens") or 1
    rows = [("hits by tier", f"local {n('local_hit_tokens')} tokens "
                             f"({n('local_hit_tokens') / looked:.1%}), remote "
                             f"{n('remote_hit_tokens')} ({n('remote_hit_tokens') / looked:.1%}) "
                             f"of {n('lookup_tokens')} since start")]
    if not t.get("remote_address"):
        return rows + [("remote tier", "none")]
    error = f"; last error: {printable(t['remote_last_error'])}" if t.get("remote_last_error") else ""
    rows += [
        ("remote tier", f"{printable(t['remote_address'])} "
                        f"({printable(t.get('remote_state', '?'))}{error})"),
        ("remote bytes", f"in {human_bytes(n('remote_bytes_in'))} ({n('remote_hit_blocks')} blocks), "
                         f"out {human_bytes(n('remote_bytes_out'))} ({n('remote_uploaded_blocks')} "
                         f"blocks, {n('remote_uploads_skipped')} already there)"),
        ("remote errors", f"{n('remote_errors')} ({n('remote_lookup_timeouts')} lookup timeouts); "
                          f"{n('remote_verification_failures')} values failed verification, "
                          f"{n('remote_incomplete')} incomplete (deleted)"),
        ("remote latency", f"lookup p50 {t.get('remote_lookup_ms_p50', 0):.2f} ms p99 "
                           f"{t.get('remote_lookup_ms_p99', 0):.2f}; get p50 "
                           f"{t.get('remote_get_ms_p50', 0):.2f} p99 {t.get('remote_get_ms_p99', 0):.2f}; "
                           f"put p50 {t.get('remote_put_ms_p50', 0):.2f} p99 "
                           f"{t.get('remote_put_ms_p99', 0):.2f}"),
        ("remote uploads", f"queued {human_bytes(n('remote_upload_queue_bytes'))}, dropped "
                           f"{n('remote_uploads_dropped')}, failed {n('remote_uploads_failed')}; "
                           f"local copies {n('local_copies')} ({n('local_copies_failed')} not kept, "
                           f"{n('local_copies_dropped')} dropped); "
                           f"{n('remote_lookups_while_connecting')} lookups before connecting"),
    ]
    return rows


def endpoint_stats(url: str, timeout: float = 5.0) -> dict[str, Any]:
    import urllib.request

    from tqstore.errors import Unavailable

    target = url.rstrip("/")
    target = target if target.endswith("/v1") else target + "/v1"
    try:
        with urllib.request.urlopen(target + "/stats", timeout=timeout) as reply:
            return json.load(reply)
    except (OSError, ValueError) as exc:
        raise Unavailable(f"no tqstore endpoint answers at {url}: {exc}") from exc


def render_endpoint(url: str, s: dict[str, Any]) -> str:
    tiers = s["cached_tokens"]
    prompt = max(1, sum(tiers.values()))
    fp16 = s["kv_fp16_bytes_per_token"]
    rows = [
        ("sequences", f"{s['active_sequences']} active ({s['decoding']} decoding, "
                      f"{s['prefilling']} prefilling), {s['queue_depth']} waiting"),
        ("pool", f"{human_bytes(s['pool_bytes_used'])} used of {human_bytes(s['pool_bytes_budget'])}"
                 f" ({s['pool_blocks_free']} pages free or cached)"),
        ("live KV", f"{s['kv_tokens_live']} tokens; {s['kv_bytes_per_token']:.0f} B/token "
                    f"({s['kv_bytes_per_token'] / fp16:.2f}x of fp16's {fp16} B)"),
        ("prompt tokens by tier", "  ".join(f"{printable(str(k))} {v} ({v / prompt:.0%})"
                                            for k, v in tiers.items())),
        ("decode", f"{s['decode_tokens_per_s']:.1f} tokens/s (last 10 s)"),
        ("requests", ", ".join(f"{k} {s['totals'][k]}" for k in
                               ("requests", "completed", "cancelled", "rejected"))),
        ("daemon", printable(str(s["daemon"]))),
        ("attention path", printable(str(s.get("attention_path", "unknown")))),
    ] + [(f"kernel {printable(str(k))}", printable(str(v))) for k, v in s.get("kernels", {}).items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"tqstore endpoint ({printable(url)})"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def run(args: argparse.Namespace) -> int:
    if args.endpoint:
        stats = endpoint_stats(args.endpoint)
        print(json.dumps(stats, indent=1) if args.json else render_endpoint(args.endpoint, stats))
        return 0
    from tqstore.errors import TqstoreError

    try:
        view = summarize(_from_store(args.path) if args.path
                         else _from_daemon(client_config_from(args, args.addr)))
    except TqstoreError as exc:  # a damaged index, no daemon, a refused token: say so, no trace
        print(f"cannot inspect: {printable(str(exc))}", file=sys.stderr)
        return 1
    print(json.dumps(view, indent=1) if args.json else render(view))
    return 0
