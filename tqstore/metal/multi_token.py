"""Attention of a multi-token step (a prefill chunk, a later turn's new tokens) on the CPU:
MLX's matmuls with the C row softmax between them (tqstore/native/tq_softmax.c).

Why: MLX's CPU backend computes scaled_dot_product_attention as matmul, softmax, matmul, and
its softmax's scalar exp was three quarters of a later turn's time on SmolLM2 (2.1 of 2.8 s
for 227 tokens over 2,241, `tqstore bench serve`'s workload); the two matmuls run at BLAS
speed. Same function as MLX's: scores = (q * scale) @ k^T per kv head (its query heads
stacked), the mask, softmax, @ v, computed in float32 and cast back to the queries' dtype.

Deterministic for given shapes (the matmuls are MLX's, the softmax is per row in a fixed
order whatever the thread count): a hit's restored prefix followed by the same chunks gives
the same bits as the cold run, which takes this path too. Equal to MLX's attention within
float32 rounding, not bitwise.

The caller (tqstore.metal.dispatch.multi_token_attention) decides when this serves: the CPU,
the C kernels built, the first-use self-check passed.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from tqstore.native import cpu_kernels


def mask_kind(mask: Any) -> str | None:
    """'none', 'causal', 'array-bool' (a select) or 'array-additive' (a sum) for masks this
    path takes (an array mask must be one (L, T) pattern shared by every head), else None."""
    if mask is None:
        return "none"
    if isinstance(mask, str):
        return "causal" if mask == "causal" else None
    if isinstance(mask, mx.array):
        return "array-bool" if mask.dtype == mx.bool_ else "array-additive"
    return None


def cpu_multi_token_attention(queries: mx.array, keys: mx.array, values: mx.array,
                              scale: float, mask: Any = None) -> mx.array | None:
    """queries (1, Hq, L, D), keys (1, Hkv, T, D), values (1, Hkv, T, Dv) -> (1, Hq, L, Dv) in
    the queries' dtype, or None where this path does not take the call (the caller then runs
    MLX's attention)."""
    kind = mask_kind(mask)
    if kind is None or queries.ndim != 4 or keys.ndim != 4 or values.ndim != 4:
        return None
    B, Hq, L, D = queries.shape
    _, Hkv, T, Dv = values.shape
    if B != 1 or keys.shape[:3] != (1, Hkv, T) or Hkv == 0 or Hq % Hkv or keys.shape[3] != D:
        return None
    if kind == "causal" and L > T:
        return None
    if kind.startswith("array") and mask.size != L * T:
        return None
    G = Hq // Hkv
    q = (queries.astype(mx.float32) * scale).reshape(Hkv, G * L, D)
    scores = q @ keys[0].astype(mx.float32).swapaxes(-1, -2)  # (Hkv, G * L, T)
    if kind.startswith("array"):
        pattern = mask.reshape(L, T)
        grid = scores.reshape(Hkv, G, L, T)
        grid = (mx.where(pattern, grid, -mx.inf) if kind == "array-bool"
                else grid + pattern.astype(mx.float32))
        scores = grid.reshape(Hkv, G * L, T)
    weights = cpu_kernels.softmax_rows(scores, L, kind == "causal")
    if weights is None:
        return None
    out = weights @ values[0].astype(mx.float32)  # (Hkv, G * L, Dv)
    return out.reshape(1, Hq, L, Dv).astype(queries.dtype)
