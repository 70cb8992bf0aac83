"""TurboQuant quantize (norm, randomized Hadamard rotation, codebook search, packing) as one
GPU kernel, byte-identical to tqstore.codec's pure-MLX quantize on the same backend.

Why byte-identical is possible: the codec is a fixed sequence of float32 elementwise ops and
fixed-order tree sums, each rounded on its own (no mx.compile, so no fused multiply-adds). The
kernel performs the very same operations in the very same order with explicitly rounded
intrinsics (TQ_*_RN: no FMA contraction, no fast-math division or sqrt), one SIMD group per
(token, head) vector, so the codes never depend on how many tokens are quantized together.

Scope: power-of-two head_dim from 32 to 256 (the plain randomized Hadamard transform; the dense
mix of other head dims, and smaller ones, stay on the reference path) and keys without the QJL sketch. `quantize_kernel_fits`
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
# The rows form (kernel_quantize_rows) also reads which rows of x to take, and the keys' center.
ROWS_INPUTS = QUANT_INPUTS + ("where", "center")
QUANT_OUTPUTS = ("codes", "scales")
THREADS = 128  # a threadgroup: 4 SIMD groups of 32 lanes, one vector each
VECTORS_PER_GROUP = THREADS // 32

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


def _warp_tree_sum(arr: str, head_dim: int) -> str:
    """codec.tree_sum_last over a vector spread across a SIMD group (lane l holds elements
    [l*E, l*E + E) in arr[0..E)), leaving the sum in arr[0] of EVERY lane.

    The codec's first steps (half >= E) pair elements E*m apart, i.e. lane l with lane l + m:
    each lane adds its XOR partner's value. Lanes l < m compute a_l + a_(l+m), exactly the
    codec's sum; lanes l >= m compute a_l + a_(l-m), the same value (IEEE addition commutes),
    so every lane holds a copy of some relevant lane's partial sum and the next steps stay
    exact everywhere. The last steps (half < E) are inside each lane."""
    e = head_dim // 32
    out, half = [], head_dim // 2
    while half >= e:
        m = half // e
        out.append(f"    for (int e = 0; e < E; ++e) {arr}[e] = TQ_ADD_RN({arr}[e], TQ_SHFL_XOR({arr}[e], {m}));")
        half //= 2
    return "\n".join(out + [_tree_sum(arr, e)])


# How a SIMD group reads its vector's elements (v[e] for e < E, from element `first`):
# "plain": x holds the vectors in float32, one after another (x[r]).
# "rows", "rows_centered": x holds fp16 tail buffers (B, heads, tokens, D) and the kernel
# quantizes rows where[0..R) of them; "rows_centered" first subtracts the keys' center in
# float32, the codec's own `centered` (an exact widening, then one rounded subtraction).
_ROW_SOURCE = """    const int per_row = tokens * heads;
    const int src = where[r / per_row] * per_row + r % per_row;
