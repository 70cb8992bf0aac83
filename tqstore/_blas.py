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
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import sys

loaded_blas: str | None = None
_library: ctypes.CDLL | None = None


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
    shutdown()
    return True
