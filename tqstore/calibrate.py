"""Calibration: build a model's KV quality profile (tqstore.codec.profile). `tqstore calibrate`
(tqstore/cli/calibrate.py) runs it on the bundled SmolLM2.

Steps (all deterministic on a given machine: fixed text slice, fixed order, no RNG):
1. fp16 prefill of the first ``--prefill`` tokens of a calibration text that is NOT one of the
   evaluation texts of `tqstore bench quality` (default: the GFDL-1.3, tqstore/data).
2. Key means per (layer, kv_head): float64 mean over those tokens, rounded once to float16.
3. Sensitivity per layer (unless ``--uniform``): teacher-forced KL against the fp16 cache on the
   next ``--positions`` tokens with ONLY that layer quantized, keys at 4 bits (values at 8) and
   values at 4 bits (keys at 8), around the means, with the newest block in fp16 (the policy
   the profile is for; ``--no-tail`` without). Error concentrates in a few layers on SmolLM2
   (quality.md), so this is where bits pay.
4. Bits per layer: KL_l(b) ~= s_l * 4^-(b - 4) (TurboQuant's distortion falls 4x per bit;
   measured ~3.9x on SmolLM2's keys), contributions add across layers; greedily give one bit at
   a time to the (layer, K|V) with the largest predicted KL drop until the byte budget
   (``--budget`` x fp16 for a sequence of ``--amortize`` tokens: codes + fp16 norms, the means
   once, and at the worst moment one whole block held in fp16 by the tail) is spent. Every bit
   costs the same bytes, so greedy is optimal for this convex model. A ``--no-tail`` profile is
   for comparisons: ``profile_policy`` (the default) always keeps the tail on.

The profile goes to ``--out`` (default tqstore/data/profiles/<model>.tqprofile); its digest
enters the codec identity. The daemon gets it on the wire with the codec settings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import tqstore  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx
import numpy as np

from tqstore.codec import CodecConfig
from tqstore.codec.profile import QualityProfile
from tqstore.errors import InvalidArgument

DATA_DIR = Path(__file__).resolve().parent / "data"
CALIBRATION_TEXT = "gfdl-1.3.txt"
MIN_BITS, MAX_BITS = 3, 8
PROBE_BITS = 4  # bits of the quantized part in a sensitivity probe
QUIET_BITS = 8  # bits of the other half (K or V) of the probed layer: ~1/256 of the error


def key_means(prefix_kv: list[tuple[mx.array, mx.array]]) -> np.ndarray:
    """(layers, kv_heads, D) float64 mean key over the prefill tokens."""
    return np.stack([np.array(k[0].astype(mx.float32)).astype(np.float64).mean(axis=1)
                     for k, _ in prefix_kv])


def allocate_bits(key_sens: np.ndarray, value_sens: np.ndarray, total_bits: int,
                  lo: int = MIN_BITS, hi: int = MAX_BITS) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-layer (key bits, value bits) summing to at most ``total_bits`` (over both kinds).

    Start every layer at ``lo``; repeatedly add a bit where s * 4^-(b-4) * 3/4 (the predicted
    KL drop) is largest. Ties go to keys before values, then the lower layer (deterministic).
    """
    n = len(key_sens)
    bits = {"K": [lo] * n, "V": [lo] * n}
    sens = {"K": [float(s) for s in key_sens], "V": [float(s) for s in value_sens]}
    spent = 2 * lo * n
    if spent > total_bits:
        raise InvalidArgument(f"a budget of {total_bits} bits cannot hold {lo} bits everywhere")
    while spent < total_bits:
        best = None
        for kind in ("K", "V"):
            for layer in range(n):
                b = bits[kind][layer]
                if b >= hi:
                    continue
                gain = max(sens[kind][layer], 0.0) * 4.0 ** (PROBE_BITS - b) * 0.75
                if best is None or gain > best[0]:
                    best = (gain, kind, layer)
        if best is None:
            break
        bits[best[1]][best[2]] += 1
        spent += 1
    return tuple(bits["K"]), tuple(bits["V"])


