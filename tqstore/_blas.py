"""Load Debian's OpenBLAS before MLX on Linux.

The `mlx[cpu]` wheel links a reference BLAS: fp32 matmul ran at ~5.5 GFLOP/s here, and SmolLM2
prefill 15-25x slower than with OpenBLAS loaded first into the global symbol namespace
(measured, ../shared/notes/platform.md). This only helps if it runs before `import mlx`; it is a
no-op elsewhere, when MLX is already loaded, or when OpenBLAS is not installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

loaded_blas: str | None = None


def preload_openblas() -> str | None:
    global loaded_blas
    if loaded_blas is not None or not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return loaded_blas
    name = ctypes.util.find_library("openblas")
    if name is None:
        return None
    try:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    loaded_blas = name
    return name
