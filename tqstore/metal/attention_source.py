"""Source of the paged decode-attention kernels over TurboQuant pages: one body, two dialects.

Work split (why it is memory-efficient): one threadgroup per (token split, kv head, sequence)
serves all G = Hq / Hkv query heads of its kv head, so each code byte is read once per GQA
group. Inside a threadgroup, LPT lanes share one token (each lane owns DK/LPT key dims and
DV/LPT value dims, read as aligned words), a warp covers 32/LPT tokens, NW warps cover TPC
tokens per step, and every lane issues the loads of U tokens before it computes (memory-level
parallelism). Codebooks live in threadgroup memory (2**bits floats: distinct banks, no
conflicts). Each token group keeps its own online-softmax state (m, l, acc) in registers;
states are merged across lanes by shuffles and across warps through threadgroup memory.
Values are accumulated in the value-rotated space; the caller un-rotates once.

Split-K: threadgroup x index `split` of `nsplit` takes tokens [split*chunk, ..) of its
sequence with chunk = ceil(seq_len / nsplit), so ragged batches spread evenly. With nsplit > 1
the kernel writes (normalised partial output, max, sum) per split, and the merge kernel
combines them: out = sum_s l_s e^(m_s - M) o_s / sum_s l_s e^(m_s - M).

Runtime sizes (max_blocks, nsplit) come in a small int32 `params` input, so one compiled kernel
serves every context length; compile-time constants are the page geometry and head counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tqstore.metal.dialect import body_prologue, dialect_header

ATTN_INPUTS = ("queries", "key_codes", "key_scales", "value_codes", "value_scales",
               "block_tables", "seq_lens", "key_codebook", "value_codebook", "params")
SPLIT_OUTPUTS = ("partial_out", "partial_m", "partial_l")
SINGLE_OUTPUTS = ("out", "lse")
MERGE_INPUTS = ("partial_out", "partial_m", "partial_l", "params")
MERGE_OUTPUTS = ("out", "lse")

NEG_BIG = "-3.0e38f"  # finite "minus infinity": exp(NEG_BIG - x) == 0 without inf - inf NaNs
LN2 = "0.6931471805599453f"
# The log-sum-exp output (natural log, like the paged reference's return_lse) from a softmax's
# max M (log2 units) and sum Lsum: -inf for a sequence without tokens.
LSE_EXPR = f"(Lsum > 0.0f ? (M + TQ_LOG2(Lsum)) * {LN2} : TQ_NEG_INF)"


@dataclass(frozen=True)
class AttentionGeometry:
    """Compile-time constants of one attention kernel."""

    key_dim: int
    value_dim: int
    key_bits: int
    value_bits: int
    block_size: int
    num_q_heads: int
    num_kv_heads: int
    warps: int = 4
    unroll: int = 2
    lanes: int = 0        # lanes per token; 0 = the largest of 8/4/2/1 that fits
    head_split: int = 1   # threadgroups sharing one kv head's query heads (fewer registers each)
    prefetch: bool = True  # load the next U tokens' words before using the current ones
    table_in_shared: bool = True  # stage the split's block-table entries in threadgroup memory

    def __post_init__(self) -> None:
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads {self.num_q_heads} is not a multiple of num_kv_heads"
                             f" {self.num_kv_heads}")
        for name in ("key_dim", "value_dim"):
            d = getattr(self, name)
            if d % 8 or d < 8:
                raise ValueError(f"{name}={d} must be a positive multiple of 8")
        for name in ("key_bits", "value_bits"):
            if getattr(self, name) not in range(1, 9):
                raise ValueError(f"{name} must be in 1..8")
        if self.lanes and (self.lanes not in (1, 2, 4, 8, 16, 32)
                           or self.key_dim % (8 * self.lanes) or self.value_dim % (8 * self.lanes)):
            raise ValueError(f"lanes={self.lanes} must be a power of two <= 32 dividing both"
                             " head dims into whole 8-index groups")
        if self.group % self.head_split:
            raise ValueError(f"head_split {self.head_split} does not divide the group {self.group}")

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def lanes_per_token(self) -> int:
        """Largest of 8/4/2/1 such that every lane owns whole 8-index groups of K and V."""
        if self.lanes:
            return self.lanes
        for lpt in (8, 4, 2, 1):
            if self.key_dim % (8 * lpt) == 0 and self.value_dim % (8 * lpt) == 0:
                return lpt
        raise AssertionError("unreachable: dims are multiples of 8")

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def tag(self) -> str:
        return (f"k{self.key_dim}b{self.key_bits}_v{self.value_dim}b{self.value_bits}"
                f"_bs{self.block_size}_h{self.num_q_heads}x{self.num_kv_heads}"
                f"_w{self.warps}u{self.unroll}l{self.lanes_per_token}s{self.head_split}"
                f"p{int(self.prefetch)}t{int(self.table_in_shared)}")


def _group_loads(var: str, bits: int, base: str, groups: int) -> str:
    """C statements loading `groups` packed 8-index words (bits bytes each) starting at byte
    offset `base` of a row into var[0..groups). Words are read at offsets that are multiples of
    their size: rows are D*bits/8 bytes, a multiple of `bits`, and lane slices start at whole
    groups, so a 4-bit group (4 bytes) sits at a multiple of 4."""
    lines = []
    if bits == 4 and groups % 2 == 0:
        # Two groups per 8-byte vector load.
        for i in range(0, groups, 2):
            lines.append(f"{{ const uint2 w2 = *(const TQ_DEVICE uint2*)(({base}) + {i * 4});"
                         f" {var}[{i}] = w2.x; {var}[{i + 1}] = w2.y; }}")
    elif bits == 4:
        for i in range(groups):
            lines.append(f"{var}[{i}] = *(const TQ_DEVICE tq_u32*)(({base}) + {i * 4});")
    elif bits == 2:
        for i in range(groups):
            lines.append(f"{var}[{i}] = *(const TQ_DEVICE tq_u16*)(({base}) + {i * 2});")
    elif bits == 1:
        for i in range(groups):
            lines.append(f"{var}[{i}] = ({base})[{i}];")
    else:
        # 3, 5, 6, 7, 8 bits: assemble the little-endian word byte by byte (8 bits too: its
        # 8-byte group is only 8-aligned when the lane offset is, which we do not rely on).
        for i in range(groups):
            terms = " | ".join(f"(((tq_u64)({base})[{i * bits + k}]) << {8 * k})"
                               for k in range(bits))
            lines.append(f"{var}[{i}] = {terms};")
    return "\n".join("      " + ln for ln in lines)


def _word_type(bits: int) -> str:
    return "tq_u32" if bits <= 4 else "tq_u64"


_CONST_LOOP = re.compile(r"^(\s*)for \(int (g|j|u|gi|e|i|off|w) = (?!tq_tid)")


def _unroll_constant_loops(body: str) -> str:
    """Put `#pragma unroll` before every loop over a compile-time range: the per-lane arrays
    (q, acc, words) must stay in registers, which needs every index into them constant."""
    out = []
    for line in body.splitlines():
        m = _CONST_LOOP.match(line)
        if m:
            out.append(f"{m.group(1)}#pragma unroll")
        out.append(line)
    return "\n".join(out) + "\n"


def warp_merge_and_store(split: bool, threads: str) -> str:
    """The end both attention bodies share: after each warp staged its (m, l, o) in ``red``
    ((warp * G + head) * (DV + 2) floats), merge the warps with one thread per (query head of
    the group, value dim), ``threads`` threads striding, and store the split's partial (split-K)
    or the output and its log-sum-exp."""
    if split:
        store = """
    const int prow = (b * HQ + h) * nsplit + split;
    partial_out[prow * DV + d] = res;
    if (d == 0) { partial_m[prow] = M; partial_l[prow] = Lsum; }"""
    else:
        store = f"""
    out[(b * HQ + h) * DV + d] = res;
    if (d == 0) lse[b * HQ + h] = {LSE_EXPR};"""
    return f"""  TQ_BARRIER();
  // Merge the warps; one thread per (query head of the group, value dim).
  for (int i = tq_tid; i < G * DV; i += {threads}) {{
    const int gq = i / DV, d = i % DV, h = h0 + gq;
    float M = NEG_BIG;
    for (int w = 0; w < NW; ++w) M = TQ_FMAX(M, red[(w * G + gq) * (DV + 2)]);
    float Lsum = 0.0f, O = 0.0f;
    for (int w = 0; w < NW; ++w) {{
      const TQ_SHARED_PTR float* r = red + (w * G + gq) * (DV + 2);
      const float f = TQ_EXP2(r[0] - M);
      Lsum += r[1] * f;
      O += r[2 + d] * f;
    }}
    const float res = Lsum > 0.0f ? O / Lsum : 0.0f;{store}
  }}
