"""Kernels that cannot be tested here must not break a user: a self-check at first use.

Every kernel tqstore.metal.dispatch can run (the CUDA and Metal attention kernels, the decode
epilogue, the quantize kernel, and the C kernels of the CPU path) is checked the first time it
meets a new shape (head counts, head dims, bit widths, block size, dtype) against the pure-MLX
oracle, on small random inputs of that shape (a few milliseconds). A compile error, an
exception or a mismatch disables that kernel for the rest of the process, with one WARNING on
the "tqstore.metal" logger that names it and says why, and dispatch falls back (attention: the
tensor-core kernel to the portable one, then the reference; the others to the reference).

What "match" means is each kernel's own contract: attention within the float32 (or, for the
tensor-core kernel, fp16-operand) tolerances of TOLERANCE; the quantize kernels byte for byte
(codes and fp16 scales); the epilogue within its output dtype's rounding with the next fp16
tail bit-exact. The checks use their own NumPy generator: they never touch MLX's global RNG.

`kernel_report()` lists the verdicts (for logs, `tqstore inspect` and benchmarks); `reset()`
is for tests that plant a wrong kernel.
"""

from __future__ import annotations

import logging
import zlib
from typing import Callable

import mlx.core as mx
import numpy as np

log = logging.getLogger("tqstore.metal")

# Bounds against the fp32 oracle: (relative L2 of the output, max abs of the output, max abs
# error of the log-sum-exp). fp32 kernels (portable GPU, CPU) compute in float32 throughout;
# the tensor-core kernel rounds q, codebook values and p * value_norm to fp16 (as
# FlashAttention does): measured errors in docs/fragments/kernels.md, bounds ~2-3x the largest.
TOLERANCE = {"portable": (1e-4, 1e-3, 1e-4), "cpu": (1e-4, 1e-3, 1e-4),
             "mma": (3e-3, 5e-3, 3e-2)}
EPILOGUE_TOLERANCE = {mx.float16: 2e-3, mx.bfloat16: 1e-2, mx.float32: 1e-5}

_disabled: dict[str, str] = {}  # kernel name -> why it was disabled
_passed: dict[str, set[tuple]] = {}  # kernel name -> shape keys it passed
_epoch = 0  # bumped whenever a verdict is taken back: what was resolved under it is stale


def usable(name: str, key: tuple, check: Callable[[], str | None]) -> bool:
    """Whether kernel `name` may serve a call of shape `key`: runs `check` (None = match, else
    what is wrong) once per shape; a failure disables the kernel for every shape."""
    if name in _disabled:
        return False
    if key in _passed.get(name, ()):
        return True
    try:
        problem = check()
    except Exception as exc:  # noqa: BLE001 - a kernel that fails to build or run is disabled
        problem = f"{type(exc).__name__}: {str(exc)[:300]}"
    if problem is None:
        _passed.setdefault(name, set()).add(key)
        return True
    _disable(name, problem)
    log.warning("kernel %s failed its self-check at first use (%s); it is disabled for this "
                "process and the fallback serves", name, problem)
    return False


def is_disabled(name: str) -> bool:
    """Whether kernel `name` was disabled in this process (by a failed check or disable())."""
    return name in _disabled


def disable(name: str, reason: str) -> None:
    """Disable a kernel without a check (a build that is unavailable: no compiler, ...)."""
    if name not in _disabled:
        _disable(name, reason)
        log.warning("kernel %s is unavailable (%s); the fallback serves", name, reason)


def _disable(name: str, reason: str) -> None:
    global _epoch
    _disabled[name] = reason
    _epoch += 1


def epoch() -> int:
    """Changes whenever a kernel is disabled or the verdicts are reset: a caller that resolved
    launches under usable() (tqstore.metal.step_launch) resolves them again then."""
    return _epoch


def kernel_report() -> dict[str, str]:
    """{kernel name: 'ok (n shapes checked)' or 'disabled: why'} for every kernel met so far."""
    report = {name: f"ok ({len(keys)} shape{'s' if len(keys) != 1 else ''} checked)"
              for name, keys in _passed.items() if name not in _disabled}
    report.update({name: f"disabled: {why}" for name, why in _disabled.items()})
    return dict(sorted(report.items()))


def reset() -> None:
    global _epoch
    _disabled.clear()
    _passed.clear()
    _epoch += 1


