"""The newest block stays fp16 until it fills (``CachePolicy.fp16_tail``).

Why: the most recent tokens draw a large share of attention (local heads), and their quantization
error is not averaged away over many tokens. Keeping the newest, not yet full block in fp16
halved the KL of K5V4 around the key means on SmolLM2 (docs/fragments/quality.md) for at most
one block of fp16 per layer and sequence.

One rule, used by every path (routed decode, the unrouted fallback, multi-token steps, the
quality benchmark), so they all compute the same function:

  a query at position t attends key j <= t through the fp16 values when
  j >= c and j // block_size == t // block_size, and through its TurboQuant codes otherwise,

where c is the number of tokens whose codes were already in the pages before the step
("committed"). Commit rule: a step writing tokens [o, o + L) first quantizes the tokens
[c, commit_point(c, o + L)): every block before the one that holds the step's newest token.
So at most one block (<= block_size tokens) is ever held in fp16, a block's codes are written
once and whole, from fp16 values (the values a cold prefill, a hit and the daemon all quantize),
and a trimmed cache whose codes end mid-block keeps attending those codes (c is not
block-aligned then; the rule still holds).

Layout of a multi-token step for stock SDPA (``extended_mask``): keys = the committed tokens
through their codes [0, c') followed by the fp16 tokens [e, o + L) with e = exact_start(c, o),
c' = commit_point(c, o + L). Tokens in [e, c') appear twice, and the boolean mask lets each
query see exactly one copy. A single-token step has e == c' (no duplicates, no mask).

Decode merges two softmax pieces: the kernel's over the pages (normalized output and its
log-sum-exp) and the fp16 tail's (<= block_size scores): 2 exps and a few multiply-adds per
query head and tail token, no extra bytes per cached token. The merge is the decode epilogue's
(tqstore.metal.reference.merge_with_tail; a kernel on GPUs, through tqstore.metal.dispatch).
"""

from __future__ import annotations

import mlx.core as mx


def commit_point(committed: int, end: int, block_size: int) -> int:
    """Tokens in the pages after a step that ends at position ``end`` (exclusive)."""
    if end <= 0:
        return committed
    return max(committed, ((end - 1) // block_size) * block_size)


def exact_start(committed: int, start: int, block_size: int) -> int:
    """First position any query of a step starting at ``start`` may attend in fp16."""
    return max(committed, (start // block_size) * block_size)


def extended_mask(committed: int, start: int, length: int, block_size: int) -> mx.array:
    """Boolean (length, c' + end - e) mask over the extended key layout of a step of ``length``
    tokens at ``start`` (see the module doc): True where the query attends that key copy."""
    end = start + length
    new_committed = commit_point(committed, end, block_size)
    first_exact = exact_start(committed, start, block_size)
    t = mx.arange(start, end)[:, None]
    t_block = t // block_size
    jq = mx.arange(new_committed)[None, :]
    via_codes = (jq <= t) & ~((jq >= committed) & (jq // block_size == t_block))
    je = mx.arange(first_exact, end)[None, :]
    via_fp16 = (je <= t) & (je // block_size == t_block)
    return mx.concatenate([via_codes, via_fp16], axis=1)
