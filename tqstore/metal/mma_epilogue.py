"""The per-row decode epilogue inside the MMA step kernel: a layer's step in ONE launch.

Why: at B=1 on an H100 (docs/BENCHMARKS.md, "Where a B=1 step's time goes") a layer's step was
the step kernel (33 us at 32k) plus the per-row epilogue (tqstore.metal.batch_step, 15 us), a
second launch per layer for the host to build and encode and for the GPU to start. The
epilogue's work for one (sequence, kv head) is small (the tail's scores, a softmax over pages
and tail, the output rotation's G x DV x DV multiply-adds, the next tail's copy), and the
step kernel already has one threadgroup that holds the finished pages' output of exactly that
(sequence, kv head): the one that merges the split-K partials (tqstore.metal.mma_merge), or
the only one without split-K. Here that threadgroup goes on into the epilogue.

Contract: the step form's inputs (attention_mma.STEP_ATTN_INPUTS) followed by the per-row
epilogue's own (EPILOGUE_INPUTS below, as batch_step's module doc defines them: block-sized fp16
tail buffers, one new token per row in the model's dtype, tail_info (B, 2) = [n_old + 1,
n_old], the key center, the output rotation); its queries and scale serve both. Outputs: the
attention kernel's own (the work buffer, or out and lse without split-K: scratch now), then
EPILOGUE_OUTPUTS: the model's output (B, HQ, 1, DV) in its dtype and the next tails (B, HKV,
block_size, D) fp16, every element written. The epilogue's arithmetic is epilogue.epilogue_core,
the standalone per-row kernel's, so on one compiler both give the same bits for the same pages'
output (tests/metal/test_mma_emulated.py checks that on the emulator).

Memory: the epilogue's threadgroup arrays are carved out of the dequantization table's dynamic
shared memory (LUT_BYTES), dead once the pages are attended and merged: no more shared memory
per threadgroup, so the attention's occupancy is unchanged (attention_mma.LUT_BYTES). That room
also holds the tail's values (epilogue_core's ``stage_values``), read once instead of once per
chunk of output dims.

Measured (H100, docs/BENCHMARKS.md "One launch per layer"): graph building per step is lower
than with two launches; tokens/s showed no gain within the runs' noise. The merging
threadgroup does the epilogue's passes one after another, on the critical path of the
kernel's last threadgroup, where the standalone kernel spreads DV / DC chunks over as many
threadgroups. On an H200 (docs/BENCHMARKS.md, "The folded epilogue's loads") that path took
14.8 us at 32k and 21.0 us at 128k of a 44-81 us launch until its loads were batched and
gathered (epilogue_core) and its passes widened (merged_layout): 10.2 and 12.7 us.
"""

from __future__ import annotations

from tqstore.metal.epilogue import (DIMS_PER_GROUP, OUT_DTYPES, epilogue_core, epilogue_shared,
                                    shared_bytes)

EPILOGUE_INPUTS = ("tail_keys", "tail_values", "new_keys", "new_values", "tail_info",
                   "key_center", "output_rotation")
EPILOGUE_OUTPUTS = ("attn_out", "next_tail_keys", "next_tail_values")
# R's next pass of columns waits in registers (epilogue_core's rn_) through the current one,
# in a kernel capped at 128 registers a thread (attention_mma's launch bounds).
MAX_R_REGISTERS = 32


def step_epilogue_unsupported_reason(key_dim: int, value_dim: int, group: int,
                                     block_size: int, out_dtype: str,
                                     shared_limit: int) -> str | None:
    """None when the epilogue fits the step kernel for this shape (``shared_limit``: the bytes
    of its dequantization table), else why not (the step kernel and the standalone per-row
    epilogue then serve in two launches)."""
    if out_dtype not in OUT_DTYPES:
        return f"output dtype {out_dtype}"
    if value_dim % DIMS_PER_GROUP:
        return f"value_dim {value_dim} is not a multiple of {DIMS_PER_GROUP}"
    need = shared_bytes(key_dim, value_dim, group, block_size)
    if need > shared_limit:
        return (f"needs {need} bytes of the table's {shared_limit} (GQA group x head dims x "
                f"block size)")
    return None


def merged_layout(key_dim: int, value_dim: int, group: int, block_size: int,
                  shared_limit: int, threads: int) -> tuple[bool, int]:
    """(whether the tail's values are staged, output dims per pass) of the merging
    threadgroup's epilogue in the table's ``shared_limit`` bytes: the values where they fit,
    then the most whole chunks of DIMS_PER_GROUP per pass that divide DV, whose R columns
    (DV x width floats) fit beside the rest and whose next pass, held in registers while the
    current one is used, takes at most MAX_R_REGISTERS of each of the ``threads`` threads (one
    chunk per pass always qualifies where the epilogue fits at all). Why wider: the
    standalone kernel spreads DV / DC chunks over as many threadgroups; folded, one
    threadgroup does the passes one after another on the kernel's critical path, with G x
    width of its threads busy (128 of 256 at DC for Llama-3-8B's heads; two chunks per pass
    there: every thread busy, half the barriers). Each output is the same sum at any
    width."""
    values = shared_bytes(key_dim, value_dim, group, block_size, True) <= shared_limit
    chunks = value_dim // DIMS_PER_GROUP
    for k in range(chunks, 0, -1):
        width = k * DIMS_PER_GROUP
        fits = shared_bytes(key_dim, value_dim, group, block_size, values,
                            value_dim * width) <= shared_limit
        registers = -(-value_dim * width // threads)
        if chunks % k == 0 and fits and (registers <= MAX_R_REGISTERS or k == 1):
            return values, width
    raise ValueError(f"the epilogue does not fit {shared_limit} bytes (step_epilogue_"
                     f"unsupported_reason refuses this shape)")


def merged_epilogue(key_dim: int, value_dim: int, group: int, block_size: int,
                    shared_limit: int, threads: int) -> str:
    """Statements for the threadgroup that holds the merged pages' output of its (b, kvh) in
    ``out`` and ``lse`` (this launch's global buffers, written by its own threads): all of the
    threadgroup's NT threads reach them together. Every dim of the group's heads, in passes of
    merged_layout's width (the standalone kernel spreads DC-dim chunks over DV / DC
    threadgroups; each output is the same sum either way, so the bits are the same)."""
    values, width = merged_layout(key_dim, value_dim, group, block_size, shared_limit,
                                  threads)
    return f"""  TQ_BARRIER();  // out and lse are written; the table's shared memory is free
  {{  // the per-row epilogue of (b, kvh): tqstore.metal.mma_epilogue
{epilogue_shared(key_dim, value_dim, group, block_size, base="tq_lut", stage_values=values,
                 stage_floats=value_dim * width)}{
        epilogue_core(key_dim, block_size, True, pages_out="out",
                      pages_lse="lse[b * HQ + h0 + tq_tid]", out="attn_out", dims=("0", "DV"),
                      copy_tail="true", stage_values=values, width=str(width))}  }}
"""
