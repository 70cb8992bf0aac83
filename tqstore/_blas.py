"""Load Debian's OpenBLAS before MLX on Linux.

The `mlx[cpu]` wheel links a reference BLAS: fp32 matmul ran at ~5.5 GFLOP/s here, and SmolLM2
prefill 15-25x slower than with OpenBLAS loaded first into the global symbol namespace
(measured, ../shared/notes/platform.md). This only helps if it runs before `import mlx`; it is a
no-op elsewhere, when MLX is already loaded, or when OpenBLAS is not installed.

Exit: OpenBLAS (pthread build) joins its worker threads in a library destructor at process exit
(`blas_thread_shutdown_` from `_dl_fini`). That join runs after Python has finalized, while MLX's
CPU stream thread may still be inside a BLAS call, and it was seen to hang there (OpenBLAS's own
tracker has several such exit races). So an atexit hook first waits for MLX's CPU stream to
drain, then shuts the pool down while every worker is idle; the destructor then finds no pool.
BLAS use after the hook restarts the pool (OpenBLAS starts it lazily).

That shutdown itself was then seen to hang (Debian's OpenBLAS 0.3.21, 2 cores: `tqstore bench
decode` never exited in 2 of 3 runs; the caller joined a worker asleep on its wake-up condition,
gdb, eleventh session). So it runs on a C thread of its own and is given SHUTDOWN_WAIT_S; if it
has not ended by then, every other exit hook has already run (this one is registered first, on
the first import of tqstore, so it runs last), and the process ends at once with its exit status
(the CLI's, recorded in `exit_status`; else 1 after an uncaught exception, else 0) rather than
hang in the same join again from OpenBLAS's destructor.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import sys

loaded_blas: str | None = None
_library: ctypes.CDLL | None = None
SHUTDOWN_WAIT_S = 5.0
exit_status: int | None = None  # the CLI's return code, for the bounded exit in quiesce()


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def preload_openblas() -> str | None:
    global loaded_blas
    if loaded_blas is not None or not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return loaded_blas
    name = ctypes.util.find_library("openblas")
    if name is None:
        return None
    try:
        library = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    global _library
    loaded_blas, _library = name, library
    atexit.register(quiesce)
    return name


def quiesce() -> bool:
    """Wait for MLX's CPU work, then stop OpenBLAS's worker threads while they are idle. True if
    a pool was stopped (the OpenBLAS we loaded exports the call); safe to call more than once."""
    shutdown = getattr(_library, "blas_thread_shutdown_", None)
    if shutdown is None:
        return False
    mlx = sys.modules.get("mlx.core")
    if mlx is not None:
        mlx.synchronize(mlx.default_stream(mlx.cpu))
    ended = _run_within(shutdown, SHUTDOWN_WAIT_S)
    if ended is None:  # no way to bound it here: as before
        shutdown()
    elif not ended:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_status if exit_status is not None
                 else 1 if hasattr(sys, "last_value") else 0)
    return True


def _run_within(function: ctypes._CFuncPtr, seconds: float) -> bool | None:
    """Call a no-argument C function on a new C thread (no Python thread: this runs while the
    interpreter shuts down) and wait up to `seconds`: True if it returned, False if not, None
    where glibc's pthread calls are missing. The thread's start routine is the function itself
    (an int(void) called as void *(*)(void *): the argument is ignored, the result unused)."""
    try:
        libc = ctypes.CDLL(None)
        create, join, now = libc.pthread_create, libc.pthread_timedjoin_np, libc.clock_gettime
    except (OSError, AttributeError):
        return None
    create.argtypes = [ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p]
    join.argtypes = [ctypes.c_ulong, ctypes.c_void_p, ctypes.POINTER(_Timespec)]
    now.argtypes = [ctypes.c_int, ctypes.POINTER(_Timespec)]
    thread = ctypes.c_ulong()
    if create(ctypes.byref(thread), None, ctypes.cast(function, ctypes.c_void_p), None) != 0:
        return None
    deadline = _Timespec()
    now(0, ctypes.byref(deadline))  # CLOCK_REALTIME: what pthread_timedjoin_np measures
    whole, part = divmod(seconds, 1.0)
    deadline.tv_sec += int(whole)
    deadline.tv_nsec += int(part * 1e9)
    if deadline.tv_nsec >= 1_000_000_000:
        deadline.tv_sec, deadline.tv_nsec = deadline.tv_sec + 1, deadline.tv_nsec - 1_000_000_000
    return join(thread, None, ctypes.byref(deadline)) == 0
