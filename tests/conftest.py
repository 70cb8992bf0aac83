"""Import tqstore before anything imports MLX, so every test process runs on the same BLAS
(tqstore loads OpenBLAS ahead of MLX on Linux). Numerics, and so near-tie greedy choices of a
4-bit cache, depend on the BLAS: a test file that imported mlx first would run on MLX's
reference BLAS and could see other tokens than the CLI does."""

import tqstore  # noqa: F401  (must stay the first import)
