"""Tensor-core (mma.sync) paged decode attention over 4-bit TurboQuant pages: CUDA only.

Same inputs, outputs and split-K/merge contract as the portable kernel of attention_source.py
(which stays the Metal kernel and the CUDA fallback for every shape this one does not cover).
FlashAttention-2 style, on fp16 tiles dequantized in registers; per warp and 16-token tile:

  S^T = K Q^T    mma.m16n8k16: A = K tile (16 tokens x 16 dims per k-step), B = Q^T (16 dims x
                 8 query heads, the G heads of the kv head padded to 8 with zeros), C = S^T.
  O^T += V^T P^T mma.m16n8k16: A = V^T (16 dims x 16 tokens) per 16-dim m-tile, B = P^T (16
                 tokens x 8 heads) from the S^T accumulator by movmatrix.trans, C = O^T.

Putting tokens and dims in M and the (few) heads in N halves the MMAs against heads-in-M (G = 4
fills 4 of 8 columns instead of 4 of 16 rows) and leaves per lane only 8 x 4 fp32 output
accumulators for head_dim 128.

Dequantization is one table lookup per code byte: a 256-entry table byte -> half2(c[low
nibble], c[high nibble]) gives a ready A register (two consecutive k-indices). The table has 32
copies, one per lane, at word e * 64 + table * 32 + lane (K and V interleaved), so every lane
reads its own bank: no conflicts whatever the codes (one shared copy would cost ~3.5-way
conflicts on random bytes). The address is ONE byte_perm: (byte << 8) | (table * 128 + lane * 4).

Dims may be permuted freely inside the dot products (q.k and p.v are sums), so:
- K: lane (g = lane/4, t = lane%4) loads 16 contiguous code bytes [t*DK/8, (t+1)*DK/8) of tokens
  g and g+8 of the tile; at k-step s its bytes 2s and 2s+1 are the A registers (a0/a1: byte 2s
  of tokens g/g+8, a2/a3: byte 2s+1). The matching Q^T fragment holds dims t*DK/4 + 4s + 0..3.
- V: A = V^T wants half2(v[token 2t][dim], v[token 2t+1][dim]): the nibbles of tokens 2t and
  2t+1 are merged into new bytes (lo | hi << 4, two ops per 4 bytes), whose table entry is that
  pair. Lane (g, t) loads the DV/16 code bytes [g*DV/16, (g+1)*DV/16) of tokens 2t, 2t+1, 2t+8,
  2t+9; merged byte i gives m-tile i rows g (dim 2*(g*DV/16+i)) and g+8 (that dim + 1).
  Outputs are written back in the natural dim order (each lane owns 2*DV/16 contiguous dims).

Softmax in log2 units (q carries log2 e) per head in fp32: S^T rows are tokens, so the running
max of heads 2t, 2t+1 is reduced over the 8 lanes of equal t (3 shuffles each); p (<= 1) is
multiplied by the value norm and rounded to fp16 for the PV MMA, the sum l is kept in fp32.
Numerics: q, codebook values and p * value_norm are rounded to fp16 (as FlashAttention does);
products and sums are fp32.

Pipelining: each warp takes every NW-th 16-token tile of its split and keeps DEPTH tiles of code
words in flight in registers (ring of DEPTH + 1 buffers, loop unrolled DEPTH + 1 times: no
register copies); block-table entries are read one step before the codes they locate.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqstore.metal.attention_source import NEG_BIG, warp_merge_and_store
from tqstore.metal.dialect import activations_header, body_prologue, dialect_header
from tqstore.metal.mma_epilogue import merged_epilogue, step_epilogue_unsupported_reason
from tqstore.metal.mma_merge import fused_merge, fused_pointers

LUT_BYTES = 256 * 2 * 32 * 4  # 256 entries x (K, V) x 32 lane copies x half2
# The step form's inputs (MmaGeometry.step): the model's queries (B, HQ, 1, DK) in its dtype,
# each kv head's key rotation (HKV, DK, DK) float32 and the attention scale (1,) float32, then
# attention_source.ATTN_INPUTS' pages, the arrival counters (B * HKV int32, all zero) and
# `after`: never read, an array the previous launch on these counters led to (its step's
# tails). MLX orders GPU work only through the arrays a kernel writes, and the counters are
# only read: `after` is the data edge that keeps two launches on them from overlapping.
STEP_ATTN_INPUTS = ("queries", "rotation", "scale", "key_codes", "key_scales", "value_codes",
                    "value_scales", "block_tables", "seq_lens", "key_codebook",
                    "value_codebook", "params", "arrivals", "after")
TILE = 16


@dataclass(frozen=True)
class MmaGeometry:
    """Compile-time constants of one MMA attention kernel (4-bit K and V codes)."""

    key_dim: int
    value_dim: int
    block_size: int
    num_q_heads: int
    num_kv_heads: int
    warps: int = 4
    depth: int = 1  # tiles of code words in flight per warp beyond the one in use
    # Split-K: the last threadgroup of each (sequence, kv head) merges the splits in the same
    # launch (tqstore/metal/mma_merge.py), instead of the separate merge pass of
    # attention_source.py.
    fused: bool = True
    # The step form (tqstore.metal.step_launch): the kernel takes the model's queries as they
    # are and folds in their scale and rotation (batch_step's rotate kernel, the same float32
    # sums), and the fused merge's arrival counters are the caller's, zeroed again by the
    # merging threadgroup (no zero-fill of the work buffer). Two launches fewer per layer.
    step: bool = False
    # The step form with the per-row epilogue folded in (tqstore.metal.mma_epilogue): the
    # model's output dtype ("float16", "bfloat16", "float32"), None without. One launch per
    # layer: the threadgroup that finishes a (sequence, kv head) goes on into its epilogue.
    epilogue: str | None = None

    def __post_init__(self) -> None:
        why = mma_unsupported_reason(self.key_dim, self.value_dim, 4, 4, self.block_size,
                                     self.num_q_heads, self.num_kv_heads)
        if why:
            raise ValueError(why)
        if self.warps not in range(1, 17):
            raise ValueError(f"warps={self.warps} must be in 1..16")
        if self.depth not in (1, 2, 3):
            raise ValueError(f"depth={self.depth} must be 1, 2 or 3")
        if self.step and not self.fused:
            raise ValueError("the step form merges split-K in the split launch (fused=True)")
        if self.step and 2 * self.group * self.key_dim * 4 > LUT_BYTES:
            raise ValueError("the step form stages its queries in the LUT's shared memory")
        if self.epilogue is not None:
            if not self.step:
                raise ValueError("the epilogue folds into the step form only (step=True)")
            why = step_epilogue_unsupported_reason(self.key_dim, self.value_dim, self.group,
                                                   self.block_size, self.epilogue, LUT_BYTES)
            if why:
                raise ValueError(why)

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def tag(self) -> str:
        return (f"k{self.key_dim}_v{self.value_dim}_bs{self.block_size}"
                f"_h{self.num_q_heads}x{self.num_kv_heads}_w{self.warps}d{self.depth}"
                f"{'f' if self.fused else ''}{'s' if self.step else ''}"
                f"{'_e' + self.epilogue if self.epilogue else ''}")


def mma_unsupported_reason(key_dim: int, value_dim: int, key_bits: int, value_bits: int,
                           block_size: int, num_q_heads: int, num_kv_heads: int) -> str | None:
    """None when the MMA kernel covers this shape, else why not (the portable kernel does)."""
    if key_bits != 4 or value_bits != 4:
        return f"bits k{key_bits}/v{value_bits}: the MMA kernel reads 4-bit codes only"
    if key_dim % 32 or key_dim < 32:
        return f"key_dim {key_dim} is not a multiple of 32"
    if value_dim % 64 or value_dim < 64:
        return f"value_dim {value_dim} is not a multiple of 64"
    if block_size % TILE:
        return f"block_size {block_size} is not a multiple of {TILE}"
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        return f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}"
    if num_q_heads // num_kv_heads > 8:
        return f"GQA group {num_q_heads // num_kv_heads} > 8 (one n=8 MMA tile of heads)"
    return None


_MMA_HELPERS = r"""
// ---- tqstore MMA helpers (CUDA, sm_80+) ----
// Off the device (the CPU syntax check and emulator) they call tq_emu_* hooks.
#if defined(__CUDA_ARCH__)
#define TQ_ANY(p) __any_sync(0xffffffffu, (p))
#define TQ_WARP_UNIFORM(x) __shfl_sync(0xffffffffu, (x), 0)
#else
#define TQ_ANY(p) tq_emu_any(p)
#define TQ_WARP_UNIFORM(x) (x)
#endif
#ifndef TQ_DYNAMIC_SHARED
#define TQ_DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#endif
// D += A * B, m16n8k16, fp16 inputs, fp32 accumulators (PTX fragment layouts).
__device__ __forceinline__ void tq_mma_16816(float (&d)[4], tq_u32 a0, tq_u32 a1, tq_u32 a2,
                                             tq_u32 a3, tq_u32 b0, tq_u32 b1) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  tq_emu_mma_16816(d, a0, a1, a2, a3, b0, b1);
