"""Lloyd-Max codebooks, computed once per (density, bits, dim, grid, iters) and cached."""

from __future__ import annotations

import functools

from .. import ops


@functools.lru_cache(maxsize=None)
def codebook(bits: int, density: str = "gaussian", dim: int = 0, grid: int = 8193, iters: int = 1000) -> ops.Codebook:
    return ops.lloyd_max(bits, density=density, dim=dim or None, grid=grid, iters=iters)
