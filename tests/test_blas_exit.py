"""Processes that used MLX's CPU BLAS through tqstore exit promptly (tqstore._blas.quiesce)."""

import subprocess
import sys
import textwrap

import numpy as np

import mlx.core as mx
from tqstore import _blas

_CHILD = textwrap.dedent("""
    import tqstore, mlx.core as mx
    a = mx.random.normal((700, 700))
    mx.eval(a @ a)
    mx.async_eval(a @ a @ a)  # still queued when the interpreter starts to exit
""")


def test_blas_pool_stops_and_restarts_on_use(rng):
    a = rng.standard_normal((300, 300)).astype(np.float32)
    first = np.array(mx.array(a) @ mx.array(a))
    stopped = _blas.quiesce()
    assert stopped == (_blas.loaded_blas is not None and sys.platform.startswith("linux"))
    again = np.array(mx.array(a) @ mx.array(a))  # the pool starts again where it was stopped
    np.testing.assert_array_equal(first, again)


def test_processes_exit_promptly_after_cpu_work():
    for _ in range(5):
        res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr[-2000:]
