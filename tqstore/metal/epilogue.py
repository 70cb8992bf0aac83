"""The end of a decode step's attention as ONE kernel: un-rotate the pages' output, merge its
softmax with the fp16 tail's, append the new token to the tail, write the model's dtype.

Why: on a GPU a decode step's cost is dominated by launches, not bytes (tools/profile_decode.py
on an H100: 1,272 kernels per Llama-3-8B step against fp16's 580, with the GPU busy 8.8 ms of a
much longer step). The pure-MLX epilogue (tqstore.paged.tail.decode_epilogue_reference) is ~14
launches per layer: the output rotation's matmul, the tail's concatenations, centering, casts,
the compiled merge's matmuls and reductions. This kernel computes the same function in one.

Inputs (B sequences; every row has the same tail length, which the paged cache guarantees, as
a sequence's layers share one step):
  pages_out    float32 (B, HQ, DV)   normalized output over the pages, value-rotated space
  pages_lse    float32 (B, HQ)       its natural log-sum-exp (-inf: no page token)
  queries      float32 (B, HQ, DK)   scale * q, NOT rotated (the tail's keys are not)
  tail_keys    float16 (B, HKV, n_old, DK)  the tail before this step (raw keys)
  tail_values  float16 (B, HKV, n_old, DV)
  new_keys     float16 (B, HKV, n - n_old, DK)  this step's tokens (n == n_old: unused)
  new_values   float16 (B, HKV, n - n_old, DV)
  tail_info    int32 (2,) = [n, n_old], 1 <= n <= block_size
  key_center   float32 (HKV, DK)     the keys' center (zeros without one): scores use k - c
  output_rotation float32 (HKV, DV, DV)  o = o~ @ R per kv head
Outputs: out (B, HQ, DV) in the model's dtype; next_tail_keys/values float16 (B, HKV, n, D):
the tail followed by the new tokens (what the cache keeps for the next step).

The per-row form (``per_row=True``, tqstore.metal.batch_step: a batch of sequences whose tails
differ in length, one launch per layer for the whole batch) differs in its inputs: every tail is
held in a block-sized buffer; one new token per row in the model's dtype; the queries raw, in
the model's dtype, scaled in the kernel; the pages' log-sum-exp possibly packed after their
output in one buffer (the split attention kernel's work buffer). Its contract is in batch_step.

Math per query head (natural log units, the rule of tqstore.paged.tail):
  s_t = q . (k_t - c)             for the n tail tokens
  m   = max(lse, max_t s_t);  w = exp(lse - m);  p_t = exp(s_t - m)
  out = (w * (o~ @ R) + sum_t p_t v_t) / (w + sum_t p_t)

Launch: grid (DV / DC, HKV, B) threadgroups of NT threads; threadgroup x owns output dims
[x * DC, (x + 1) * DC) of every head of its kv head (the few tail scores are recomputed per
threadgroup: G * n * DK multiply-adds, less than reading the rotation's columns); x == 0 also
writes the next tail. Everything a thread loops over is staged in threadgroup memory first
(the tail keys chunk by chunk, R's columns): the loads are issued together instead of one
dependent L2 round trip per loop step (23 us per call before, on an H100).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from tqstore.metal.dialect import activations_header, body_prologue, dialect_header

EPILOGUE_INPUTS = ("pages_out", "pages_lse", "queries", "tail_keys", "tail_values",
                   "new_keys", "new_values", "tail_info", "key_center", "output_rotation")
EPILOGUE_OUTPUTS = ("out", "next_tail_keys", "next_tail_values")
INPUT_TYPES = dict(pages_out="float32", pages_lse="float32", queries="float32",
                   tail_keys="float16", tail_values="float16", new_keys="float16",
                   new_values="float16", tail_info="int32", key_center="float32",
                   output_rotation="float32")
THREADS = 256
DIMS_PER_GROUP = 32
STAGE_FLOATS = 4096  # tail keys staged per chunk, as floats (16 KB); also holds R's columns
SHARED_LIMIT = 28 * 1024  # bytes of threadgroup memory the kernel may use (Metal has 32 KB)

# How the body stores a float into `out`, per dialect and output dtype.
_STORE = {
    "cuda": {"float32": "(v)", "float16": "__float2half_rn(v)",
             "bfloat16": "__float2bfloat16_rn(v)"},
    "metal": {"float32": "(v)", "float16": "static_cast<float16_t>(v)",
              "bfloat16": "static_cast<bfloat16_t>(v)"},
}
OUT_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _stage_floats(key_dim: int, value_dim: int) -> int:
    """The staging buffer: a chunk of tail keys (rows padded by one float against bank
    conflicts), later R's DIMS_PER_GROUP columns of this threadgroup."""
    return max(STAGE_FLOATS, (key_dim + 1) * max(1, STAGE_FLOATS // key_dim),
               value_dim * DIMS_PER_GROUP)


def shared_bytes(key_dim: int, value_dim: int, group: int, block_size: int,
                 stage_values: bool = False, stage_floats: int = 0) -> int:
    """Threadgroup bytes of epilogue_shared with the same arguments."""
    values = block_size * value_dim if stage_values else 0
    stage = max(_stage_floats(key_dim, value_dim), stage_floats)
    return 4 * (group * (key_dim + value_dim + block_size + 1) + stage + values)


def epilogue_unsupported_reason(key_dim: int, value_dim: int, num_q_heads: int,
                                num_kv_heads: int, block_size: int, out_dtype: str) -> str | None:
    """None when the kernel covers the shape, else why not (the reference then runs)."""
    if out_dtype not in OUT_DTYPES:
        return f"output dtype {out_dtype}"
    if value_dim % DIMS_PER_GROUP:
        return f"value_dim {value_dim} is not a multiple of {DIMS_PER_GROUP}"
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        return f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}"
    need = shared_bytes(key_dim, value_dim, num_q_heads // num_kv_heads, block_size)
    if need > SHARED_LIMIT:
        return f"needs {need} bytes of threadgroup memory (GQA group x head dims x block size)"
    return None


def epilogue_header(dialect: str, out_dtype: str, activations: bool = False) -> str:
    """The dialect's macros and TQ_OUT for `out_dtype`; `activations`: also TQ_TO_FLOAT (the
    per-row form reads the model's queries and new K/V in their own dtype)."""
    head = activations_header(dialect) if activations else dialect_header(dialect)
    return head + out_define(dialect, out_dtype)


def out_define(dialect: str, out_dtype: str) -> str:
    """The header line that makes TQ_OUT(v) store a float as `out_dtype`."""
    return f"\n#define TQ_OUT(v) {_STORE[dialect][out_dtype]}\n"


def epilogue_body(dialect: str, key_dim: int, value_dim: int, num_q_heads: int,
                  num_kv_heads: int, block_size: int, per_row: bool = False,
                  packed: bool = False) -> str:
    """The kernel body; ``per_row``: the batched form (tqstore.metal.batch_step; ``packed``:
    the log-sum-exp follows the pages' output in one buffer), else one tail length."""
    lse_base = "tq_ngz * HQ * DV + " if packed else ""  # after the B rows of (HQ, DV) outputs
    return body_prologue(dialect) + f"""
  constexpr int DK = {key_dim}, DV = {value_dim}, HQ = {num_q_heads}, HKV = {num_kv_heads};
  constexpr int G = {num_q_heads // num_kv_heads}, NT = {THREADS};
  const int kvh = tq_gy, b = tq_gz, h0 = kvh * G;
""" + epilogue_shared(key_dim, value_dim, num_q_heads // num_kv_heads, block_size) + epilogue_core(
        key_dim, block_size, per_row, pages_out="pages_out",
        pages_lse=f"pages_lse[{lse_base}b * HQ + h0 + tq_tid]", out="out",
        dims=("tq_gx * DC", "tq_gx * DC + DC"), copy_tail="tq_gx == 0")


def epilogue_shared(key_dim: int, value_dim: int, group: int, block_size: int,
                    base: str | None = None, stage_values: bool = False,
                    stage_floats: int = 0) -> str:
    """The epilogue's threadgroup arrays: declared (``base`` None), or carved out of the
    float buffer ``base`` (a kernel whose threadgroup memory is free by then: the MMA step
    kernel's dequantization table, tqstore.metal.mma_epilogue), shared_bytes in all.
    ``stage_values``: also ``vstage``, the tail's values as floats (epilogue_core's);
    ``stage_floats``: a staging buffer of at least that many floats (wider passes)."""
    sizes = [("qs", group * key_dim), ("o_rot", group * value_dim), ("p", group * block_size),
             ("w_pages", group), ("stage", max(_stage_floats(key_dim, value_dim), stage_floats))]
    if stage_values:
        sizes.append(("vstage", block_size * value_dim))
    if base is None:
        return "".join(f"  TQ_SHARED float {name}[{size}];\n" for name, size in sizes)
    lines, offset = [], 0
    for name, size in sizes:
        lines.append(f"  float* const {name} = (float*)({base}) + {offset};\n")
        offset += size
    return "".join(lines)


def _gathered(groups: list[tuple[str, str, list[tuple[str, str]], list[str]]]) -> str:
    """A loop over i by the threadgroup's NT threads whose global loads are issued together:
    per round each thread loads its elements of every group into registers, then stores
    them. A group is (its count of elements, elements per thread and round: a compile-time
    expression, its loads: (register array, float expression of i), its stores: statements
    on ``name[u_]`` and i). Why: the outputs may alias the inputs as far as the compiler
    knows, so in a plain loop each load waits for the previous element's store, one memory
    round trip per element (the folded epilogue took 15-21 us of the step kernel's 40-80 on
    an H200, tools/mma_phases.py --forms step-epilogue); groups in one round share one round
    trip. Each load reads one array at an address of its own: a select between two arrays
    per element (the old tail or the new token) made ptxas reuse one register for the
    address and the result of each such load, which serialized them. Same values, same
    order of every sum."""
    rounds = "".join(
        f"    {{ const int r_ = ({total} + ({width}) * NT - 1) / (({width}) * NT); "
        f"rounds_ = r_ > rounds_ ? r_ : rounds_; }}\n" for total, width, _, _ in groups)
    decl = "".join(f"      float {name}[{width}];\n"
                   for _, width, loads, _ in groups for name, _ in loads)
    load = "".join(f"""#pragma unroll
      for (int u_ = 0; u_ < ({width}); ++u_) {{
        const int i = (r_ * ({width}) + u_) * NT + tq_tid;
""" + "".join(f"        {name}[u_] = i < {total} ? {expr} : 0.0f;\n" for name, expr in loads)
                   + "      }\n" for total, width, loads, _ in groups)
    store = "".join(f"""#pragma unroll
      for (int u_ = 0; u_ < ({width}); ++u_) {{
        const int i = (r_ * ({width}) + u_) * NT + tq_tid;
        if (i < {total}) {{
""" + "".join(f"          {st}\n" for st in stores) + "        }\n      }\n"
                    for total, width, _, stores in groups)
    return f"""  {{
    int rounds_ = 0;
{rounds}    for (int r_ = 0; r_ < rounds_; ++r_) {{
{decl}{load}{store}    }}
  }}
"""


def epilogue_core(key_dim: int, block_size: int, per_row: bool, *, pages_out: str,
                  pages_lse: str, out: str, dims: tuple[str, str], copy_tail: str,
                  stage_values: bool = False, width: str = "DC") -> str:
    """The epilogue's work for one (sequence b, kv head kvh): the tail's scores, the softmax
    over (pages, tail), the output dims [dims[0], dims[1]) of the group's heads, ``width``
    dims per pass, and (where ``copy_tail`` holds) the next tail. In scope: DK, DV, HQ, HKV,
    G, NT, b, kvh, h0, the arrays of epilogue_shared and the inputs and outputs of the module
    doc (the model's output named ``out``; ``pages_out`` the name of the pages' output,
    ``pages_lse`` the expression of head h0 + tq_tid's log-sum-exp). Every output is the same
    float32 sum in the same order whichever dims a threadgroup owns and however many it
    stages per pass (one chunk of DC in the standalone kernel, all of them in passes of a
    multiple of DC in the MMA step kernel's merging threadgroup: ``stage`` must hold DV x
    width floats), so both give the same bits. ``stage_values`` (epilogue_shared's ``vstage``
    exists): the tail's values are read once into threadgroup memory instead of once per pass
    from device memory; the same values, so the same bits.

    Every global load before the scores is issued in one round (_gathered: the queries, the
    pages' output, the tail's values and first chunk of keys, with the next tail's copy on
    the way), and R's next pass of columns is loaded while the current one is used: the
    merging threadgroup of the MMA step kernel runs this on the launch's critical path,
    where every round trip to memory is the whole GPU's time."""
    chunk = max(1, STAGE_FLOATS // key_dim)
    # Where row b's lengths are, and how many rows each tail buffer holds per (b, kv head).
    info, old_rows, next_rows = ("2 * b", "MAXN", "MAXN") if per_row else ("0", "n_old", "n")
    if per_row:  # rows past n are zeros; queries and new tokens in the model's dtype
        query = "TQ_TO_FLOAT(queries[(b * HQ + h0) * DK + i]) * scale[0]"
        # (the output's tail values where they are not staged: TQ_TAIL_V)
        new_v = "TQ_FLOAT_TO_HALF(TQ_TO_FLOAT(new_values[(new_k + (t) - n_old) * DV + (d)]))"
    else:
        query = "queries[(b * HQ + h0) * DK + i]"
        new_v = "new_values[(new_k + (t) - n_old) * DV + (d)]"

    def widened(x: str) -> str:
        """A new token's element as the tail holds it, as float."""
        return f"TQ_HALF_TO_FLOAT(TQ_FLOAT_TO_HALF(TQ_TO_FLOAT({x})))" if per_row else (
            f"TQ_HALF_TO_FLOAT({x})")

    def keys(c0: str, count: str) -> list[tuple[str, str, list[tuple[str, str]], list[str]]]:
        """The gathered groups of the tail keys [c0, c0 + count): the old tail's ko_ rows
        first, then the new tokens' (each group one contiguous run of its array), copied and
        staged minus the center."""
        center = ("kc_", "key_center[kvh * DK + i % DK]")
        return [
            ("ko_ * DK", "WK", [("kx_", f"TQ_HALF_TO_FLOAT(tail_keys[(old_k + {c0}) * DK + i])"),
                                center],
             [f"if (copy) next_tail_keys[(row + {c0}) * DK + i] = TQ_FLOAT_TO_HALF(kx_[u_]);",
              "stage[(i / DK) * KP + i % DK] = kx_[u_] - kc_[u_];"]),
            (f"({count} - ko_) * DK", "WN",
             [("nx_", widened(f"new_keys[(new_k + {c0} + ko_ - n_old) * DK + i]")),
              ("nc_", "key_center[kvh * DK + i % DK]")],
             [f"if (copy) next_tail_keys[(row + {c0} + ko_) * DK + i] = TQ_FLOAT_TO_HALF(nx_[u_]);",
              "stage[(ko_ + i / DK) * KP + i % DK] = nx_[u_] - nc_[u_];"])]

    old_value_stores = ["if (copy) next_tail_values[row * DV + i] = TQ_FLOAT_TO_HALF(vx_[u_]);"]
    new_value_stores = ["if (copy) next_tail_values[(row + n_old) * DV + i] = "
                        "TQ_FLOAT_TO_HALF(wx_[u_]);"]
    if stage_values:
        old_value_stores.append("vstage[i] = vx_[u_];")
        new_value_stores.append("vstage[n_old * DV + i] = wx_[u_];")
    # Without the staged values only the copy needs them here (the output reads them itself).
    when = "" if stage_values else "copy ? "
    otherwise = "" if stage_values else " : 0"
    entry = _gathered([
        ("G * DK", "WQ", [("q_", query)], ["qs[i] = q_[u_];"]),
        ("G * DV", "WO", [("o_", f"{pages_out}[(b * HQ + h0) * DV + i]")],
         ["o_rot[i] = o_[u_];"]),
        (f"({when}n_old * DV{otherwise})", "WV",
         [("vx_", "TQ_HALF_TO_FLOAT(tail_values[old_k * DV + i])")], old_value_stores),
        (f"({when}n_new * DV{otherwise})", "WN",
         [("wx_", widened("new_values[new_k * DV + i]"))], new_value_stores),
        *keys("0", "cn0")])
    later_keys = _gathered(keys("c0", "cn"))
    tail_value = ("vstage[t * DV + d0 + c]" if stage_values
                  else "TQ_HALF_TO_FLOAT(TQ_TAIL_V(t, d0 + c))")
    zero_rows = ("""  if (copy) {
    for (int i = n * DK + tq_tid; i < MAXN * DK; i += NT) next_tail_keys[row * DK + i] = TQ_FLOAT_TO_HALF(0.0f);
    for (int i = n * DV + tq_tid; i < MAXN * DV; i += NT) next_tail_values[row * DV + i] = TQ_FLOAT_TO_HALF(0.0f);
  }
""" if per_row else "")
    return f"""  constexpr int MAXN = {block_size}, DC = {DIMS_PER_GROUP}, DW = {width};
  constexpr int CH = {chunk}, KP = DK + 1;  // tail keys staged per chunk, padded row length
  constexpr int RPT = (DV * DW + NT - 1) / NT;  // R's elements per thread per pass
  // Elements per thread and round of the gathered loads (at most 8 per array).
  constexpr int WQ = (G * DK + NT - 1) / NT < 8 ? (G * DK + NT - 1) / NT : 8;
  constexpr int WO = (G * DV + NT - 1) / NT < 8 ? (G * DV + NT - 1) / NT : 8;
  constexpr int WV = (MAXN * DV + NT - 1) / NT < 8 ? (MAXN * DV + NT - 1) / NT : 8;
  constexpr int WK = ((MAXN < CH ? MAXN : CH) * DK + NT - 1) / NT < 8
      ? ((MAXN < CH ? MAXN : CH) * DK + NT - 1) / NT : 8;
  // A new token's row per round: one new token per row in the per-row form; more (the
  // standalone form's contract allows them) take more rounds.
  constexpr int WN = ((DK > DV ? DK : DV) + NT - 1) / NT;
  const int n = tail_info[{info}], n_old = tail_info[{info} + 1], n_new = n - n_old;
  const int cn0 = n < CH ? n : CH;
  int ko_ = n_old < cn0 ? n_old : cn0;  // the old tail's rows in the key chunk
  const int rot = kvh * DV * DV;
  // Token t of the tail after this step: the old tail's, then the new ones.
  const int old_k = (b * HKV + kvh) * {old_rows}, new_k = (b * HKV + kvh) * n_new;
#define TQ_TAIL_V(t, d) ((t) < n_old ? tail_values[(old_k + (t)) * DV + (d)] : {new_v})
  // The next tail (where `copy`): a copy of the old one plus the new tokens (then zeros).
  const bool copy = {copy_tail};
  const int row = (b * HKV + kvh) * {next_rows};
{entry}{zero_rows}  // R's first pass of columns: in flight through the scores and the softmax.
  float rn_[RPT];
#define TQ_R_LOAD(d0) \\
  for (int u_ = 0; u_ < RPT; ++u_) {{ const int i = u_ * NT + tq_tid; \\
    rn_[u_] = i < DV * DW ? output_rotation[rot + (i / DW) * DV + (d0) + i % DW] : 0.0f; }}
  TQ_R_LOAD({dims[0]})
  // Tail scores s = q . (k - c): keys staged chunk by chunk (the first one above), then one
  // thread per (head, token) over the staged row.
  for (int c0 = 0; c0 < n; c0 += CH) {{
    const int cn = n - c0 < CH ? n - c0 : CH;
    if (c0 > 0) {{  // the next chunk of a tail longer than CH tokens
      TQ_BARRIER();
      ko_ = n_old - c0 < 0 ? 0 : (n_old - c0 < cn ? n_old - c0 : cn);
{later_keys}    }}
    TQ_BARRIER();
    for (int pair = tq_tid; pair < G * cn; pair += NT) {{
      const int gq = pair / cn, tt = pair % cn;
      float s = 0.0f;
      for (int d = 0; d < DK; ++d) s += qs[gq * DK + d] * stage[tt * KP + d];
      p[gq * MAXN + c0 + tt] = s;
    }}
  }}
  TQ_BARRIER();
  // Per head, softmax over (pages, tail) as normalized weights in place.
  if (tq_tid < G) {{
    const float lse_h = {pages_lse};
    float m = lse_h;
    for (int t = 0; t < n; ++t) m = TQ_FMAX(m, p[tq_tid * MAXN + t]);
    const float wp = TQ_EXP(lse_h - m);
    float sum = wp;
    for (int t = 0; t < n; ++t) {{
      const float e = TQ_EXP(p[tq_tid * MAXN + t] - m);
      p[tq_tid * MAXN + t] = e;
      sum += e;
    }}
    const float inv = 1.0f / sum;
    for (int t = 0; t < n; ++t) p[tq_tid * MAXN + t] *= inv;
    w_pages[tq_tid] = wp * inv;
  }}
  // Per pass of DW output dims: R's columns [d0, d0 + DW) from registers into the staging
  // buffer, the next pass's loads issued, then the un-rotated pages' output plus the tail's
  // values.
  for (int d0 = {dims[0]}; d0 < {dims[1]}; d0 += DW) {{
    TQ_BARRIER();  // the weights are in; the previous pass is done with the stage
    for (int u_ = 0; u_ < RPT; ++u_) {{
      const int i = u_ * NT + tq_tid;
      if (i < DV * DW) stage[i] = rn_[u_];
    }}
    TQ_BARRIER();
    if (d0 + DW < {dims[1]}) {{ TQ_R_LOAD(d0 + DW) }}
    for (int i = tq_tid; i < G * DW; i += NT) {{
      const int gq = i / DW, c = i % DW;
      float acc = 0.0f;
      for (int j = 0; j < DV; ++j) acc += o_rot[gq * DV + j] * stage[j * DW + c];
      float v = w_pages[gq] * acc;
      for (int t = 0; t < n; ++t) v += p[gq * MAXN + t] * {tail_value};
      {out}[(b * HQ + h0 + gq) * DV + d0 + c] = TQ_OUT(v);
    }}
  }}
#undef TQ_R_LOAD
#undef TQ_TAIL_V
"""


def out_dtype_name(dtype: mx.Dtype) -> str | None:
    """The kernels' name of an output dtype (a key of OUT_DTYPES), None if not covered."""
    for name, dt in OUT_DTYPES.items():
        if dt == dtype:
            return name
    return None


def epilogue_fits(key_dim: int, value_dim: int, num_q_heads: int, num_kv_heads: int,
                  block_size: int, out_dtype: mx.Dtype) -> bool:
    name = out_dtype_name(out_dtype)
    return name is not None and epilogue_unsupported_reason(
        key_dim, value_dim, num_q_heads, num_kv_heads, block_size, name) is None


@lru_cache(maxsize=32)
def epilogue_kernel(backend: str, key_dim: int, value_dim: int, num_q_heads: int,
                    num_kv_heads: int, block_size: int, out_dtype: str):
    builder = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    return builder(
        name=(f"tq_decode_epilogue_k{key_dim}_v{value_dim}_h{num_q_heads}x{num_kv_heads}"
              f"_bs{block_size}_{out_dtype}"),
        input_names=list(EPILOGUE_INPUTS), output_names=list(EPILOGUE_OUTPUTS),
        source=epilogue_body(backend, key_dim, value_dim, num_q_heads, num_kv_heads, block_size),
        header=epilogue_header(backend, out_dtype), ensure_row_contiguous=True)


def kernel_decode_epilogue(backend: str, pages_out: mx.array, pages_lse: mx.array,
                           queries: mx.array, tail_keys: mx.array, tail_values: mx.array,
                           new_keys: mx.array | None, new_values: mx.array | None,
                           tail_info: mx.array, key_center: mx.array,
                           output_rotation: mx.array, block_size: int, out_dtype: mx.Dtype
                           ) -> tuple[mx.array, mx.array, mx.array] | None:
    """The epilogue on the GPU kernel (contract in the module doc; new_keys None: no new
    token, tail_info must then hold [n_old, n_old]), or None where the kernel does not cover
    the shape."""
    tail_length = tail_keys.shape[2] + (0 if new_keys is None else new_keys.shape[2])
    if new_keys is None:
        new_keys, new_values = tail_keys, tail_values  # never read: n == n_old
    bsz, hq, dk = queries.shape
    hkv, dv = output_rotation.shape[0], output_rotation.shape[-1]
    name = out_dtype_name(out_dtype)
    if name is None or epilogue_unsupported_reason(dk, dv, hq, hkv, block_size, name):
        return None
    kernel = epilogue_kernel(backend, dk, dv, hq, hkv, block_size, name)
    f16 = mx.float16
    return tuple(kernel(
        inputs=[pages_out, pages_lse, queries, tail_keys.astype(f16), tail_values.astype(f16),
                new_keys.astype(f16), new_values.astype(f16), tail_info, key_center,
                output_rotation],
        output_shapes=[(bsz, hq, dv), (bsz, hkv, tail_length, dk), (bsz, hkv, tail_length, dv)],
        output_dtypes=[out_dtype, f16, f16],
        grid=(THREADS * (dv // DIMS_PER_GROUP), hkv, bsz), threadgroup=(THREADS, 1, 1)))