"""


def attention_body(geo: AttentionGeometry, dialect: str, split: bool) -> str:
    """The kernel body (MLX generates the signature from ATTN_INPUTS and the outputs)."""
    return _unroll_constant_loops(_attention_body(geo, dialect, split))


def _attention_body(geo: AttentionGeometry, dialect: str, split: bool) -> str:
    lpt = geo.lanes_per_token
    kdpl, vdpl = geo.key_dim // lpt, geo.value_dim // lpt
    kgrp, vgrp = kdpl // 8, vdpl // 8
    consts = f"""
  constexpr int DK = {geo.key_dim}, DV = {geo.value_dim};
  constexpr int KBITS = {geo.key_bits}, VBITS = {geo.value_bits};
  constexpr int BS = {geo.block_size}, HQ = {geo.num_q_heads}, HKV = {geo.num_kv_heads};
  constexpr int G = {geo.group // geo.head_split}, HS = {geo.head_split}, LPT = {lpt}, NW = {geo.warps}, U = {geo.unroll};
  constexpr int KDPL = {kdpl}, VDPL = {vdpl}, KGRP = {kgrp}, VGRP = {vgrp};
  constexpr int KROW = DK * KBITS / 8, VROW = DV * VBITS / 8;
  constexpr int TPC = (32 / LPT) * NW;
  constexpr tq_u32 KMASK = (1u << KBITS) - 1u, VMASK = (1u << VBITS) - 1u;
  constexpr float NEG_BIG = {NEG_BIG};
  constexpr float LOG2E = 1.4426950408889634f;
"""
    kword, vword = _word_type(geo.key_bits), _word_type(geo.value_bits)

    def load(sfx: str, base: str) -> str:
        """Statements loading the U tokens starting at token `base` into kw{sfx}, vw{sfx},
        ks{sfx}, vs{sfx}, valid{sfx}. Tokens outside [start, end) load token 0 instead (its
        table entry always exists and points at a real or the null block: a valid address)
        and are masked out."""
        table_read = ("(table_in_shared ? bt_s[tt / BS - first_blk]"
                      " : block_tables[b * max_blocks + tt / BS])" if geo.table_in_shared
                      else "block_tables[b * max_blocks + tt / BS]")
        kload = _group_loads(f"kw{sfx}[u]", geo.key_bits, "kptr", kgrp)
        vload = _group_loads(f"vw{sfx}[u]", geo.value_bits, "vptr", vgrp)
        return f"""    for (int u = 0; u < U; ++u) {{
      const int t = {base} + u * TPC + warp * (32 / LPT) + sub;
      valid{sfx}[u] = t < end;
      const int tt = valid{sfx}[u] ? t : 0;
      const int blk = !valid{sfx}[u] ? 0 : {table_read};
      const int row = (blk * HKV + kvh) * BS + (tt % BS);
      const TQ_DEVICE uint8_t* kptr = key_codes + row * KROW + part * (KGRP * KBITS);
      const TQ_DEVICE uint8_t* vptr = value_codes + row * VROW + part * (VGRP * VBITS);
{kload}
{vload}
      ks{sfx}[u] = TQ_HALF_TO_FLOAT(key_scales[row]);
      vs{sfx}[u] = TQ_HALF_TO_FLOAT(value_scales[row]);
    }}"""

    # The block-table entries of this split go to threadgroup memory once, so a token's code
    # load waits on one memory round trip instead of two (table, then codes). Splits longer than
    # TABLE_CAP blocks read the table from device memory as before.
    table_stage = """  constexpr int TABLE_CAP = 1024;
  TQ_SHARED int bt_s[TABLE_CAP];
  const int first_blk = start / BS;
  const int nblk = start < end ? (end - 1) / BS - first_blk + 1 : 0;
  const bool table_in_shared = nblk <= TABLE_CAP;
  if (table_in_shared) {
    for (int i = tq_tid; i < nblk; i += NW * 32) bt_s[i] = block_tables[b * max_blocks + first_blk + i];
  }""" if geo.table_in_shared else ""

    if geo.prefetch:
        prologue_load = load("", "start")
        loop_load = (f"    {kword} kwn[U][KGRP];\n    {vword} vwn[U][VGRP];\n"
                     "    float ksn[U], vsn[U];\n    bool validn[U];\n"
                     + load("n", "base + TPC * U"))
        loop_tail = """    for (int u = 0; u < U; ++u) {
      for (int i = 0; i < KGRP; ++i) kw[u][i] = kwn[u][i];
      for (int i = 0; i < VGRP; ++i) vw[u][i] = vwn[u][i];
      ks[u] = ksn[u]; vs[u] = vsn[u]; valid[u] = validn[u];
    }"""
    else:
        prologue_load, loop_load, loop_tail = "", load("", "base"), ""
    return body_prologue(dialect) + consts + f"""
  const int lane = tq_tid & 31, warp = tq_tid >> 5;
  const int sub = lane / LPT, part = lane % LPT;
  // x = split * HS + head part: the HS threadgroups reading the same pages run side by side,
  // so all but the first find the codes in L2.
  const int split = tq_gx / HS, kvh = tq_gy, b = tq_gz, nsplit = tq_ngx / HS;
  const int h0 = kvh * (G * HS) + (tq_gx % HS) * G;  // first query head of this threadgroup
  const int max_blocks = params[0];

  const int seq_len = seq_lens[b];
  const int chunk = (seq_len + nsplit - 1) / nsplit;
  const int start = split * chunk;
  const int end = (start + chunk < seq_len) ? start + chunk : seq_len;

  TQ_SHARED float ck_s[1 << KBITS];
  TQ_SHARED float cv_s[1 << VBITS];
  TQ_SHARED float red[NW * G * (DV + 2)];
  for (int i = tq_tid; i < (1 << KBITS); i += NW * 32) ck_s[i] = key_codebook[i];
  for (int i = tq_tid; i < (1 << VBITS); i += NW * 32) cv_s[i] = value_codebook[i];
{table_stage}
  TQ_BARRIER();

  float q[G][KDPL];
  for (int g = 0; g < G; ++g) {{
    for (int j = 0; j < KDPL; ++j) q[g][j] = queries[((b * HQ) + h0 + g) * DK + part * KDPL + j] * LOG2E;
  }}
  float m[G], l[G], acc[G][VDPL];
  for (int g = 0; g < G; ++g) {{
    m[g] = NEG_BIG; l[g] = 0.0f;
    for (int j = 0; j < VDPL; ++j) acc[g][j] = 0.0f;
  }}

  // The trip count is uniform across the threadgroup: the shuffles below see every lane.
  // Software pipelining (PREFETCH): the words of the next U tokens are loaded before the
  // current ones are used, doubling the bytes in flight (decode attention is bound by memory
  // latency x parallelism long before it is bound by bandwidth).
  {kword} kw[U][KGRP];
  {vword} vw[U][VGRP];
  float ks[U], vs[U];
  bool valid[U];
{prologue_load}
  for (int base = start; base < end; base += TPC * U) {{
{loop_load}
    // Scores of the U tokens, in log2 units (q carries log2(e)), scaled by the key norms.
    float s[U][G];
    for (int u = 0; u < U; ++u) {{
      for (int g = 0; g < G; ++g) s[u][g] = 0.0f;
      for (int gi = 0; gi < KGRP; ++gi) {{
        const auto w = kw[u][gi];
        for (int e = 0; e < 8; ++e) {{
          const float c = ck_s[(w >> (e * KBITS)) & KMASK];
          for (int g = 0; g < G; ++g) s[u][g] += q[g][gi * 8 + e] * c;
        }}
      }}
      for (int off = 1; off < LPT; off <<= 1) {{
        for (int g = 0; g < G; ++g) s[u][g] += TQ_SHFL_XOR(s[u][g], off);
      }}
      for (int g = 0; g < G; ++g) s[u][g] = valid[u] ? s[u][g] * ks[u] : NEG_BIG;
    }}
    // Online softmax, one max update per U tokens: the rescale branch is rare after the
    // first steps, and no per-token branch remains (invalid tokens get p = 0).
    float pw[U][G];
    for (int g = 0; g < G; ++g) {{
      float mx = s[0][g];
      for (int u = 1; u < U; ++u) mx = TQ_FMAX(mx, s[u][g]);
      if (mx > m[g]) {{
        const float corr = TQ_EXP2(m[g] - mx);
        l[g] *= corr;
        for (int j = 0; j < VDPL; ++j) acc[g][j] *= corr;
        m[g] = mx;
      }}
      for (int u = 0; u < U; ++u) {{
        const float pg = valid[u] ? TQ_EXP2(s[u][g] - m[g]) : 0.0f;
        l[g] += pg;
        pw[u][g] = pg * vs[u];
      }}
    }}
    for (int u = 0; u < U; ++u) {{
      for (int gi = 0; gi < VGRP; ++gi) {{
        const auto w = vw[u][gi];
        for (int e = 0; e < 8; ++e) {{
          const float c = cv_s[(w >> (e * VBITS)) & VMASK];
          for (int g = 0; g < G; ++g) acc[g][gi * 8 + e] += pw[u][g] * c;
        }}
      }}
    }}
{loop_tail}
  }}

  // Merge the token groups of a warp (lanes with equal `part` hold the same dims).
  for (int off = LPT; off < 32; off <<= 1) {{
    for (int g = 0; g < G; ++g) {{
      const float mo = TQ_SHFL_XOR(m[g], off);
      const float lo = TQ_SHFL_XOR(l[g], off);
      const float mn = TQ_FMAX(m[g], mo);
      const float a = TQ_EXP2(m[g] - mn), c = TQ_EXP2(mo - mn);
      l[g] = l[g] * a + lo * c;
      for (int j = 0; j < VDPL; ++j) acc[g][j] = acc[g][j] * a + TQ_SHFL_XOR(acc[g][j], off) * c;
      m[g] = mn;
    }}
  }}
  if (sub == 0) {{
    for (int g = 0; g < G; ++g) {{
      TQ_SHARED_PTR float* r = red + (warp * G + g) * (DV + 2);
      if (part == 0) {{ r[0] = m[g]; r[1] = l[g]; }}
      for (int j = 0; j < VDPL; ++j) r[2 + part * VDPL + j] = acc[g][j];
    }}
  }}
""" + warp_merge_and_store(split, "NW * 32")


MERGE_MAX_SPLITS = 256  # attention_kernel.MAX_SPLITS


def merge_body(value_dim: int, num_q_heads: int, dialect: str) -> str:
    """Combine split partials. Grid (DV, HQ, B), one thread per output element. The (m, l) of
    all splits go to threadgroup memory in parallel, so the per-thread passes over them are
    fast local reads; the partial outputs are read 8 splits at a time (8 loads in flight),
    summed in split order (deterministic)."""
    return body_prologue(dialect) + f"""
  constexpr int DV = {value_dim}, HQ = {num_q_heads}, MAXS = {MERGE_MAX_SPLITS};
  constexpr float NEG_BIG = {NEG_BIG};
  const int d = tq_tid, h = tq_gy, b = tq_gz;
  const int nsplit = params[1];
  const int base = (b * HQ + h) * nsplit;
  TQ_SHARED float sm[MAXS];
  TQ_SHARED float sw[MAXS];
  for (int s = d; s < nsplit; s += DV) sm[s] = partial_m[base + s];
  TQ_BARRIER();
  float M = NEG_BIG;
  for (int s = 0; s < nsplit; ++s) M = TQ_FMAX(M, sm[s]);
  for (int s = d; s < nsplit; s += DV) sw[s] = partial_l[base + s] * TQ_EXP2(sm[s] - M);
  TQ_BARRIER();
  float Lsum = 0.0f, O = 0.0f;
  for (int s0 = 0; s0 < nsplit; s0 += 8) {{
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = s0 + j < nsplit ? partial_out[(base + s0 + j) * DV + d] : 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {{
      if (s0 + j < nsplit) {{ Lsum += sw[s0 + j]; O += sw[s0 + j] * v[j]; }}
    }}
  }}
  out[(b * HQ + h) * DV + d] = Lsum > 0.0f ? O / Lsum : 0.0f;
  if (d == 0) lse[b * HQ + h] = {LSE_EXPR};
"""


def attention_header(dialect: str) -> str:
    return dialect_header(dialect)