def bit_budget(budget: float, num_layers: int, num_kv_heads: int, head_dim: int,
               amortize_tokens: int, tail_tokens: int = 0) -> int:
    """Total (key + value) bits over layers per dimension that fit ``budget`` x fp16 bytes for
    a sequence of ``amortize_tokens`` tokens: the profile's means once, and with an fp16 tail
    its worst moment (``tail_tokens`` tokens in fp16, the rest as codes)."""
    fp16 = num_layers * num_kv_heads * head_dim * 2 * 2  # bytes per token
    means = num_layers * num_kv_heads * head_dim * 2
    n = amortize_tokens
    codes_per_token = (budget * fp16 * n - tail_tokens * fp16 - means) / (n - tail_tokens)
    per_layer_head = codes_per_token / (num_layers * num_kv_heads)
    # per (layer, head): (kb + vb) * D / 8 code bytes + 2 fp16 norms
    return int((per_layer_head * num_layers - 4 * num_layers) * 8 // head_dim)


def sensitivities(lm, prefix_kv, tokens: list[int], prefill: int, means_profile: QualityProfile,
                  chunk: int, block_size: int, log: Callable[[str], None],
                  fp16_tail: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer KL of quantizing only that layer's keys (resp. values) at PROBE_BITS, under
    the cache policy the profile is for (with or without the fp16 tail)."""
    from tqstore.bench.quality import run_config
    from tqstore.paged import FP16_POLICY, CachePolicy

    ref, _ = run_config(lm, FP16_POLICY, prefix_kv, tokens, prefill, chunk, block_size)
    p_ref = mx.exp(ref)
    n = len(prefix_kv)
    out = {"K": np.zeros(n), "V": np.zeros(n)}
    for kind, (kb, vb) in (("K", (PROBE_BITS, QUIET_BITS)), ("V", (QUIET_BITS, PROBE_BITS))):
        codec = CodecConfig(kb, vb, profile=means_profile)
        for layer in range(n):
            policy = CachePolicy(codec=codec, fp16_layers=frozenset(set(range(n)) - {layer}),
                                 fp16_tail=fp16_tail)
            logp, _ = run_config(lm, policy, prefix_kv, tokens, prefill, chunk, block_size)
            out[kind][layer] = float(mx.mean(mx.sum(p_ref * (ref - logp), axis=-1)).item())
            log(f"  {kind} layer {layer}: KL {out[kind][layer]:.5f}")
    return out["K"], out["V"]


def calibrate(lm, text: str, text_name: str, prefill: int, positions: int, *, budget: float = 0.30,
              amortize_tokens: int = 2048, uniform: tuple[int, int] | None = None, chunk: int = 128,
              block_size: int = 16, fp16_tail: bool = True,
              log: Callable[[str], None] = print) -> QualityProfile:
    from tqstore.paged import FP16_POLICY, make_prompt_cache, pool_for_model

    tokens = [int(t) for t in lm.tokenizer.encode(text)]
    need = prefill + (0 if uniform else positions + 1)
    if len(tokens) < need:
        raise InvalidArgument(f"calibration text has {len(tokens)} tokens, need {need}")
    tokens = tokens[:need]
    pool = pool_for_model(lm.model, policy=FP16_POLICY, budget_bytes=1 << 20, block_size=block_size)
    caches = make_prompt_cache(pool)
    for start in range(0, prefill, 512):  # fixed chunking: part of what makes the run repeatable
        mx.eval(lm.model(mx.array(tokens[start:min(prefill, start + 512)])[None], cache=caches))
    prefix_kv = [c.prefill_kv() for c in caches]
    mx.eval(prefix_kv)
    means = key_means(prefix_kv)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    how = f"{text_name} sha256:{digest} prefill {prefill}"
    base = QualityProfile.build(lm.fingerprint, means, calibration=how)
    if uniform is not None:
        return base
    L, H, D = means.shape
    key_sens, value_sens = sensitivities(lm, prefix_kv, tokens, prefill, base, chunk, block_size,
                                         log, fp16_tail)
    total = bit_budget(budget, L, H, D, amortize_tokens, block_size if fp16_tail else 0)
    kbits, vbits = allocate_bits(key_sens, value_sens, total)
    how += (f" positions {positions} budget {budget} amortize {amortize_tokens}"
            f" fp16_tail {int(fp16_tail)}")
    return QualityProfile.build(lm.fingerprint, means, key_bits=kbits, value_bits=vbits,
                                calibration=how)