"""
_LOADS = {
    "plain": "    for (int e = 0; e < E; ++e) v[e] = x[r * D + first + e];",
    "rows": _ROW_SOURCE + """    for (int e = 0; e < E; ++e) v[e] = TQ_HALF_TO_FLOAT(x[src * D + first + e]);""",
    "rows_centered": _ROW_SOURCE + """    for (int e = 0; e < E; ++e)
      v[e] = TQ_SUB_RN(TQ_HALF_TO_FLOAT(x[src * D + first + e]), center[head * D + first + e]);""",
}


def quantize_body(head_dim: int, bits: int, norm_correction: bool, dialect: str,
                  load: str = "plain") -> str:
    """One SIMD group (32 lanes) quantizes one (token, head) vector (rows of head_dim
    float32, read as ``load`` says: _LOADS); lane l holds elements [l*E, l*E + E),
    E = head_dim / 32.

    Every op is the codec's, in the codec's order (see _warp_tree_sum for the sums; the
    Hadamard butterflies pair element j with j ^ h: inside a lane for h < E, with lane
    l ^ (h / E) above). One vector per thread, as before, left most of a GPU idle on a 256-token
    prefill chunk (2,048 vectors): 0.6 s of an 8k-token prefill of an 8B shape on an H100.
    """
    if head_dim & (head_dim - 1) or not 32 <= head_dim <= 256:
        raise ValueError("the quantize kernel needs a power-of-two head_dim in [32, 256]")
    e = head_dim // 32
    scale_expr = ("TQ_DIV_RN(norm, TQ_SQRT_RN(c2[0]))" if norm_correction else "norm")
    butterflies = []
    h = 1
    while h < head_dim:
        if h < e:
            butterflies.append(f"""    for (int blk = 0; blk < E; blk += {2 * h}) {{
      for (int i = 0; i < {h}; ++i) {{
        const float p = v[blk + i], q = v[blk + {h} + i];
        v[blk + i] = TQ_ADD_RN(p, q);
        v[blk + {h} + i] = TQ_SUB_RN(p, q);
      }}
    }}""")
        else:
            m = h // e
            butterflies.append(f"""    for (int e = 0; e < E; ++e) {{
      const float o = TQ_SHFL_XOR(v[e], {m});
      v[e] = (lane & {m}) ? TQ_SUB_RN(o, v[e]) : TQ_ADD_RN(v[e], o);
    }}""")
        h *= 2
    if e >= 8:  # a lane holds whole 8-element words
        pack = """    for (int g = 0; g < E / 8; ++g) {
      tq_u64 word = 0;
      for (int k = 0; k < 8; ++k) word |= ((tq_u64)idx[g * 8 + k]) << (k * BITS);
      const int w = lane * (E / 8) + g;
      for (int k = 0; k < BITS; ++k) codes[r * ROW + w * BITS + k] = (uint8_t)((word >> (8 * k)) & 0xFF);
    }"""
    else:  # 8 / E lanes share a word: its first lane gathers their indices
        gathers = "\n".join(
            f"    const tq_u32 from{s} = TQ_SHFL_XOR(mine, {s});" for s in range(1, 8 // e))
        parts = " | ".join(["((tq_u64)mine)"] + [
            f"(((tq_u64)from{s}) << {s * e * 8})" for s in range(1, 8 // e)])
        pack = f"""    tq_u32 mine = 0;
    for (int k = 0; k < E; ++k) mine |= ((tq_u32)idx[k]) << (8 * k);
{gathers}
    const tq_u64 bytes = {parts};  // index k of the word in byte k
    if (lane % {8 // e} == 0) {{
      tq_u64 word = 0;
      for (int k = 0; k < 8; ++k) word |= ((bytes >> (8 * k)) & 0xFF) << (k * BITS);
      const int w = lane / {8 // e};
      for (int k = 0; k < BITS; ++k) codes[r * ROW + w * BITS + k] = (uint8_t)((word >> (8 * k)) & 0xFF);
    }}"""
    return body_prologue(dialect) + f"""
  constexpr int D = {head_dim}, BITS = {bits}, E = {e};
  constexpr int ROW = D * BITS / 8;
  const int rows = params[0], tokens = params[1], heads = params[2];
  const int lane = tq_tid % 32;
  const int r = tq_gx * {THREADS // 32} + tq_tid / 32;
  if (r < rows) {{  // the same for the whole SIMD group: its shuffles are never divergent
    const int head = (r / tokens) % heads;
    const int first = lane * E;
    float v[E];
    float a[E];
{_LOADS[load]}
    for (int e = 0; e < E; ++e) a[e] = TQ_MUL_RN(v[e], v[e]);
{_warp_tree_sum("a", head_dim)}
    const float norm = TQ_SQRT_RN(a[0]);
    const float safe = norm > 0.0f ? norm : 1.0f;
    for (int e = 0; e < E; ++e) v[e] = TQ_MUL_RN(TQ_DIV_RN(v[e], safe), signs[head * D + first + e]);
{chr(10).join(butterflies)}
    const float rn = rot_norm[0];
    uint8_t idx[E];
    float c2[E];
    for (int e = 0; e < E; ++e) {{
      const float y = TQ_MUL_RN(v[e], rn);
      int k = 0;
      for (int level = BITS - 1; level >= 0; --level) {{
        const int cand = k + (1 << level);
        if (y > midpoints[cand - 1]) k = cand;
      }}
      idx[e] = (uint8_t)k;
      const float c = codebook[k];
      c2[e] = TQ_MUL_RN(c, c);
    }}
{_warp_tree_sum("c2", head_dim)}
    const float scale = {scale_expr};
    if (lane == 0) scales[r] = TQ_FLOAT_TO_HALF(TQ_FMIN(scale, {FP16_MAX:.1f}f));
{pack}
  }}
"""


def quantize_kernel_fits(codec: TurboQuantCodec) -> bool:
    d = codec.head_dim
    return (codec.qjl_rotation is None and codec.rotation.m == 1 and d & (d - 1) == 0
            and 32 <= d <= 256)


@lru_cache(maxsize=32)
def quantize_kernel(head_dim: int, bits: int, norm_correction: bool, backend: str | None = None,
                    load: str = "plain"):
    backend = backend or gpu_backend()
    if backend is None:
        return None
    suffix = "" if load == "plain" else f"_{load}"
    return _builder(backend)(
        name=f"tq_quantize_d{head_dim}b{bits}nc{int(norm_correction)}{suffix}",
        input_names=list(QUANT_INPUTS if load == "plain" else ROWS_INPUTS),
        output_names=list(QUANT_OUTPUTS),
        source=quantize_body(head_dim, bits, norm_correction, backend, load),
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
        grid=(-(-rows // VECTORS_PER_GROUP) * THREADS, 1, 1), threadgroup=(THREADS, 1, 1))
    return QuantizedVectors(codes.reshape(*lead, codec.code_bytes), scales.reshape(lead))


def kernel_quantize_rows(codec: TurboQuantCodec, buffer: mx.array,
                         where: mx.array) -> QuantizedVectors | None:
    """codec.quantize(buffer[where]) in one launch, for fp16 tail buffers (B, heads, tokens, D)
    and int32 rows ``where`` (R,): codes (R, heads, tokens, code_bytes), scales (R, heads,
    tokens). That is the pages' own layout, so a block-opening step writes a batch's full tails
    into the arenas with a gather, a centering, a cast, reshapes and transposes of none of them
    (tqstore.paged.arenas.TurboQuantArena.write_blocks). None where there is no kernel."""
    backend = gpu_backend()
    if backend is None or not quantize_kernel_fits(codec):
        return None
    codec.check_input(buffer)
    if buffer.ndim != 4 or buffer.dtype != mx.float16 or where.ndim != 1 or where.dtype != mx.int32:
        raise ValueError(f"expected fp16 buffers (B, heads, tokens, D) and int32 rows (R,), got "
                         f"{buffer.dtype} {tuple(buffer.shape)} and {tuple(where.shape)}")
    heads, tokens, d = buffer.shape[1:]
    lead = (where.shape[0], heads, tokens)
    rows = lead[0] * heads * tokens
    if rows == 0:
        return QuantizedVectors(mx.zeros((*lead, codec.code_bytes), dtype=mx.uint8),
                                mx.zeros(lead, dtype=mx.float16))
    centered = codec.center is not None
    kern = quantize_kernel(d, codec.bits, codec.norm_correction, backend,
                           "rows_centered" if centered else "rows")
    codes, scales = kern(
        # The center (heads, 1, D) float32 is read flat as (heads, D); without one the kernel
        # never reads that input (the rotation's norm fills the slot).
        inputs=[buffer, codec.rotation.signs, codec.codebook, codec.midpoints,
                _rotation_norm(codec.rotation.p), _params(rows, tokens, heads),
                where,
                codec.center if centered else _rotation_norm(codec.rotation.p)],
        output_shapes=[(*lead, codec.code_bytes), lead],
        output_dtypes=[mx.uint8, mx.float16],
        grid=(-(-rows // VECTORS_PER_GROUP) * THREADS, 1, 1), threadgroup=(THREADS, 1, 1))
    return QuantizedVectors(codes, scales)