#endif
}
// The 8x8 b16 matrix whose row lane/4 holds cols 2*(lane%4), +1 in x, transposed.
__device__ __forceinline__ tq_u32 tq_movmatrix_trans(tq_u32 x) {
#if defined(__CUDA_ARCH__)
  tq_u32 y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
#else
  return tq_emu_movmatrix_trans(x);
#endif
}
// half2(lo, hi) as a word, round to nearest even (lo in the low 16 bits).
__device__ __forceinline__ tq_u32 tq_pack_half2(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  tq_u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return tq_emu_pack_half2(lo, hi);
#endif
}
// Fused split-K merge: the device-scope fence and the arrival counter. The merging threadgroup
// reads the other threadgroups' partials with plain loads after its own fence: on sm_70+
// __threadfence() is MEMBAR.SC.GPU + CCTL.IVALL (L1 invalidated), and plain loads let ptxas
// issue a whole batch before the first use (ld.global.cg loads, which are "strong", were kept
// one per use: an L2 round trip per split).
#if defined(__CUDA_ARCH__)
#define TQ_FENCE() __threadfence()
#define TQ_ATOMIC_ADD(p, v) atomicAdd((p), (v))
#else
#define TQ_FENCE() tq_emu_fence()
#define TQ_ATOMIC_ADD(p, v) tq_emu_atomic_add((p), (v))
#endif
__device__ __forceinline__ tq_u32 tq_byte_perm(tq_u32 x, tq_u32 y, tq_u32 s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  const tq_u64 v = ((tq_u64)y << 32) | x;
  tq_u32 r = 0;
  for (int i = 0; i < 4; ++i) r |= (tq_u32)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return r;
#endif
}
"""


def mma_header(launch_bounds: tuple[int, int] | None = None, activations: bool = False) -> str:
    """The CUDA dialect plus the MMA helpers. `launch_bounds` (threads, threadgroups per SM)
    caps registers so that as many threadgroups fit as the launch policy assumes (128 at
    depth 1 for 2 x 8 warps). MLX generates the kernel's signature, so the cap rides on a
    redefinition of `__global__`, under NVRTC only. Without a cap, NVRTC builds are one small
    change away from 130 registers: a variant with one more kernel argument got 130, hence one
    threadgroup per SM and a ~20% slower kernel (ncu on an H100, docs/fragments/kernels.md)."""
    bounds = "" if launch_bounds is None else f"""
