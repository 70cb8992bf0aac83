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


def test_a_c_function_is_given_a_bounded_time_on_a_thread_of_its_own():
    import ctypes
    libc = ctypes.CDLL(None)
    assert _blas._run_within(libc.getpid, 5.0) is True
    assert _blas._run_within(libc.pause, 0.2) is False  # blocks for good (that thread only)


_STUCK = textwrap.dedent("""
    import ctypes, sys
    import tqstore, mlx.core as mx
    from tqstore import _blas
    class Stuck:  # an OpenBLAS whose pool shutdown never returns (seen with 0.3.21)
        blas_thread_shutdown_ = ctypes.CDLL(None).pause
    _blas._library, _blas.SHUTDOWN_WAIT_S = Stuck(), 0.5
    _blas.exit_status = int(sys.argv[1]) if sys.argv[1] != "-" else None
    mx.eval(mx.random.normal((300, 300)) @ mx.random.normal((300, 300)))
    print("done", flush=True)
    if len(sys.argv) > 2:
        raise RuntimeError("uncaught")
""")


def test_an_exit_whose_blas_shutdown_hangs_ends_with_the_programs_status():
    """quiesce() runs the shutdown within SHUTDOWN_WAIT_S, then ends the process itself: with
    the CLI's recorded status, 1 after an uncaught exception, else 0 (on Linux, where the hook
    is registered; elsewhere the process just exits)."""
    for argv, want in ((["-"], 0), (["7"], 7), (["-", "raise"], 1)):
        res = subprocess.run([sys.executable, "-c", _STUCK, *argv], capture_output=True,
                             text=True, timeout=60)
        assert res.stdout == "done\n"
        assert res.returncode == want, (argv, res.returncode, res.stderr[-2000:])
