"""TurboQuant quantize (norm, randomized Hadamard rotation, codebook search, packing) as one
GPU kernel, byte-identical to tqstore.codec's pure-MLX quantize on the same backend.

Why byte-identical is possible: the codec is a fixed sequence of float32 elementwise ops and
fixed-order tree sums, each rounded on its own (no mx.compile, so no fused multiply-adds). The
kernel performs the very same operations in the very same order with explicitly rounded
intrinsics (TQ_*_RN: no FMA contraction, no fast-math division or sqrt), one thread per
(token, head) vector, so the codes never depend on how many tokens are quantized together.

Scope: power-of-two head_dim (the plain randomized Hadamard transform; the dense mix of other
head dims stays on the reference path) and keys without the QJL sketch. `quantize_kernel_fits`
says whether a codec qualifies; tqstore.metal.dispatch.quantize falls back otherwise.
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx

from tqstore.codec.turboquant import FP16_MAX, QuantizedVectors, TurboQuantCodec
from tqstore.metal.attention_kernel import gpu_backend
from tqstore.metal.attention_kernel import _builder  # noqa: PLC2701  (one builder choice)
from tqstore.metal.dialect import body_prologue, dialect_header
from tqstore.small_arrays import padded_array

QUANT_INPUTS = ("x", "signs", "codebook", "midpoints", "rot_norm", "params")
QUANT_OUTPUTS = ("codes", "scales")
THREADS = 64

_RN = {
    "cuda": """
#define TQ_MUL_RN(a, b) __fmul_rn((a), (b))
#define TQ_ADD_RN(a, b) __fadd_rn((a), (b))
#define TQ_SUB_RN(a, b) __fsub_rn((a), (b))
#define TQ_DIV_RN(a, b) __fdiv_rn((a), (b))
#define TQ_SQRT_RN(a) __fsqrt_rn(a)
""",
    # Metal: precise:: functions are correctly rounded; products and sums are kept apart by
    # the statement structure (Metal contracts only under fast math, which these avoid).
    "metal": """
#define TQ_MUL_RN(a, b) ((a) * (b))
#define TQ_ADD_RN(a, b) ((a) + (b))
#define TQ_SUB_RN(a, b) ((a) - (b))
#define TQ_DIV_RN(a, b) metal::precise::divide((a), (b))
#define TQ_SQRT_RN(a) metal::precise::sqrt(a)
""",
}


def quantize_header(dialect: str) -> str:
    return dialect_header(dialect) + _RN[dialect]


def _tree_sum(arr: str, n: int) -> str:
    """Statements reducing arr[0..n) into arr[0] exactly like codec.tree_sum_last: halves
    added pairwise (a[i] + a[i + half]), an odd tail carried to the end."""
    out = []
    while n > 1:
        half = n // 2
        out.append(f"    for (int i = 0; i < {half}; ++i) {arr}[i] = TQ_ADD_RN({arr}[i], {arr}[i + {half}]);")
        if n % 2:
            out.append(f"    {arr}[{half}] = {arr}[{2 * half}];")
        n = half + n % 2
    return "\n".join(out)


def quantize_body(head_dim: int, bits: int, norm_correction: bool, dialect: str) -> str:
    """One thread quantizes one (token, head) vector of x (rows of head_dim float32)."""
    if head_dim & (head_dim - 1):
        raise ValueError("the quantize kernel needs a power-of-two head_dim")
    scale_expr = ("TQ_DIV_RN(norm, TQ_SQRT_RN(c2[0]))" if norm_correction else "norm")
    return body_prologue(dialect) + f"""
  constexpr int D = {head_dim}, BITS = {bits}, LEVELS = 1 << BITS;
  constexpr int ROW = D * BITS / 8;
  const int rows = params[0], tokens = params[1], heads = params[2];
  const int r = tq_gx * {THREADS} + tq_tid;
  if (r < rows) {{
    const int head = (r / tokens) % heads;
    float v[D];
    float a[D];
    for (int j = 0; j < D; ++j) {{ v[j] = x[r * D + j]; a[j] = TQ_MUL_RN(v[j], v[j]); }}
{_tree_sum("a", head_dim)}
    const float norm = TQ_SQRT_RN(a[0]);
    const float safe = norm > 0.0f ? norm : 1.0f;
    for (int j = 0; j < D; ++j) v[j] = TQ_MUL_RN(TQ_DIV_RN(v[j], safe), signs[head * D + j]);
    for (int h = 1; h < D; h <<= 1) {{
      for (int blk = 0; blk < D; blk += 2 * h) {{
        for (int i = 0; i < h; ++i) {{
          const float p = v[blk + i], q = v[blk + h + i];
          v[blk + i] = TQ_ADD_RN(p, q);
          v[blk + h + i] = TQ_SUB_RN(p, q);
        }}
      }}
    }}
    const float rn = rot_norm[0];
    uint8_t idx[D];
    float c2[D];
    for (int j = 0; j < D; ++j) {{
      const float y = TQ_MUL_RN(v[j], rn);
      int k = 0;
      for (int level = BITS - 1; level >= 0; --level) {{
        const int cand = k + (1 << level);
        if (y > midpoints[cand - 1]) k = cand;
      }}
      idx[j] = (uint8_t)k;
      const float c = codebook[k];
      c2[j] = TQ_MUL_RN(c, c);
    }}
{_tree_sum("c2", head_dim)}
    const float scale = {scale_expr};
    scales[r] = TQ_FLOAT_TO_HALF(TQ_FMIN(scale, {FP16_MAX:.1f}f));
    for (int g = 0; g < D / 8; ++g) {{
      tq_u64 word = 0;
      for (int e = 0; e < 8; ++e) word |= ((tq_u64)idx[g * 8 + e]) << (e * BITS);
      for (int k = 0; k < BITS; ++k) codes[r * ROW + g * BITS + k] = (uint8_t)((word >> (8 * k)) & 0xFF);
    }}
  }}
