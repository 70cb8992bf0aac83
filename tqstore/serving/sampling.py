"""Per-request sampling for batched decode: each row has its own settings and its own PRNG key.

mlx-lm's samplers draw from MLX's global random state, so a seeded request's tokens would depend
on which other requests shared its batch (mlx_lm.server therefore serves seeded requests alone).
Here each request carries a key (from its seed, or a random one) split once per token, so a
seeded request gives the same tokens alone or in any batch, up to the batch's float effects on
the logits themselves. The filters are mlx-lm's own (top-p, min-p, top-k); temperature 0 is
greedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_sequences: Any = None  # mlx_lm.generate.StopSequences (eos ids and stop words)
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and not self.logits_processors


def _pick(params: SamplingParams, logprobs: mx.array, key: mx.array) -> mx.array:
    if params.temperature == 0:
        return mx.argmax(logprobs, axis=-1)
    if 0 < params.top_p < 1.0:
        logprobs = apply_top_p(logprobs, params.top_p)
    if params.min_p > 0:
        logprobs = apply_min_p(logprobs, params.min_p)
    if params.top_k > 0:
        logprobs = apply_top_k(logprobs, params.top_k)
    return mx.random.categorical(logprobs * (1.0 / params.temperature), key=key)


def sample_rows(rows: Sequence[Any], logits: mx.array
                ) -> tuple[mx.array, mx.array, list[tuple[mx.array, mx.array] | None]]:
    """Rows' requests (with .params, .key, .context) and their (B, V) logits -> next tokens (B,),
    their log-probabilities (B,), and per row the top_logprobs (ids, values) or None. Lazy."""
    logits = logits.astype(mx.float32)
    if all(r.params.greedy for r in rows):
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = mx.argmax(logprobs, axis=-1)
    else:
        picked, rows_lp = [], []
        for i, r in enumerate(rows):
            row = logits[i:i + 1]
            if r.params.logits_processors:
                context = mx.array(r.context)
                for processor in r.params.logits_processors:
                    row = processor(context, row)
            lp = row - mx.logsumexp(row, axis=-1, keepdims=True)
            r.key, sub = mx.random.split(r.key)
            picked.append(_pick(r.params, lp, sub))
            rows_lp.append(lp)
        tokens, logprobs = mx.concatenate(picked), mx.concatenate(rows_lp)
    chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    tops: list[tuple[mx.array, mx.array] | None] = []
    for i, r in enumerate(rows):
        n = r.params.top_logprobs
        if n <= 0:
            tops.append(None)
            continue
        ids = mx.argpartition(-logprobs[i], kth=n - 1)[:n]
        tops.append((ids, logprobs[i][ids]))
    return tokens, chosen, tops
