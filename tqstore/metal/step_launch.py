"""A shared-tail decode step's GPU launches, resolved once per shape, and in ONE launch per
layer where the tensor-core kernel fits.

Why: on an H100 a decode step of Llama-3-8B shape is bound by the host (docs/BENCHMARKS.md,
"Shared tails and three launches per layer"): every op costs host time to build and again to
launch, whatever its size. Two things are cut here.
- Decisions made again at every layer and step: which GPU backend, the self-check verdicts of
  each kernel, the attention's launch plan, whether each kernel's shape fits, its grid. With
  the kernels stubbed (tools/step_host_cost.py --profile, CPU VM) they were the largest part
  of the attention's graph building. Here they are made once per shape and kept.
- Launches: the MMA kernel's step form (attention_mma.MmaGeometry.step) reads the model's
  queries and folds in their scale and rotation (no rotation launch), and takes its split-K
  arrival counters from the caller, who keeps them per layer with the batch's tails
  (shared_tail.SharedTail; the merging threadgroups zero them again), so its work buffer needs
  no zero-fill launch; and the per-row epilogue runs inside it, in the threadgroup that
  finishes each (sequence, kv head) (tqstore.metal.mma_epilogue). A layer's step is then one
  launch. Where the folded epilogue does not fit or fails its self-check: the step kernel and
  the per-row epilogue; elsewhere (other bit widths, Metal, the step form disabled by its
  self-check) the rotation, attention and epilogue launches, all still resolved once.

Validity: a launch is keyed by every shape it depends on, the forced mode of dispatch and
selfcheck.epoch(), which changes whenever a kernel is disabled or the verdicts are reset; a
stale one is never used. The kernels, their self-checks and their references are dispatch's
and selfcheck's; where a kernel does not serve, there is no launch and the caller takes the
general path, which falls back kernel by kernel.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from tqstore.metal import dispatch, selfcheck
from tqstore.metal.attention_kernel import (STEP_INPUT_DTYPES, STEP_VARIANT, LaunchPlan,
                                            as_dtype, gpu_backend, kernel_kind,
                                            launch_step_epilogue, launch_plan,
                                            launch_step_plan, run_plan, run_step_plan,
                                            step_epilogue_variant, step_inputs)
from tqstore.metal.attention_mma import LUT_BYTES
from tqstore.metal.batch_step import (KernelLaunch, rotate_launch, row_epilogue_launch,
                                      scale_array)
from tqstore.metal.epilogue import out_dtype_name
from tqstore.metal.mma_epilogue import step_epilogue_unsupported_reason
from tqstore.metal.reference import unpack_pages
from tqstore.small_arrays import padded_array

# A layer's pages: tqstore.paged.arenas.TurboQuantArena (not imported: the kernel layer never
# depends on the paged cache, tests/test_layering.py).
Arena = Any


class BatchStepLaunch:
    """The launches of one step shape: the MMA kernel's step form with the per-row epilogue
    folded in (``plan`` a step_epilogue_variant plan; ``rotate`` and ``epilogue`` None: one
    launch), the step form (the queries' rotation folded in, the caller's arrival counters:
    ``plan`` a STEP_VARIANT plan, ``rotate`` None) and the per-row epilogue, or the rotation,
    attention and epilogue launches. ``tail_shape``: the tails' (B, Hkv, block_size, Dk)."""

    __slots__ = ("rotate", "plan", "epilogue", "packed", "tail_shape")

    def __init__(self, rotate: KernelLaunch | None, plan: LaunchPlan,
                 epilogue: KernelLaunch | None, packed: bool,
                 tail_shape: tuple[int, int, int, int]) -> None:
        self.rotate, self.plan, self.epilogue, self.packed = rotate, plan, epilogue, packed
        self.tail_shape = tail_shape

    @property
    def counts_arrivals(self) -> bool:
        """Whether a call counts on its ``arrivals`` (the step form) or never reads them."""
        return self.rotate is None

    def __call__(self, queries: mx.array, scale: float, arena: Arena,
                 block_tables: mx.array, seq_lens: mx.array, tail_keys: mx.array,
                 tail_values: mx.array, new_keys: mx.array, new_values: mx.array,
                 tail_info: mx.array, arrivals: mx.array,
                 after: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """shared_tail.shared_tail_attend's launches: (out (B, Hq, 1, Dv) in the queries'
        dtype, the next tail keys, values). The tails must be block-sized buffers
        (shared_tail.old_tails makes them so; the epilogue's launch was resolved for that).

        ``arrivals``: int32 (>= B * Hkv,) counters, all zero; the step form counts on them and
        leaves them zero. No two launches on one array may run at once, and MLX orders GPU
        work only through the arrays a kernel writes, which these are not. ``after`` is
        passed as the step kernel's unread input: an array computed after every launch that
        counted on these counters before (shared_tail.SharedTail.edge: a previous step's tail
        keys, the output of its epilogue, which ran after its step kernel). That data edge
        orders the launches even within one CUDA graph."""
        s = scale_array(scale)
        kc, vc = arena.key_codec, arena.value_codec
        if self.rotate is None:
            # The arena's arrays are in the kernel's dtypes (checked once: _step_form_inputs);
            # the tables and lengths are the caller's, int32 from every caller in tqstore.
            p = self.plan
            step_inputs = [
                queries, arena.query_rotation, s, arena.key_codes, arena.key_scales,
                arena.value_codes, arena.value_scales, as_dtype(block_tables, mx.int32),
                as_dtype(seq_lens, mx.int32), kc.codebook, vc.codebook, p.params, arrivals,
                after]
            if self.epilogue is None:  # one launch: the epilogue folded in
                out, next_keys, next_values, *_ = launch_step_epilogue(p, step_inputs + [
                    tail_keys, tail_values, new_keys, new_values, tail_info, arena.key_center,
                    arena.output_rotation], queries.dtype, self.tail_shape)
                return out, next_keys, next_values
            pages_out, lse = launch_step_plan(p, step_inputs)
        else:
            (q_rot,) = self.rotate([queries, arena.query_rotation, s])
            pages_out, lse = run_plan(self.plan, q_rot, arena.key_codes, arena.key_scales,
                                      arena.value_codes, arena.value_scales, block_tables,
                                      seq_lens, kc.codebook, vc.codebook, True, self.packed)
        out, next_keys, next_values = self.epilogue(
            [pages_out, pages_out if lse is None else lse, queries, s, tail_keys, tail_values,
             new_keys, new_values, tail_info, arena.key_center, arena.output_rotation])
        return out, next_keys, next_values


_LAUNCHES: dict[tuple, BatchStepLaunch | None] = {}
# Whether the MMA kernel's step form serves where it fits (benchmarks' A/B: False = the
# separate rotation launch and the zero-filled work buffer).
STEP_FORM = True
# Whether the step form folds the per-row epilogue in where it fits (benchmarks' A/B: False =
# the step kernel and the per-row epilogue, two launches per layer).
FOLD_EPILOGUE = True


def batch_step_launch(queries: mx.array, arena: Arena, block_tables: mx.array,
                      block_size: int) -> BatchStepLaunch | None:
    """The resolved launches for a step of queries (B, Hq, 1, Dk) over ``arena`` with block
    tables of this width, or None where a kernel does not serve (the general path then)."""
    kc, vc = arena.key_codec, arena.value_codec
    key = (queries.shape, queries.dtype, block_tables.shape, arena.key_codes.shape,
           arena.value_codes.shape, kc.bits, vc.bits, block_size, selfcheck.epoch(),
           dispatch.forced_mode(), STEP_FORM, FOLD_EPILOGUE)
    try:
        return _LAUNCHES[key]
    except KeyError:
        pass
    launch = _resolve(queries, arena, block_tables, block_size)
    if len(_LAUNCHES) > 256:  # widths grow with context: keep the dict bounded
        _LAUNCHES.clear()
    # The key's epoch is read before resolving: a kernel disabled by the self-checks just
    # run bumps it, so this entry is never found again and the next call resolves anew.
    _LAUNCHES[key] = launch
    return launch


def _resolve(queries: mx.array, arena: Arena, block_tables: mx.array,
             block_size: int) -> BatchStepLaunch | None:
    gpu = gpu_backend()
    if gpu is None or dispatch.forced_mode() == "reference":
        return None
    bsz, _, _, dk = queries.shape
    kc, vc, rows = arena.key_codec, arena.value_codec, arena.output_rotation
    tail_shape = (bsz, rows.shape[0], block_size, dk)
    if STEP_FORM and FOLD_EPILOGUE and _step_form_inputs(arena):
        folded = step_epilogue_plan(gpu, queries, arena, block_tables, block_size)
        if folded is not None:
            dispatch.announce(f"{gpu}-kernel-mma-step-epilogue",
                              "a batched decode step's launch (resolved once)")
            return BatchStepLaunch(None, folded, None, folded.fused_rows > 0, tail_shape)
    rotate = None
    plan = step_attention_plan(gpu, queries, arena.key_codes, arena.value_codes, block_tables,
                               kc.bits, vc.bits) if STEP_FORM and _step_form_inputs(arena) else None
    if plan is None:  # the separate rotation launch
        rotation = arena.query_rotation
        if not dispatch.rotate_usable(gpu, queries, rotation):
            return None
        rotate = rotate_launch(gpu, queries.shape, queries.dtype, rotation.shape)
        plan = dispatch.gpu_attention_plan(gpu, _rotated_shape(queries), arena.key_codes,
                                           arena.value_codes, block_tables, kc.bits, vc.bits)
        if rotate is None or plan is None:
            return None
    packed = plan.fused_rows > 0  # the split launch answers (work buffer, None) then
    if not dispatch.batched_epilogue_usable(gpu, queries, rows, block_size, packed):
        return None
    epilogue = row_epilogue_launch(gpu, queries.shape, queries.dtype, tail_shape, rows.shape,
                                   block_size, packed)
    if epilogue is None:
        return None
    names = ([f"{gpu}-kernel-mma-step"] if rotate is None
             else [f"{gpu}-kernel-rotate-queries", plan.kind]) + [f"{gpu}-kernel-epilogue-rows"]
    dispatch.announce(" + ".join(names), "a batched decode step's launches (resolved once)")
    return BatchStepLaunch(rotate, plan, epilogue, packed, tail_shape)


def _step_form_inputs(arena: Arena) -> bool:
    """Whether the arena's arrays are in the step form's input dtypes
    (attention_kernel.STEP_INPUT_DTYPES), so a call passes them as they are. Every arena of
    the paged cache makes them in these dtypes (tqstore.paged.arenas.TurboQuantArena): one
    check when a shape's launches are resolved covers every call that finds them."""
    kc, vc = arena.key_codec, arena.value_codec
    arrays = (None, arena.query_rotation, None, None, arena.key_scales, None, arena.value_scales,
              None, None, kc.codebook, vc.codebook, None, None, None)
    return all(a is None or a.dtype == want for a, want in zip(arrays, STEP_INPUT_DTYPES))


def _rotated_shape(queries: mx.array) -> mx.array:
    """An array of the rotated queries' shape (B, Hq, Dk): all a launch plan reads of them.
    Lazy and never evaluated."""
    bsz, hq, _, dk = queries.shape
    return mx.zeros((bsz, hq, dk), mx.float32)


def step_attention_plan(gpu: str, queries: mx.array, key_codes: mx.array,
                        value_codes: mx.array, block_tables: mx.array, key_bits: int,
                        value_bits: int) -> LaunchPlan | None:
    """The launch plan of the MMA kernel's step form (attention_kernel.STEP_VARIANT: the
    queries' scale and rotation folded in, the caller's arrival counters) for the model's
    queries (B, Hq, 1, Dk), or None where it does not fit or failed its self-check (the
    separate rotation and attention launches serve then)."""
    rotated = _rotated_shape(queries)
    if gpu != "cuda" or kernel_kind(rotated, key_codes, value_codes, key_bits, value_bits,
                                    gpu) != "mma":
        return None
    name = f"{gpu}-kernel-mma-step"
    shape = dispatch.attention_shape(rotated, key_codes, value_codes, key_bits, value_bits) + (
        queries.dtype,)

    def run(x: dict, splits: int) -> tuple[mx.array, mx.array]:
        b, h, _, d = x["queries"].shape
        p = launch_plan(mx.zeros((b, h, d)), x["key_codes"], x["value_codes"],
                        x["block_tables"], key_bits, value_bits, num_splits=splits,
                        backend=gpu, variant=STEP_VARIANT)
        got = run_step_plan(p, x["queries"], x["rotation"], padded_array([x["scale"]],
                                                                          mx.float32),
                            *(x[k] for k in dispatch.PAGE_KEYS[1:]), x["arrivals"],
                            x["arrivals"])  # `after`: any array
        return unpack_pages(*got, b, h)

    def check() -> str | None:
        return dispatch.check_both_launches(
            lambda splits: selfcheck.check_step_attention(shape, lambda x: run(x, splits)))

    if not selfcheck.usable(name, shape, check):
        return None
    return launch_plan(rotated, key_codes, value_codes, block_tables, key_bits, value_bits,
                       backend=gpu, variant=STEP_VARIANT)


def step_epilogue_plan(gpu: str, queries: mx.array, arena: Arena, block_tables: mx.array,
                       block_size: int) -> LaunchPlan | None:
    """The launch plan of the step form with the per-row epilogue folded in
    (attention_kernel.step_epilogue_variant) for the model's queries (B, Hq, 1, Dk) over
    ``arena``, or None where it does not fit or failed its self-check."""
    kc, vc, rows = arena.key_codec, arena.value_codec, arena.output_rotation
    rotated = _rotated_shape(queries)
    name = out_dtype_name(queries.dtype)
    _, hq, _, dk = queries.shape
    hkv, dv = rows.shape[0], rows.shape[-1]
    if (gpu != "cuda" or name is None or arena.key_codes.shape[2] != block_size
            or kernel_kind(rotated, arena.key_codes, arena.value_codes, kc.bits, vc.bits,
                           gpu) != "mma"
            or step_epilogue_unsupported_reason(dk, dv, hq // hkv, block_size, name,
                                                LUT_BYTES)):
        return None
    variant = step_epilogue_variant(name)
    shape = dispatch.attention_shape(rotated, arena.key_codes, arena.value_codes, kc.bits,
                                     vc.bits) + (queries.dtype,)

    def run(x: dict, splits: int) -> tuple[mx.array, ...]:
        b, h, _, d = x["queries"].shape
        p = launch_plan(mx.zeros((b, h, d)), x["key_codes"], x["value_codes"],
                        x["block_tables"], kc.bits, vc.bits, num_splits=splits, backend=gpu,
                        variant=variant)
        out, next_keys, next_values, *pages = launch_step_epilogue(p, step_inputs(
            p, x["queries"], x["rotation"], scale_array(x["scale"]),
            *(x[k] for k in dispatch.PAGE_KEYS[1:]), x["arrivals"],
            x["arrivals"]) + [  # `after`: any array
            x[k] for k in ("tail_keys", "tail_values", "new_keys", "new_values", "tail_info",
                           "key_center", "output_rotation")],
            x["queries"].dtype, x["tail_keys"].shape)
        # The pages' output too (the scratch the epilogue read), checked on its own.
        pages_out, lse = unpack_pages(pages[0], pages[1] if len(pages) > 1 else None, b, h)
        return out, next_keys, next_values, pages_out, lse

    def check() -> str | None:
        return dispatch.check_both_launches(
            lambda splits: selfcheck.check_step_epilogue(shape, lambda x: run(x, splits)))

    if not selfcheck.usable(f"{gpu}-kernel-mma-step-epilogue", shape, check):
        return None
    return launch_plan(rotated, arena.key_codes, arena.value_codes, block_tables, kc.bits,
                       vc.bits, backend=gpu, variant=variant)
