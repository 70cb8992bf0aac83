"""tqstore.metal.step_launch's resolution: once per shape, again after any kernel is disabled,
the separate rotation launch where the step form does not serve, and no launch (the general
path) where a kernel does not. The launches themselves run on a GPU only: there
tests/paged/test_shared_tail.py steps batches through them against each row alone, and
tests/metal/test_mma_emulated.py runs the step form's source on the CPU emulator. Here the GPU
backend is reported as CUDA, kernels are built but never run, and the self-checks' verdicts
stand as they are (selfcheck.disable is the real one)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from tqstore.metal import attention_kernel, batch_step, dispatch, selfcheck, step_launch
from tqstore.paged import CachePolicy, pool_for_model


# (dtype, rank) of each kernel input in these tests' steps (bf16 activations; the work buffer
# stands in for pages_lse where the output is packed).
INPUTS = dict(
    queries=(mx.bfloat16, 4), rotation=(mx.float32, 3), scale=(mx.float32, 1),
    key_codes=(mx.uint8, 4), key_scales=(mx.float16, 3), value_codes=(mx.uint8, 4),
    value_scales=(mx.float16, 3), block_tables=(mx.int32, 2), seq_lens=(mx.int32, 1),
    key_codebook=(mx.float32, 1), value_codebook=(mx.float32, 1), params=(mx.int32, 1),
    arrivals=(mx.int32, 1), after=(mx.float16, 4), pages_out=(mx.float32, 3),
    tail_keys=(mx.float16, 4),
    tail_values=(mx.float16, 4), new_keys=(mx.bfloat16, 4), new_values=(mx.bfloat16, 4),
    tail_info=(mx.int32, 2), key_center=(mx.float32, 2), output_rotation=(mx.float32, 3))


def _clear_kernel_caches() -> None:
    for cached in (attention_kernel.mma_attention_kernel, attention_kernel.attention_kernel,
                   attention_kernel.merge_kernel, batch_step.rotate_kernel,
                   batch_step.row_epilogue_kernel):
        cached.cache_clear()
    attention_kernel._PLANS.clear()
    step_launch._LAUNCHES.clear()
    selfcheck.reset()


@pytest.fixture
def cuda_reported(monkeypatch):
    built = []

    def builder(**spec):
        built.append(spec["name"])

        def run(inputs, output_shapes, output_dtypes, **_kwargs):
            # Resolution never runs a kernel (the self-checks are bypassed here); a launch's
            # call must pass one input per declared name, each of that name's dtype and rank
            # (a swapped pair of arguments fails here), and get its outputs' shapes.
            assert calls_allowed, "a kernel ran while launches were resolved"
            names = spec["input_names"]
            assert len(inputs) == len(names), spec["name"]
            for name, x in zip(names, inputs):
                if name in INPUTS:
                    assert (x.dtype, x.ndim) == INPUTS[name], (spec["name"], name)
            calls.append(spec["name"])
            return [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]
        return run

    calls: list[str] = []
    calls_allowed = False

    for module in (attention_kernel, dispatch, step_launch):
        monkeypatch.setattr(module, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(attention_kernel, "mma_capable", lambda: True)
    monkeypatch.setattr(mx.fast, "cuda_kernel", builder)
    monkeypatch.setattr(selfcheck, "usable",
                        lambda name, key, check: name not in selfcheck._disabled)
    _clear_kernel_caches()  # fake kernels must not outlive the test (nor real ones enter it)

    def allow_calls() -> list[str]:
        nonlocal calls_allowed
        calls_allowed = True
        return calls

    yield built, allow_calls
    _clear_kernel_caches()


def _arena_and_step(batch: int = 3):
    from tools.step_host_cost import small_llama

    pool = pool_for_model(small_llama(2), policy=CachePolicy.default(None),
                          budget_bytes=64 << 20)
    arena = next(a for a in pool.arenas if not a.dense)
    queries = mx.zeros((batch, 32, 1, 128), mx.bfloat16)
    tables = mx.zeros((batch, 256), mx.int32)
    return arena, queries, tables


def test_one_resolution_per_shape_and_a_new_one_after_a_disable(cuda_reported):
    built, _ = cuda_reported
    arena, queries, tables = _arena_and_step()
    first = step_launch.batch_step_launch(queries, arena, tables, 16)
    # The step form with the epilogue folded in: one launch.
    assert first is not None and first.rotate is None and first.epilogue is None
    assert first.packed and first.plan.nsplit > 1
    assert built == ["tq_attn_mma_split_k128_v128_bs16_h32x8_w8d1fs_ebfloat16"]
    assert step_launch.batch_step_launch(queries, arena, tables, 16) is first
    wider = step_launch.batch_step_launch(queries, arena, mx.zeros((3, 512), mx.int32), 16)
    assert wider is not first and wider is not None

    selfcheck.disable("cuda-kernel-mma-step-epilogue", "planted")
    two = step_launch.batch_step_launch(queries, arena, tables, 16)
    assert two is not first and two.rotate is None and two.epilogue is not None
    assert any(name.startswith("tq_attn_mma_split") and name.endswith("s")
               for name in built)  # the step form without the epilogue

    selfcheck.disable("cuda-kernel-mma-step", "planted")
    again = step_launch.batch_step_launch(queries, arena, tables, 16)
    assert again is not two and again.rotate is not None  # rotation, attention, epilogue
    assert again.plan is not first.plan

    selfcheck.disable("cuda-kernel-epilogue-rows", "planted")
    assert step_launch.batch_step_launch(queries, arena, tables, 16) is None

    selfcheck.reset()  # verdicts taken back wholesale: nothing resolved before is used
    fresh = step_launch.batch_step_launch(queries, arena, tables, 16)
    assert fresh is not None and fresh is not first and fresh.epilogue is None


@pytest.mark.parametrize("folded", [True, False], ids=["one-launch", "two-launches"])
def test_a_one_pass_launch_is_unpacked_and_each_launch_passes_every_input(
        cuda_reported, monkeypatch, folded):
    """One page: one split, so the step kernel's single pass (out, lse), arrivals unused, and
    (two launches) the epilogue that reads an unpacked lse; the split form packs. Calling
    either passes one input per declared name (argument lists and the kernels' names in
    step); folded, each is one launch of the step kernel with the epilogue."""
    _, allow_calls = cuda_reported
    monkeypatch.setattr(step_launch, "FOLD_EPILOGUE", folded)
    arena, queries, _ = _arena_and_step(batch=1)
    short = step_launch.batch_step_launch(queries, arena, mx.zeros((1, 1), mx.int32), 16)
    long = step_launch.batch_step_launch(queries, arena, mx.zeros((1, 2048), mx.int32), 16)
    assert short.plan.nsplit == 1 and not short.packed
    assert long.plan.nsplit > 1 and long.packed and long.plan.fused_rows > 0
    calls = allow_calls()
    for launch, width in ((short, 1), (long, 2048)):
        out, keys, values = launch(
            queries, 0.1, arena, mx.zeros((1, width), mx.int32), mx.ones((1,), mx.int32),
            mx.zeros((1, 8, 16, 128), mx.float16), mx.zeros((1, 8, 16, 128), mx.float16),
            mx.zeros((1, 8, 1, 128), mx.bfloat16), mx.zeros((1, 8, 1, 128), mx.bfloat16),
            mx.zeros((1, 2), mx.int32), mx.zeros((8,), mx.int32),
            mx.zeros((1, 8, 16, 128), mx.float16))  # after: the old tail keys' shape
        assert out.shape == (1, 32, 1, 128) and out.dtype == mx.bfloat16
        assert keys.shape == values.shape == (1, 8, 16, 128)
    if folded:
        assert calls == ["tq_attn_mma_single_k128_v128_bs16_h32x8_w8d1fs_ebfloat16",
                         "tq_attn_mma_split_k128_v128_bs16_h32x8_w8d1fs_ebfloat16"]
    else:
        assert [name.split("_k")[0] for name in calls] == [
            "tq_attn_mma_single", "tq_decode_epilogue_rows", "tq_attn_mma_split",
            "tq_decode_epilogue_rows_packed"]
    with pytest.raises(ValueError, match="arrival counters"):
        long(queries, 0.1, arena, mx.zeros((1, 2048), mx.int32), mx.ones((1,), mx.int32),
             mx.zeros((1, 8, 16, 128), mx.float16), mx.zeros((1, 8, 16, 128), mx.float16),
             mx.zeros((1, 8, 1, 128), mx.bfloat16), mx.zeros((1, 8, 1, 128), mx.bfloat16),
             mx.zeros((1, 2), mx.int32), mx.zeros((4,), mx.int32),
             mx.zeros((1, 8, 16, 128), mx.float16))


def test_no_launch_where_the_reference_is_forced_and_the_step_form_can_be_turned_off(
        cuda_reported, monkeypatch):  # noqa: ARG001 (the fixture reports CUDA)
    arena, queries, tables = _arena_and_step()
    monkeypatch.setattr(step_launch, "STEP_FORM", False)
    assert step_launch.batch_step_launch(queries, arena, tables, 16).rotate is not None
    dispatch.force_backend("reference")
    try:
        assert step_launch.batch_step_launch(queries, arena, tables, 16) is None
    finally:
        dispatch.force_backend(None)
