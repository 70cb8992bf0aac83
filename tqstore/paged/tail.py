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
query head and tail token, no extra bytes per cached token.
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


def merge_with_tail(pages_out: mx.array | None, pages_lse: mx.array | None, queries: mx.array,
                    tail_keys: mx.array, tail_values: mx.array) -> mx.array:
    """Decode attention = softmax over (page scores, tail scores), from its two pieces.

    pages_out (Hkv, G, Dv) float32 normalized output over the pages, pages_lse (Hkv, G, 1) its
    log-sum-exp (None when no token is committed); queries (Hkv, G, Dk) float32, pre-scaled, in
    the keys' space; tail_keys (Hkv, n, Dk) float32 in the same space as the page scores (the
    residual k - mean where keys are centered); tail_values (Hkv, n, Dv) float32.
    Returns (Hkv, G, Dv) float32. Compiled: one fused graph per tail length instead of ~13 ops
    per layer and step (decode's cost on a GPU is mostly per-op overhead).
    """
    if pages_out is None:
        return _tail_only(queries, tail_keys, tail_values)
    return _tail_and_pages(pages_out, pages_lse, queries, tail_keys, tail_values)


@mx.compile
def _tail_only(queries: mx.array, tail_keys: mx.array, tail_values: mx.array) -> mx.array:
    scores = queries @ mx.swapaxes(tail_keys, -1, -2)  # (Hkv, G, n)
    p = mx.exp(scores - mx.max(scores, axis=-1, keepdims=True))
    return (p @ tail_values) / mx.sum(p, axis=-1, keepdims=True)


@mx.compile
def _tail_and_pages(pages_out: mx.array, pages_lse: mx.array, queries: mx.array,
                    tail_keys: mx.array, tail_values: mx.array) -> mx.array:
    scores = queries @ mx.swapaxes(tail_keys, -1, -2)  # (Hkv, G, n)
    m = mx.maximum(mx.max(scores, axis=-1, keepdims=True), pages_lse)
    p = mx.exp(scores - m)
    w = mx.exp(pages_lse - m)  # = sum of the page weights, rescaled to m
    return (w * pages_out + p @ tail_values) / (w + mx.sum(p, axis=-1, keepdims=True))


def decode_epilogue_reference(pages_out: mx.array, pages_lse: mx.array, queries: mx.array,
                              tail_keys: mx.array, tail_values: mx.array,
                              new_keys: mx.array | None, new_values: mx.array | None,
                              key_center: mx.array,
                              output_rotation: mx.array, out_dtype: mx.Dtype
                              ) -> tuple[mx.array, mx.array, mx.array]:
    """The decode step's epilogue in MLX ops: the contract of tqstore.metal.epilogue (which
    runs it as one kernel) and its oracle. pages_out (B, Hq, Dv) float32 value-rotated,
    pages_lse (B, Hq), queries (B, Hq, Dk) float32 scaled and unrotated; tail_keys/values
    (B, Hkv, n_old, D) and new_keys/values (B, Hkv, m, D) fp16 (None: no new token); key_center
    (Hkv, Dk) float32; output_rotation (Hkv, Dv, Dv). Returns (out (B, Hq, Dv) out_dtype, the
    next tail's keys, values (B, Hkv, n, D) fp16)."""
    B, Hq, Dk = queries.shape
    Hkv, Dv = output_rotation.shape[0], output_rotation.shape[-1]
    G = Hq // Hkv
    if new_keys is None:
        next_keys, next_values = tail_keys, tail_values
    else:
        next_keys = mx.concatenate([tail_keys, new_keys], axis=2)
        next_values = mx.concatenate([tail_values, new_values], axis=2)
    out = mx.matmul(pages_out.reshape(B, Hkv, G, Dv), output_rotation)
    keys = next_keys.astype(mx.float32) - key_center[:, None, :]
    out = merge_with_tail(out, pages_lse.reshape(B, Hkv, G, 1), queries.reshape(B, Hkv, G, Dk),
                          keys, next_values.astype(mx.float32))
    return out.reshape(B, Hq, Dv).astype(out_dtype), next_keys, next_values