"""


def quantize_kernel_fits(codec: TurboQuantCodec) -> bool:
    d = codec.head_dim
    return codec.qjl_rotation is None and codec.rotation.m == 1 and d & (d - 1) == 0


@lru_cache(maxsize=32)
def quantize_kernel(head_dim: int, bits: int, norm_correction: bool, backend: str | None = None):
    backend = backend or gpu_backend()
    if backend is None:
        return None
    return _builder(backend)(
        name=f"tq_quantize_d{head_dim}b{bits}nc{int(norm_correction)}",
        input_names=list(QUANT_INPUTS), output_names=list(QUANT_OUTPUTS),
        source=quantize_body(head_dim, bits, norm_correction, backend),
        header=quantize_header(backend), ensure_row_contiguous=True)


# Made once per value: no host upload per call (MLX's CUDA buffers made from host data are
# managed memory, written by the CPU), and padded out of MLX's small pool
# (tqstore.small_arrays).
@lru_cache(maxsize=64)
def _params(rows: int, tokens: int, heads: int) -> mx.array:
    return padded_array([rows, tokens, heads])


@lru_cache(maxsize=16)
def _rotation_norm(p: int) -> mx.array:
    """The rotation's 1/sqrt(p) in float32, rounded like the codec's own scalar."""
    return padded_array([1.0 / math.sqrt(p)], mx.float32)


def kernel_quantize(codec: TurboQuantCodec, x: mx.array) -> QuantizedVectors | None:
    """codec.quantize(x) on the GPU kernel; None where there is no kernel for it."""
    backend = gpu_backend()
    if backend is None or not quantize_kernel_fits(codec):
        return None
    if x.ndim < 3 or x.shape[-1] != codec.head_dim or x.shape[-3] != codec.num_heads:
        raise ValueError(f"expected (..., {codec.num_heads} heads, tokens, {codec.head_dim}),"
                         f" got {tuple(x.shape)}")
    lead = x.shape[:-1]
    tokens, heads, d = x.shape[-2], x.shape[-3], codec.head_dim
    rows = x.size // d
    if rows == 0:
        return QuantizedVectors(mx.zeros((*lead, codec.code_bytes), dtype=mx.uint8),
                                mx.zeros(lead, dtype=mx.float16))
    kern = quantize_kernel(d, codec.bits, codec.norm_correction, backend)
    codes, scales = kern(
        inputs=[x.astype(mx.float32).reshape(rows, d), codec.rotation.signs.reshape(heads, d),
                codec.codebook, codec.midpoints, _rotation_norm(codec.rotation.p),
                _params(rows, tokens, heads)],
        output_shapes=[(rows, codec.code_bytes), (rows,)],
        output_dtypes=[mx.uint8, mx.float16],
        grid=(-(-rows // THREADS) * THREADS, 1, 1), threadgroup=(THREADS, 1, 1))
    return QuantizedVectors(codes.reshape(*lead, codec.code_bytes), scales.reshape(lead))
