"""tqstore: a persistent prefix KV-cache store and TurboQuant-compressed paged KV cache for MLX.

Importing tqstore first loads a fast system BLAS for MLX's Linux CPU backend (see _blas.py).
"""

from tqstore import _blas

_blas.preload_openblas()

__version__ = "0.1.0"
