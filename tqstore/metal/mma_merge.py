"""The MMA kernel's split-K merge inside the split launch ("last threadgroup merges").

Every split's threadgroup writes its partial (o, m, l) into one work buffer, fences, and counts
itself in on an arrival counter of its (sequence, kv head); the threadgroup that arrives last
merges all partials in fixed split order, so the bits do not depend on which one merges. The
counters are zero at the launch's start: in the work buffer, zero-filled by MLX, or in the step
form (MmaGeometry.step) the caller's array, which the merging threadgroups zero again. Nothing
else in the buffer is read before this launch writes it. attention_mma.py splices these pieces
into its kernel body; attention_kernel.py sizes the work buffer with fused_layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tqstore.metal.attention_source import LSE_EXPR

if TYPE_CHECKING:
    from tqstore.metal.attention_mma import MmaGeometry

# The fused split-K kernel's one output: a float32 work buffer that MLX zero-fills at every
# launch (init_value=0, one fill for everything; shaped (rows, HQ, DV), rows rounded up; the
# step form's is not filled: its counters are the caller's, the region below goes unused),
# laid out as
#   out (B, HQ, DV) | lse (B, HQ) | counts (B, HKV) int32 | partial_m (B, HQ, nsplit)
#   | partial_l (B, HQ, nsplit) | partial_out (B, HQ, nsplit, DV)
# `out` and `lse` are returned as views of it (fused_layout gives the offsets).
FUSED_OUTPUTS = ("work",)


def fused_layout(batch: int, num_q_heads: int, num_kv_heads: int, value_dim: int,
                 nsplit: int) -> tuple[int, int, int]:
    """(offset of lse, end of lse, total size) of the fused kernel's work buffer, in floats;
    `out` starts at 0."""
    n_out = batch * num_q_heads * value_dim
    n_lse = batch * num_q_heads
    rows = batch * num_q_heads * nsplit
    return n_out, n_out + n_lse, n_out + n_lse + batch * num_kv_heads + rows * (2 + value_dim)


def fused_pointers(caller_counters: bool = False) -> str:
    """The fused kernel's views of its work buffer (layout at FUSED_OUTPUTS). With
    ``caller_counters`` (the step form, MmaGeometry.step) the arrival counters are the input
    ``arrivals`` (B * HKV int32, zero at entry, zero again at exit) instead of the buffer's."""
    counts = ("(int*)arrivals" if caller_counters  # the kernel's own to count on and reset
              else "(int*)(lse + nb_ * HQ)")
    return f"""  const int nb_ = (int)gridDim.z;
  float* const out = work;
  float* const lse = out + nb_ * HQ * DV;
  int* const counts = {counts};
  float* const partial_m = (float*)(lse + nb_ * HQ + nb_ * HKV);
  float* const partial_l = partial_m + nb_ * HQ * nsplit;
  float* const partial_out = partial_l + nb_ * HQ * nsplit;"""


def fused_merge(geo: MmaGeometry, then: str = "") -> str:
    """The last threadgroup of a (sequence, kv head) to finish merges its nsplit partials:
    every threadgroup publishes its partial (stores, device fence, barrier) and then counts
    itself in; the one that counts nsplit - 1 reads all partials in split order, with the
    arithmetic of attention_source.merge_body (same bits whichever threadgroup merges). The
    counters live in the zero-filled work buffer, fresh at every launch, or (the step form)
    in the caller's array, zeroed again here by the merging threadgroup.

    The merge is on the critical path of every split launch (the last threadgroup to finish
    does it), so its loads are batched: the splits' m and l in one round trip, then each
    thread's outputs (OPT of them) MS splits at a time. Loading one output's 8 splits at a
    time took 4.4 us at 33 splits (H100, clock64 per phase); the summation order is unchanged.
    ``then``: statements the merging threadgroup runs after it stored the output (the folded
    epilogue, tqstore.metal.mma_epilogue)."""
    outputs = geo.group * geo.value_dim
    opt = -(-outputs // geo.threads)              # outputs per thread
    ms = max(1, min(16, 32 // opt))               # splits in flight per output (<= 32 loads)
    # Every other threadgroup of this (sequence, kv head) has counted in: the caller's counter
    # can be zeroed for the next launch now.
    reset = "\n    if (tq_tid == 0) counts[b * HKV + kvh] = 0;" if geo.step else ""
    return f"""  TQ_FENCE();
  TQ_BARRIER();
  TQ_SHARED int tq_last;
  TQ_SHARED float tq_mh[8];
  if (tq_tid == 0) tq_last = TQ_ATOMIC_ADD(counts + b * HKV + kvh, 1) == nsplit - 1;
  TQ_BARRIER();
  if (tq_last) {{  // uniform over the threadgroup
    TQ_FENCE();{reset}
    constexpr int OPT = {opt}, MS = {ms};
    // The dequantization tables are dead: their shared memory holds the splits' m and weights.
    float* const sm = (float*)tq_lut;
    float* const sw = sm + G * nsplit;
    const int base = (b * HQ + h0) * nsplit;  // rows of the G heads are contiguous
    for (int i = tq_tid; i < G * nsplit; i += NT) {{
      sm[i] = partial_m[base + i];
      sw[i] = partial_l[base + i];
    }}
    TQ_BARRIER();
    if (tq_tid < G) {{
      float M = NEG_BIG;
      for (int s = 0; s < nsplit; ++s) M = TQ_FMAX(M, sm[tq_tid * nsplit + s]);
      tq_mh[tq_tid] = M;
    }}
    TQ_BARRIER();
    for (int i = tq_tid; i < G * nsplit; i += NT)
      sw[i] = sw[i] * TQ_EXP2(sm[i] - tq_mh[i / nsplit]);
    TQ_BARRIER();
    float ls[OPT], os[OPT];  // per output: sum of weights, weighted sum of partial outputs
#pragma unroll
    for (int r = 0; r < OPT; ++r) {{ ls[r] = 0.0f; os[r] = 0.0f; }}
    for (int s0 = 0; s0 < nsplit; s0 += MS) {{
      float v[OPT][MS];
#pragma unroll
      for (int r = 0; r < OPT; ++r) {{
        // Clamped, unpredicated loads (the extra ones are not summed): ptxas then issues all
        // OPT * MS of them before the first use; predicated ones it kept one per use.
        const int i = tq_tid + r * NT < G * DV ? tq_tid + r * NT : G * DV - 1;
        const float* po = partial_out + (base + (i / DV) * nsplit) * DV + i % DV;
#pragma unroll
        for (int j = 0; j < MS; ++j) v[r][j] = po[(s0 + j < nsplit ? s0 + j : nsplit - 1) * DV];
      }}
#pragma unroll
      for (int r = 0; r < OPT; ++r) {{
        const float* w = sw + ((tq_tid + r * NT) / DV) * nsplit;
#pragma unroll
        for (int j = 0; j < MS; ++j) {{
          if (tq_tid + r * NT < G * DV && s0 + j < nsplit) {{
            ls[r] += w[s0 + j];
            os[r] += w[s0 + j] * v[r][j];
          }}
        }}
      }}
    }}
#pragma unroll
    for (int r = 0; r < OPT; ++r) {{
      const int i = tq_tid + r * NT;
      if (i < G * DV) {{
        const int gq = i / DV, d = i % DV;
        const float Lsum = ls[r], M = tq_mh[gq];
        out[(b * HQ + h0 + gq) * DV + d] = Lsum > 0.0f ? os[r] / Lsum : 0.0f;
        if (d == 0) lse[b * HQ + h0 + gq] = {LSE_EXPR};
      }}
    }}
{then}  }}
"""