#if defined(__CUDACC_RTC__) && defined(__location__)
#undef __global__
#define __global__ __location__(global) __launch_bounds__({launch_bounds[0]}, {launch_bounds[1]})
#endif
"""
    base = activations_header("cuda") if activations else dialect_header("cuda")
    return base + _MMA_HELPERS + bounds


def _load_words(dst: str, ptr: str, nbytes: int) -> str:
    """Statements loading nbytes (a multiple of 4) at ptr into tq_u32 dst[0..nbytes/4) with the
    widest aligned vector loads (ptr is a multiple of the chosen width: rows and lane slices
    are)."""
    out, off = [], 0
    while off < nbytes:
        left = nbytes - off
        if left >= 16 and nbytes % 16 == 0:
            out.append(f"{{ const uint4 v = *(const uint4*)({ptr} + {off}); "
                       f"{dst}[{off // 4}] = v.x; {dst}[{off // 4 + 1}] = v.y; "
                       f"{dst}[{off // 4 + 2}] = v.z; {dst}[{off // 4 + 3}] = v.w; }}")
            off += 16
        elif left >= 8 and nbytes % 8 == 0:
            out.append(f"{{ const uint2 v = *(const uint2*)({ptr} + {off}); "
                       f"{dst}[{off // 4}] = v.x; {dst}[{off // 4 + 1}] = v.y; }}")
            off += 8
        else:
            out.append(f"{dst}[{off // 4}] = *(const tq_u32*)({ptr} + {off});")
            off += 4
    return " ".join(out)


def _query_fragments(step: bool) -> str:
    """The Q^T fragments (B operand): head g (zero beyond the group), dims t*DK/4 + 4j + 0..3,
    in log2 units, fp16. The step form first computes q~ = (scale * q) R[kvh] for the G heads
    into shared memory (the LUT's, not built yet), each output a float32 sum over DK in index
    order: the arithmetic of batch_step.rotate_body, so the same bits."""
    if not step:
        source = "queries[(b * HQ + h0 + g) * DK + t * (DK / 4) + 4 * j + i]"
        staged = ""
    else:
        source = "tq_qr[g * DK + t * (DK / 4) + 4 * j + i]"
        staged = """  float* const tq_qs = (float*)tq_lut;  // G * DK scaled queries, then G * DK rotated
  float* const tq_qr = tq_qs + G * DK;
  for (int i = tq_tid; i < G * DK; i += NT)
    tq_qs[i] = TQ_TO_FLOAT(queries[(b * HQ + h0) * DK + i]) * scale[0];
  TQ_BARRIER();
  // One column j of R per thread for all G heads: each R element is loaded once and feeds G
  // sums; 16 loads in flight (this sits on every threadgroup's critical path).
  for (int j = tq_tid; j < DK; j += NT) {
    const float* rc = rotation + kvh * DK * DK + j;
    float acc[G];
#pragma unroll
    for (int gq = 0; gq < G; ++gq) acc[gq] = 0.0f;
#pragma unroll 16
    for (int k = 0; k < DK; ++k) {
      const float r = rc[k * DK];
#pragma unroll
      for (int gq = 0; gq < G; ++gq) acc[gq] += tq_qs[gq * DK + k] * r;
    }
#pragma unroll
    for (int gq = 0; gq < G; ++gq) tq_qr[gq * DK + j] = acc[gq];
  }
  TQ_BARRIER();
"""
    fragments = f"""  tq_u32 qf[KSTEPS][2];
#pragma unroll
  for (int j = 0; j < KSTEPS; ++j) {{
    float x[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      x[i] = g < G ? {source} * LOG2E : 0.0f;
    qf[j][0] = tq_pack_half2(x[0], x[1]);
    qf[j][1] = tq_pack_half2(x[2], x[3]);
  }}
"""
    # The LUT is built over the staged queries next: every thread has its fragments first.
    return staged + fragments + ("  TQ_BARRIER();\n" if step else "")


def mma_attention_body(geo: MmaGeometry, split: bool) -> str:
    """The kernel body (MLX generates the signature from ATTN_INPUTS, or STEP_ATTN_INPUTS for
    the step form, and the outputs); the launch passes LUT_BYTES of dynamic shared memory."""
    dk, dv = geo.key_dim, geo.value_dim
    kbpl, vbpl = dk // 8, dv // 16        # code bytes per lane per token: K, V
    kw, vw = kbpl // 4, vbpl // 4          # ... as words
    ksteps, mtiles = dk // 16, dv // 16
    nbuf = geo.depth + 1
    consts = f"""
  constexpr int DK = {dk}, DV = {dv}, BS = {geo.block_size}, HQ = {geo.num_q_heads};
  constexpr int HKV = {geo.num_kv_heads}, G = {geo.group}, NW = {geo.warps}, NT = NW * 32;
  constexpr int KROW = DK / 2, VROW = DV / 2, KBPL = {kbpl}, VBPL = {vbpl};
  constexpr int KW = {kw}, VW = {vw}, KSTEPS = {ksteps}, MT = {mtiles}, TILE = {TILE};
  constexpr float NEG_BIG = {NEG_BIG};
  constexpr float LOG2E = 1.4426950408889634f;
"""

    def table(expr: str) -> str:
        return (f"(({expr}) < end ? block_tables[b * max_blocks + ({expr}) / BS] : 0)")

    def load(buf: int, tile: str, blk: str) -> str:
        return f"""    {{  // codes of the tile at token {tile} (block {blk}; block 0 = a valid null row past the end)
      const int rowb = ({blk} * HKV + kvh) * BS + ({tile}) % BS;
      const uint8_t* kp = key_codes + (rowb + g) * KROW + t * KBPL;
      {_load_words(f"kc{buf}[0]", "kp", kbpl)}
      {_load_words(f"kc{buf}[1]", "kp + 8 * KROW", kbpl)}
      const uint8_t* vp = value_codes + (rowb + 2 * t) * VROW + g * VBPL;
      {_load_words(f"vc{buf}[0]", "vp", vbpl)}
      {_load_words(f"vc{buf}[1]", "vp + VROW", vbpl)}
      {_load_words(f"vc{buf}[2]", "vp + 8 * VROW", vbpl)}
      {_load_words(f"vc{buf}[3]", "vp + 9 * VROW", vbpl)}
      ks{buf}[0] = key_scales[rowb + g]; ks{buf}[1] = key_scales[rowb + g + 8];
      vs{buf}[0] = value_scales[rowb + g]; vs{buf}[1] = value_scales[rowb + g + 8];
    }}"""

    def compute(buf: int, tile: str) -> str:
        return f"""    {{  // tile at token {tile}
      const int tt = {tile};
      const bool v0 = tt + g < end, v1 = tt + g + 8 < end;
      // S^T = K Q^T (rows: tokens g, g+8; cols: heads 2t, 2t+1)
      float s[4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
      for (int j = 0; j < KSTEPS; ++j) {{
        const tq_u32 w0 = kc{buf}[0][j >> 1], w1 = kc{buf}[1][j >> 1];
        const tq_u32 sel0 = 0x5504u | ((tq_u32)((j & 1) * 2) << 4), sel1 = sel0 + 0x10u;
        tq_mma_16816(s, TQ_LUT(w0, sel0, lk), TQ_LUT(w1, sel0, lk), TQ_LUT(w0, sel1, lk),
                     TQ_LUT(w1, sel1, lk), qf[j][0], qf[j][1]);
      }}
      const float kg = TQ_HALF_TO_FLOAT(ks{buf}[0]), kg8 = TQ_HALF_TO_FLOAT(ks{buf}[1]);
      s[0] = v0 ? s[0] * kg : NEG_BIG;  s[1] = v0 ? s[1] * kg : NEG_BIG;
      s[2] = v1 ? s[2] * kg8 : NEG_BIG; s[3] = v1 ? s[3] * kg8 : NEG_BIG;
      float mx0 = TQ_FMAX(s[0], s[2]), mx1 = TQ_FMAX(s[1], s[3]);
#pragma unroll
      for (int off = 4; off < 32; off <<= 1) {{
        mx0 = TQ_FMAX(mx0, TQ_SHFL_XOR(mx0, off));
        mx1 = TQ_FMAX(mx1, TQ_SHFL_XOR(mx1, off));
      }}
      if (TQ_ANY(mx0 > m0 || mx1 > m1)) {{  // warp-uniform; rare after the first tiles
        const float n0 = TQ_FMAX(m0, mx0), n1 = TQ_FMAX(m1, mx1);
        const float c0 = TQ_EXP2(m0 - n0), c1 = TQ_EXP2(m1 - n1);
        l0 *= c0; l1 *= c1;
#pragma unroll
        for (int i = 0; i < MT; ++i) {{ o[i][0] *= c0; o[i][1] *= c1; o[i][2] *= c0; o[i][3] *= c1; }}
        m0 = n0; m1 = n1;
      }}
      const float p0 = TQ_EXP2(s[0] - m0), p1 = TQ_EXP2(s[1] - m1);
      const float p2 = TQ_EXP2(s[2] - m0), p3 = TQ_EXP2(s[3] - m1);
      l0 += p0 + p2; l1 += p1 + p3;
      const float vg = v0 ? TQ_HALF_TO_FLOAT(vs{buf}[0]) : 0.0f;
      const float vg8 = v1 ? TQ_HALF_TO_FLOAT(vs{buf}[1]) : 0.0f;
      // P^T as the B operand (k: tokens 2t, 2t+1 | 2t+8, 2t+9; n: head g)
      const tq_u32 pb0 = tq_movmatrix_trans(tq_pack_half2(p0 * vg, p1 * vg));
      const tq_u32 pb1 = tq_movmatrix_trans(tq_pack_half2(p2 * vg8, p3 * vg8));
      // O^T += V^T P^T: merged bytes (token 2t nibble | token 2t+1 nibble << 4) per dim
#pragma unroll
      for (int j = 0; j < VW; ++j) {{
        const tq_u32 x0 = vc{buf}[0][j], x1 = vc{buf}[1][j], x8 = vc{buf}[2][j], x9 = vc{buf}[3][j];
        const tq_u32 lo01 = (x0 & 0x0f0f0f0fu) | ((x1 << 4) & 0xf0f0f0f0u);
        const tq_u32 hi01 = ((x0 >> 4) & 0x0f0f0f0fu) | (x1 & 0xf0f0f0f0u);
        const tq_u32 lo89 = (x8 & 0x0f0f0f0fu) | ((x9 << 4) & 0xf0f0f0f0u);
        const tq_u32 hi89 = ((x8 >> 4) & 0x0f0f0f0fu) | (x9 & 0xf0f0f0f0u);
#pragma unroll
        for (int e = 0; e < 4; ++e) {{
          const tq_u32 sel = 0x5504u | ((tq_u32)e << 4);
          tq_mma_16816(o[4 * j + e], TQ_LUT(lo01, sel, lv), TQ_LUT(hi01, sel, lv),
                       TQ_LUT(lo89, sel, lv), TQ_LUT(hi89, sel, lv), pb0, pb1);
        }}
      }}
    }}"""

    # The main loop, unrolled nbuf times: step j computes buffer j and refills buffer
    # (j + depth) % nbuf with the tile depth steps ahead.
    steps = []
    for j in range(nbuf):
        refill = (j + geo.depth) % nbuf
        ahead = f"tile + {j + geo.depth} * STRIDE"
        steps.append(load(refill, ahead, "bt"))
        steps.append(f"    bt = {table(f'tile + {j + geo.depth + 1} * STRIDE')};")
        steps.append(compute(j, f"tile + {j} * STRIDE"))
        if j < nbuf - 1:
            steps.append(f"    if (tile + {j + 1} * STRIDE >= end) break;")
    prologue_loads = []
    for j in range(geo.depth):
        prologue_loads.append(f"  bt = {table(f'tile0 + {j} * STRIDE')};")
        prologue_loads.append(load(j, f"tile0 + {j} * STRIDE", "bt"))
    prologue_loads.append(f"  bt = {table(f'tile0 + {geo.depth} * STRIDE')};")
    buffers = "\n".join(
        f"  tq_u32 kc{i}[2][KW], vc{i}[4][VW];\n  __half ks{i}[2], vs{i}[2];" for i in range(nbuf))

    fused = split and geo.fused

    return body_prologue("cuda") + consts + f"""
  const int lane = tq_tid & 31, warp = TQ_WARP_UNIFORM(tq_tid >> 5);
  const int g = lane >> 2, t = lane & 3;
  const int split = tq_gx, kvh = tq_gy, b = tq_gz, nsplit = tq_ngx;
  const int h0 = kvh * G;
  const int max_blocks = params[0];
{fused_pointers(geo.step) if fused else ""}
  const int seq_len = seq_lens[b];
  // Splits cover whole 16-token tiles, so a tile never straddles a page (BS % 16 == 0).
  const int chunk = ((seq_len + nsplit - 1) / nsplit + TILE - 1) / TILE * TILE;
  const int start = split * chunk < seq_len ? split * chunk : seq_len;
  const int end = start + chunk < seq_len ? start + chunk : seq_len;
  constexpr int STRIDE = NW * TILE;
  const int tile0 = start + warp * TILE;

  TQ_DYNAMIC_SHARED(uint8_t, tq_lut);
{"" if geo.step else _query_fragments(False)}
  // Code words in flight, issued after the queries and before the table is built, whose
  // latency they overlap. (A kernel's first global loads wait ~4.5 us whatever they read;
  // queries first, then codes, measured 1.5 us shorter per launch than the reverse order:
  // clock64 per phase on an H100, docs/fragments/kernels.md.) The step form issues the codes
  // first and rotates the queries while they are in flight.
{buffers}
  int bt;
{chr(10).join(prologue_loads)}
{_query_fragments(True) if geo.step else ""}
  // The dequantization table: entry e of table T (0 = K, 1 = V) for lane L is the word
  // e * 64 + T * 32 + L, half2(c_T[e & 15], c_T[e >> 4]).
  for (int v = tq_tid; v < {LUT_BYTES // 16}; v += NT) {{
    const int e = v >> 4;
    const float* cb = ((v >> 3) & 1) ? value_codebook : key_codebook;
    const tq_u32 h = tq_pack_half2(cb[e & 15], cb[e >> 4]);
    uint4 hv;
    hv.x = h; hv.y = h; hv.z = h; hv.w = h;
    *(uint4*)(tq_lut + v * 16) = hv;
  }}
  const tq_u32 lk = (tq_u32)lane * 4u, lv = 128u + (tq_u32)lane * 4u;
#define TQ_LUT(w, sel, lo) (*(const tq_u32*)(tq_lut + tq_byte_perm((w), (lo), (sel))))

  // Per lane: heads 2t (0) and 2t+1 (1); o[i] is O^T m-tile i (rows: dims, cols: heads).
  float m0 = NEG_BIG, m1 = NEG_BIG, l0 = 0.0f, l1 = 0.0f;
  float o[MT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i) {{ o[i][0] = 0.0f; o[i][1] = 0.0f; o[i][2] = 0.0f; o[i][3] = 0.0f; }}
  TQ_SHARED float red[NW * G * (DV + 2)];
  TQ_BARRIER();

  // Trip counts are uniform within a warp (MMAs and shuffles see every lane).
  for (int tile = tile0; tile < end; tile += {nbuf} * STRIDE) {{
{chr(10).join(steps)}
  }}
#undef TQ_LUT

  // Row sums over the 8 lanes of equal t; m is already uniform there.
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {{
    l0 += TQ_SHFL_XOR(l0, off);
    l1 += TQ_SHFL_XOR(l1, off);
  }}
#pragma unroll
  for (int c = 0; c < 2; ++c) {{
    const int hh = 2 * t + c;
    if (hh < G) {{
      TQ_SHARED_PTR float* r = red + (warp * G + hh) * (DV + 2);
      if (g == 0) {{ r[0] = c ? m1 : m0; r[1] = c ? l1 : l0; }}
#pragma unroll
      for (int i = 0; i < MT; ++i) {{
        const int d = 2 * (g * VBPL + i);
        r[2 + d] = o[i][c];
        r[3 + d] = o[i][2 + c];
      }}
    }}
  }}
""" + warp_merge_and_store(split, "NT") + _finish(geo, fused)


def _finish(geo: MmaGeometry, fused: bool) -> str:
    """After the warps' merge: split-K's fused merge, and the epilogue where it is folded in,
    run by the threadgroup that holds the finished output of its (b, kvh): the merging one,
    or the only one without split-K."""
    epilogue = "" if geo.epilogue is None else merged_epilogue(
        geo.key_dim, geo.value_dim, geo.group, geo.block_size, LUT_BYTES, geo.threads)
    if fused:
        return fused_merge(geo, then=epilogue)
    return epilogue
