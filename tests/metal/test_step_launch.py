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

        def run(**_kwargs):
            raise AssertionError("a kernel ran while launches were resolved")
        return run

    for module in (attention_kernel, dispatch, step_launch):
        monkeypatch.setattr(module, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(attention_kernel, "mma_capable", lambda: True)
    monkeypatch.setattr(mx.fast, "cuda_kernel", builder)
    monkeypatch.setattr(selfcheck, "usable",
                        lambda name, key, check: name not in selfcheck._disabled)
    _clear_kernel_caches()  # fake kernels must not outlive the test (nor real ones enter it)
    yield built
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
    arena, queries, tables = _arena_and_step()
    first = step_launch.batch_step_launch(queries, arena, tables, 16)
    assert first is not None and first.rotate is None  # the step form: two launches
    assert first.packed and first.plan.nsplit > 1
    assert any(name.startswith("tq_attn_mma_split") and name.endswith("s")
               for name in cuda_reported)
    assert step_launch.batch_step_launch(queries, arena, tables, 16) is first
    wider = step_launch.batch_step_launch(queries, arena, mx.zeros((3, 512), mx.int32), 16)
    assert wider is not first and wider is not None

    selfcheck.disable("cuda-kernel-mma-step", "planted")
    again = step_launch.batch_step_launch(queries, arena, tables, 16)
    assert again is not first and again.rotate is not None  # rotation, attention, epilogue
    assert again.plan is not first.plan

    selfcheck.disable("cuda-kernel-epilogue-rows", "planted")
    assert step_launch.batch_step_launch(queries, arena, tables, 16) is None


def test_no_launch_where_the_reference_is_forced_and_the_step_form_can_be_turned_off(
        cuda_reported, monkeypatch):
    arena, queries, tables = _arena_and_step()
    monkeypatch.setattr(step_launch, "STEP_FORM", False)
    assert step_launch.batch_step_launch(queries, arena, tables, 16).rotate is not None
    dispatch.force_backend("reference")
    try:
        assert step_launch.batch_step_launch(queries, arena, tables, 16) is None
    finally:
        dispatch.force_backend(None)