# -- inputs and comparisons -------------------------------------------------------------------
def _rng(key: tuple) -> np.random.Generator:
    """Inputs fixed by the shape (a stable hash: str hashes vary per process)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def attention_inputs(key: tuple) -> dict:
    """Random pages for (Hq, Hkv, Dk, Dv, key_bits, value_bits, block_size): two sequences,
    one of 2 1/4 blocks over shuffled block ids and one of a single token."""
    hq, hkv, dk, dv, kb, vb, bs = key
    rng = _rng(key)
    lens = [2 * bs + max(1, bs // 4), 1]
    num_blocks = 6
    tables = np.array([[3, 1, 5], [2, 0, 0]], dtype=np.int32)

    def codes(d: int, bits: int) -> mx.array:
        return mx.array(rng.integers(0, 256, (num_blocks, hkv, bs, d * bits // 8), dtype=np.uint8))

    def scales() -> mx.array:
        return mx.array(rng.uniform(0.25, 3.0, (num_blocks, hkv, bs)).astype(np.float16))

    from tqstore.codec.codebook import lloyd_max_codebook
    return dict(queries=mx.array((rng.standard_normal((2, hq, dk)) * 2.0).astype(np.float32)),
                key_codes=codes(dk, kb), key_scales=scales(),
                value_codes=codes(dv, vb), value_scales=scales(),
                block_tables=mx.array(tables), seq_lens=mx.array(np.array(lens, dtype=np.int32)),
                key_codebook=mx.array(lloyd_max_codebook(dk, kb)),
                value_codebook=mx.array(lloyd_max_codebook(dv, vb)),
                key_bits=kb, value_bits=vb)


def compare_attention(got: tuple[mx.array, mx.array], want: tuple[mx.array, mx.array],
                      kind: str) -> str | None:
    """None if (out, lse) is within the kind's tolerance of the oracle's, else the errors."""
    out, lse = (x.astype(mx.float32) for x in got)
    ref, ref_lse = want
    err = mx.abs(out - ref)
    rel = float((mx.sqrt(mx.sum(err * err)) / mx.maximum(mx.sqrt(mx.sum(ref * ref)), 1e-30)).item())
    max_abs = float(mx.max(err).item())
    lse_err = float(mx.max(mx.abs(lse - ref_lse)).item())
    tol_rel, tol_abs, tol_lse = TOLERANCE[kind]
    if np.isfinite([rel, max_abs, lse_err]).all() and rel < tol_rel and max_abs < tol_abs \
            and lse_err < tol_lse:
        return None
    return (f"mismatch against the reference: rel L2 {rel:.2e} (bound {tol_rel:g}), max abs "
            f"{max_abs:.2e} ({tol_abs:g}), lse {lse_err:.2e} ({tol_lse:g})")


def check_attention(key: tuple, kind: str, run: Callable[[dict], tuple[mx.array, mx.array]]
                    ) -> str | None:
    """`run(inputs)` -> (out, lse) of the kernel, compared with the reference on the CPU (full
    float32: MLX's GPU matmul may round through TF32)."""
    from tqstore.metal.reference import paged_decode_attention_reference
    inputs = attention_inputs(key)
    got = run(inputs)
    mx.eval(got)
    with mx.stream(mx.cpu):
        want = paged_decode_attention_reference(**inputs, return_lse=True)
        mx.eval(want)
    return compare_attention(got, want, kind)


def check_step_attention(key: tuple, run: Callable[[dict], tuple[mx.array, mx.array]]
                         ) -> str | None:
    """The MMA kernel's step form (attention_mma.MmaGeometry.step) for key = (Hq, Hkv, Dk, Dv,
    key_bits, value_bits, block_size, queries' dtype): `run(inputs)` -> (out, lse) with
    attention_inputs' pages, the model's queries (2, Hq, 1, Dk) in that dtype, a rotation, the
    scale and zero arrival counters. Against the reference over the reference's rotated
    queries (the tensor-core tolerance); launched twice on the same counters: the same bits
    both times and the counters zero again (a kernel that does not reset them fails here)."""
    from tqstore.metal.reference import paged_decode_attention_reference, rotate_queries_reference
    hq, hkv, dk, dtype = key[0], key[1], key[2], key[-1]
    inputs = attention_inputs(key[:-1])
    rng = _rng(("step",) + key)
    queries = mx.array((rng.standard_normal((2, hq, 1, dk)) * 2.0).astype(np.float32)).astype(dtype)
    rotation = mx.array(np.linalg.qr(rng.standard_normal((hkv, dk, dk)))[0].astype(np.float32))
    from tqstore.small_arrays import padded_array
    arrivals = padded_array([0] * (2 * hkv))  # as shared_tail makes them
    x = dict(inputs, queries=queries, rotation=rotation, scale=dk ** -0.5, arrivals=arrivals)
    first, problem = _twice_on_the_same_counters(run, x)
    if problem:
        return problem
    with mx.stream(mx.cpu):
        rotated = rotate_queries_reference(queries, rotation, dk ** -0.5)
        want = paged_decode_attention_reference(**dict(inputs, queries=rotated), return_lse=True)
        mx.eval(want)
    return compare_attention(first, want, "mma")


def _twice_on_the_same_counters(run: Callable[[dict], tuple], x: dict
                                ) -> tuple[tuple, str | None]:
    """(The first launch's outputs, None), or a problem: a kernel that counts on the caller's
    arrival counters (x["arrivals"], zero) must give the same bits when launched again on them
    and leave them zero."""
    first = run(x)
    mx.eval(first)
    second = run(x)
    mx.eval(second)
    if not all(mx.array_equal(a, b).item() for a, b in zip(first, second)):
        return first, "a second launch on the same arrival counters gave other bits"
    if mx.any(x["arrivals"] != 0).item():
        return first, "the arrival counters were not zero again after a launch"
    return first, None


def check_step_epilogue(key: tuple, run: Callable[[dict], tuple[mx.array, mx.array, mx.array]]
                        ) -> str | None:
    """The step form with the per-row epilogue folded in (tqstore.metal.mma_epilogue) for key
    = check_step_attention's: `run(inputs)` -> (out, next tail keys, values, the pages' output
    and lse it read) with that check's inputs plus two rows of block-sized fp16 tails (one a
    token short of its block, one empty), the new tokens in the model's dtype, tail_info, a
    key center and an output rotation. Against the reference (rotate_queries_reference,
    paged_decode_attention_reference, then batched_epilogue_reference): the pages' output
    within the step form's own bounds (check_step_attention: the tail's weights would dilute
    an error of the pages in the output), the next tails bit-exact, the output within the
    tensor-core tolerance plus the output dtype's rounding; twice on the same counters, the
    same bits and the counters zero again."""
    from tqstore.metal.reference import (batched_epilogue_reference,
                                         paged_decode_attention_reference,
                                         rotate_queries_reference)
    from tqstore.small_arrays import padded_array
    hq, hkv, dk, dv, bs, dtype = key[0], key[1], key[2], key[3], key[6], key[-1]
    inputs = attention_inputs(key[:-1])
    rng = _rng(("step-epilogue",) + key)

    def normal(*shape, scale=1.0, dt=np.float32):
        return mx.array((rng.standard_normal(shape) * scale).astype(dt))

    x = dict(inputs, queries=normal(2, hq, 1, dk, scale=2.0).astype(dtype),
             rotation=mx.array(np.linalg.qr(rng.standard_normal((hkv, dk, dk)))[0]
                               .astype(np.float32)),
             scale=dk ** -0.5, arrivals=padded_array([0] * (2 * hkv)),
             tail_keys=normal(2, hkv, bs, dk, scale=2, dt=np.float16),
             tail_values=normal(2, hkv, bs, dv, scale=2, dt=np.float16),
             new_keys=normal(2, hkv, 1, dk, scale=2).astype(dtype),
             new_values=normal(2, hkv, 1, dv, scale=2).astype(dtype),
             tail_info=mx.array([[bs, bs - 1], [1, 0]], dtype=mx.int32),
             key_center=normal(hkv, dk),
             output_rotation=mx.array(np.linalg.qr(rng.standard_normal((hkv, dv, dv)))[0]
                                      .astype(np.float32)))
    first, problem = _twice_on_the_same_counters(run, x)
    if problem:
        return problem
    with mx.stream(mx.cpu):
        rotated = rotate_queries_reference(x["queries"], x["rotation"], x["scale"])
        pages = paged_decode_attention_reference(**dict(inputs, queries=rotated),
                                                 return_lse=True)
        want = batched_epilogue_reference(
            *pages, x["queries"], x["scale"], *(x[k] for k in (
                "tail_keys", "tail_values", "new_keys", "new_values", "tail_info",
                "key_center", "output_rotation")))
        mx.eval(want)
    problem = compare_attention(first[3:], pages, "mma")
    if problem:
        return f"the pages' output: {problem}"
    tails_exact = all(a.shape == w.shape and bool(mx.array_equal(a, w).item())
                      for a, w in zip(first[1:3], want[1:]))
    out, ref = first[0].astype(mx.float32), want[0].astype(mx.float32)
    err = mx.abs(out - ref)
    rel = float((mx.sqrt(mx.sum(err * err)) / mx.sqrt(mx.sum(ref * ref))).item())
    worst = float((mx.max(err) / mx.max(mx.abs(ref))).item())
    tol_rel, tol_abs, _ = TOLERANCE["mma"]
    # Twice the output dtype's unit roundoff (the kernel and the reference each round once);
    # EPILOGUE_TOLERANCE's looser bounds would let a 2% error of the epilogue pass in bf16.
    rounding = {mx.float16: 2.0 ** -10, mx.bfloat16: 2.0 ** -7}.get(dtype, 2.0 ** -20)
    if (tails_exact and out.shape == ref.shape and np.isfinite([rel, worst]).all()
            and rel < tol_rel + rounding and worst < tol_abs + rounding):
        return None
    return (f"mismatch against the reference: rel L2 {rel:.2e} (bound {tol_rel + rounding:g}), "
            f"max {worst:.2e} of the largest ({tol_abs + rounding:g}), next tails "
            f"{'exact' if tails_exact else 'differ'}")


def decode_step_inputs(key: tuple) -> dict:
    """attention_inputs for one sequence plus what a decode step adds: unscaled queries, an
    orthogonal query and output rotation per kv head, a key center and an fp16 tail."""
    hq, hkv, dk, dv, kb, vb, bs = key
    pages = attention_inputs(key)
    rng = _rng(("step",) + key)
    pages["block_tables"], pages["seq_lens"] = pages["block_tables"][:1], pages["seq_lens"][:1]
    n = max(1, bs // 2)

    def rotation(d: int) -> mx.array:
        return mx.array(np.linalg.qr(rng.standard_normal((hkv, d, d)))[0].astype(np.float32))

    pages.update(
        queries=mx.array(rng.standard_normal((1, hq, dk)).astype(np.float32)),
        scale=dk ** -0.5, query_rotation=rotation(dk), output_rotation=rotation(dv),
        key_center=mx.array(rng.standard_normal((hkv, dk)).astype(np.float32)),
        tail_keys=mx.array((rng.standard_normal((1, hkv, n, dk)) * 2).astype(np.float16)),
        tail_values=mx.array((rng.standard_normal((1, hkv, n, dv)) * 2).astype(np.float16)))
    return pages


def decode_step_reference(x: dict) -> mx.array:
    """The composition a fused decode step must equal: query preparation, attention over the
    pages, the epilogue (tqstore.metal.reference)."""
    from tqstore.metal.reference import (decode_epilogue_reference,
                                         paged_decode_attention_reference)
    B, Hq, Dk = x["queries"].shape
    Hkv = x["query_rotation"].shape[0]
    q = x["queries"].astype(mx.float32) * x["scale"]
    q_rot = mx.matmul(q.reshape(B, Hkv, Hq // Hkv, Dk), x["query_rotation"]).reshape(B, Hq, Dk)
    out, lse = paged_decode_attention_reference(
        q_rot, x["key_codes"], x["key_scales"], x["value_codes"], x["value_scales"],
        x["block_tables"], x["seq_lens"], x["key_codebook"], x["value_codebook"],
        x["key_bits"], x["value_bits"], return_lse=True)
    if x["tail_keys"] is None:
        return mx.matmul(out.reshape(B, Hkv, Hq // Hkv, -1), x["output_rotation"]).reshape(B, Hq, -1)
    return decode_epilogue_reference(out, lse, q, x["tail_keys"], x["tail_values"], None, None,
                                     x["key_center"], x["output_rotation"], mx.float32)[0]


def check_decode_step(key: tuple, run: Callable[[dict], mx.array | None]) -> str | None:
    x = decode_step_inputs(key)
    got = run(x)
    if got is None:
        return "the kernel declined a shape it was chosen for"
    with mx.stream(mx.cpu):
        want = decode_step_reference(x)
        mx.eval(want)
    err = mx.abs(got - want)
    rel = float((mx.sqrt(mx.sum(err * err)) / mx.sqrt(mx.sum(want * want))).item())
    max_abs = float(mx.max(err).item())
    tol_rel, tol_abs, _ = TOLERANCE["cpu"]
    if np.isfinite([rel, max_abs]).all() and rel < tol_rel and max_abs < tol_abs:
        return None
    return (f"mismatch against the reference: rel L2 {rel:.2e} (bound {tol_rel:g}), max abs "
            f"{max_abs:.2e} ({tol_abs:g})")


def check_epilogue(key: tuple, run: Callable[..., tuple | None]) -> str | None:
    """`run(**inputs)` -> (out, next tail keys, values) against decode_epilogue_reference: the
    output within its dtype's rounding, the next tail bit-exact."""
    from tqstore.metal.reference import decode_epilogue_reference
    dk, dv, hq, hkv, bs, out_dtype = key
    rng = _rng(key)
    n_old = max(1, bs // 2 - 1)

    def f16(*shape):
        return mx.array((rng.standard_normal(shape) * 2).astype(np.float16))

    rot = np.linalg.qr(rng.standard_normal((hkv, dv, dv)))[0].astype(np.float32)
    x = dict(pages_out=mx.array(rng.standard_normal((1, hq, dv)).astype(np.float32)),
             pages_lse=mx.array((rng.standard_normal((1, hq)) * 3 + 4).astype(np.float32)),
             queries=mx.array((rng.standard_normal((1, hq, dk)) * dk ** -0.5).astype(np.float32)),
             tail_keys=f16(1, hkv, n_old, dk), tail_values=f16(1, hkv, n_old, dv),
             new_keys=f16(1, hkv, 1, dk), new_values=f16(1, hkv, 1, dv),
             key_center=mx.array(rng.standard_normal((hkv, dk)).astype(np.float32)),
             output_rotation=mx.array(rot))
    got = run(x, n_old, bs, out_dtype)
    if got is None:
        return "the kernel declined a shape it was chosen for"
    with mx.stream(mx.cpu):
        want = decode_epilogue_reference(**x, out_dtype=mx.float32)
        mx.eval(want)
    err = float((mx.max(mx.abs(got[0].astype(mx.float32) - want[0]))
                 / mx.max(mx.abs(want[0]))).item())
    tail_exact = all(bool(mx.array_equal(a, b).item()) for a, b in zip(got[1:], want[1:]))
    tol = EPILOGUE_TOLERANCE.get(out_dtype, 1e-5)
    if err < tol and tail_exact:
        return None
    return (f"mismatch against the reference: max rel {err:.2e} (bound {tol:g}), next tail "
            f"{'exact' if tail_exact else 'differs'}")


def check_batched_epilogue(key: tuple, run: Callable[[dict], tuple | None]) -> str | None:
    """The batched epilogue (tqstore.metal.batch_step) for key = (Dk, Dv, Hq, Hkv, block size,
    the model's dtype, packed): `run(inputs)` -> (out, next tails) against
    batched_epilogue_reference on three rows (an empty tail, a half-full one, one a token short
    of its block): outputs within their dtype's rounding, the next tails (zeros past each row's
    tokens included) bit-exact."""
    from tqstore.metal.reference import batched_epilogue_reference
    dk, dv, hq, hkv, bs, dtype, packed = key
    rng = _rng(("rows",) + key)
    lengths = [0, max(1, bs // 2 - 1), bs - 1]
    b = len(lengths)

    def normal(*shape, scale=1.0, dt=np.float32):
        return mx.array((rng.standard_normal(shape) * scale).astype(dt))

    out = rng.standard_normal((b, hq, dv)).astype(np.float32)
    lse = (rng.standard_normal((b, hq)) * 3 + 4).astype(np.float32)
    if packed:  # the split attention kernel's work buffer: B rows of output, then the lse
        rows = -(-(b * hq) // (hq * dv))
        tail = np.zeros(rows * hq * dv, np.float32)
        tail[:b * hq] = lse.ravel()
        pages, pages_lse = mx.array(np.concatenate([out.ravel(), tail]).reshape(-1, hq, dv)), None
    else:
        pages, pages_lse = mx.array(out), mx.array(lse)
    rot = np.linalg.qr(rng.standard_normal((hkv, dv, dv)))[0].astype(np.float32)
    x = dict(pages_out=pages, pages_lse=pages_lse,
             queries=normal(b, hq, 1, dk).astype(dtype), scale=dk ** -0.5,
             tail_keys=normal(b, hkv, bs, dk, scale=2, dt=np.float16),
             tail_values=normal(b, hkv, bs, dv, scale=2, dt=np.float16),
             new_keys=normal(b, hkv, 1, dk, scale=2).astype(dtype),
             new_values=normal(b, hkv, 1, dv, scale=2).astype(dtype),
             tail_info=mx.array([[n + 1, n] for n in lengths], dtype=mx.int32),
             key_center=normal(hkv, dk), output_rotation=mx.array(rot))
    got = run(x)
    if got is None:
        return "the kernel declined a shape it was chosen for"
    with mx.stream(mx.cpu):
        want = batched_epilogue_reference(**x)
        mx.eval(want)
    err = float((mx.max(mx.abs(got[0].astype(mx.float32) - want[0].astype(mx.float32)))
                 / mx.max(mx.abs(want[0].astype(mx.float32)))).item())
    tail_exact = all(a.shape == w.shape and bool(mx.array_equal(a, w).item())
                     for a, w in zip(got[1:], want[1:]))
    tol = 2 * EPILOGUE_TOLERANCE.get(dtype, 1e-5)  # both round to the dtype
    if err < tol and tail_exact and got[0].shape == want[0].shape:
        return None
    return (f"mismatch against the reference: max rel {err:.2e} (bound {tol:g}), next tails "
            f"{'exact' if tail_exact else 'differ'}")


def check_rotate_queries(key: tuple, run: Callable[[mx.array, mx.array, float], mx.array | None]
                         ) -> str | None:
    """The query rotation kernel for key = (Dk, Hq, Hkv, dtype) against
    rotate_queries_reference in float32 (sums of Dk products: ~1e-6 relative)."""
    from tqstore.metal.reference import rotate_queries_reference
    dk, hq, hkv, dtype = key
    rng = _rng(("rotate",) + key)
    queries = mx.array(rng.standard_normal((3, hq, 1, dk)).astype(np.float32)).astype(dtype)
    rotation = mx.array(np.linalg.qr(rng.standard_normal((hkv, dk, dk)))[0].astype(np.float32))
    got = run(queries, rotation, dk ** -0.5)
    if got is None:
        return "the kernel declined a shape it was chosen for"
    with mx.stream(mx.cpu):
        want = rotate_queries_reference(queries, rotation, dk ** -0.5)
        mx.eval(want)
    err = float((mx.max(mx.abs(got - want)) / mx.max(mx.abs(want))).item())
    return None if err < 1e-5 and got.shape == want.shape else f"max rel error {err:.2e} over 1e-05"


def check_multi_token(key: tuple, run: Callable[..., mx.array | None]) -> str | None:
    """A multi-token attention path against MLX's scaled_dot_product_attention in float32 for
    key = (Hq, Hkv, D, Dv, mask kind: none, causal, array-bool, array-additive): a 7-token step
    over 19 tokens, random inputs."""
    hq, hkv, d, dv, kind = key
    rng = _rng(key)
    L, T = 7, 19
    q, k, v = (mx.array(rng.standard_normal(shape).astype(np.float32))
               for shape in ((1, hq, L, d), (1, hkv, T, d), (1, hkv, T, dv)))
    allowed = mx.array(rng.random((L, T)) < 0.7) | mx.eye(L, T, k=T - L, dtype=mx.bool_)
    mask = {"none": None, "causal": "causal", "array-bool": allowed,
            "array-additive": mx.where(allowed, 0.0, -mx.inf)}[kind]
    scale = 1.0 / np.sqrt(d)
    got = run(q, k, v, scale, mask)
    if got is None:
        return "declined a shape it was chosen for"
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    err = float(mx.abs(got - want).max().item())
    return None if err <= 1e-5 else f"max abs error {err:.3g} over 1e-05"


def check_dequantize(codec, run: Callable) -> str | None:
    """A dequantize kernel gives codec.dequantize_rotated's very bytes on random vectors."""
    rng = _rng(("dequantize", codec.bits, codec.head_dim))
    x = mx.array(rng.standard_normal((codec.num_heads, 37, codec.head_dim)).astype(np.float32))
    q = codec.quantize(x)
    got = run(codec, q)
    if got is None:
        return "declined a shape it was chosen for"
    want = codec.dequantize_rotated(q)
    if got.shape != want.shape or not np.array_equal(np.array(got), np.array(want)):
        return "dequantized values differ from the codec's"
    return None
