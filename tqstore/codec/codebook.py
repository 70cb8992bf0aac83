"""Lloyd-Max codebooks for one rotated coordinate of a random unit vector.

After a random rotation, each coordinate t of a unit vector in R^d has density
f(t) ~ (1 - t^2)^((d-3)/2) on [-1, 1]. The MSE-optimal scalar quantizer for f (Lloyd-Max) is a
fixed point of: boundaries = midpoints of neighbouring centroids, centroid = E[t | cell].

Determinism: the codebook must be bit-identical in every process on every platform, because the
codes a daemon produces on a hit must equal the codes a generator produces itself. So this module
uses only IEEE-754 correctly rounded float64 operations (+, -, *, /, sqrt) in a fixed order:
no libm transcendental (exp/log/pow/lgamma may differ by an ulp across platforms), no BLAS, no
randomness. NumPy is used only for elementwise arithmetic, cumsum (sequential) and searchsorted.
The result is rounded to float32, the dtype every path computes in.
"""

from __future__ import annotations

from tqstore.errors import InvalidArgument

from functools import lru_cache

import numpy as np

# Grid resolution for the density integrals; fine enough that 8-bit cells span ~100 points.
_GRID_POINTS = 1 << 17
_MAX_ITERATIONS = 4000
_TOLERANCE = 1e-13

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def coordinate_density(head_dim: int, t: np.ndarray) -> np.ndarray:
    """Unnormalized f(t) = (1-t^2)^((d-3)/2), by repeated multiplication (no pow/exp)."""
    base = 1.0 - t * t
    base = np.where(base > 0.0, base, 0.0)
    exponent2 = head_dim - 3  # twice the exponent
    out = np.ones_like(t)
    for _ in range(exponent2 // 2):
        out = out * base
    if exponent2 % 2:
        out = out * np.sqrt(base)
    return out


def _interp(x: np.ndarray, grid: np.ndarray, values: np.ndarray, step: float) -> np.ndarray:
    """Linear interpolation on a uniform grid with explicit arithmetic (deterministic)."""
    pos = (x - grid[0]) / step
    idx = np.clip(np.floor(pos).astype(np.int64), 0, len(grid) - 2)
    frac = pos - idx
    return values[idx] + frac * (values[idx + 1] - values[idx])


@lru_cache(maxsize=None)
def _lloyd_max_float64(head_dim: int, bits: int) -> tuple[float, ...]:
    levels = 1 << bits
    # The density has standard deviation 1/sqrt(d); beyond 12 sigma it is below 1e-30.
    limit = min(1.0, 12.0 / np.sqrt(float(head_dim)))
    step = 2.0 * limit / (_GRID_POINTS - 1)
    grid = -limit + np.arange(_GRID_POINTS, dtype=np.float64) * step
    dens = coordinate_density(head_dim, grid)
    # Cumulative mass F and first moment M by the trapezoid rule, in a fixed sequential order.
    mass = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) * (0.5 * step))])
    tf = grid * dens
    moment = np.concatenate([[0.0], np.cumsum((tf[1:] + tf[:-1]) * (0.5 * step))])
    total = mass[-1]

    # Start from equal-mass cells of f^(1/4) (near the high-resolution optimum f^(1/3), and
    # computable with sqrt alone), which puts Lloyd close to its fixed point.
    cube = np.sqrt(np.sqrt(dens))
    cmass = np.concatenate([[0.0], np.cumsum((cube[1:] + cube[:-1]) * (0.5 * step))])
    targets = (np.arange(levels, dtype=np.float64) + 0.5) / levels * cmass[-1]
    centroids = grid[np.clip(np.searchsorted(cmass, targets), 0, len(grid) - 1)]

    for _ in range(_MAX_ITERATIONS):
        bounds = np.concatenate([[grid[0]], (centroids[1:] + centroids[:-1]) * 0.5, [grid[-1]]])
        f_at = _interp(bounds, grid, mass, step)
        m_at = _interp(bounds, grid, moment, step)
        cell_mass = f_at[1:] - f_at[:-1]
        safe = cell_mass > total * 1e-300
        updated = np.where(safe, (m_at[1:] - m_at[:-1]) / np.where(safe, cell_mass, 1.0), centroids)
        # The density is symmetric: keep the codebook exactly antisymmetric.
        updated = (updated - updated[::-1]) * 0.5
        delta = float(np.max(np.abs(updated - centroids)))
        centroids = updated
        if delta < _TOLERANCE:
            break
    return tuple(float(c) for c in centroids)


def lloyd_max_codebook(head_dim: int, bits: int) -> np.ndarray:
    """Sorted float32 centroids (2**bits,) of the Lloyd-Max quantizer for dimension head_dim."""
    if bits not in SUPPORTED_BITS:
        raise InvalidArgument(f"unsupported bits {bits}: choose one of {SUPPORTED_BITS}")
    if head_dim < 8:
        raise InvalidArgument(f"unsupported head_dim {head_dim}: must be >= 8")
    return np.asarray(_lloyd_max_float64(head_dim, bits), dtype=np.float32)


def codebook_midpoints(codebook: np.ndarray) -> np.ndarray:
    """Decision boundaries: idx = number of midpoints strictly below the coordinate."""
    c = codebook.astype(np.float32)
    return ((c[1:] + c[:-1]) * np.float32(0.5)).astype(np.float32)
