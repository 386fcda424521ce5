"""The blockwise randomised Walsh-Hadamard rotation that polar, turbo and ecsq share.

Rule for the block: the largest power of two that divides in_features, at most the
method's preferred block and at least 16. When no such block exists (in_features not a
multiple of 16), each row is zero-padded to the next multiple of 16 and the rule applied
to the padded width; the padding is quantized and stored like the rest (its cost shows in
the stored size) and cropped at dequantization.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import ops

MIN_BLOCK = 16


def choose_block(cols: int, preferred: int) -> tuple[int, int]:
    """(block, padded_cols) for a row of `cols` values."""
    if preferred < MIN_BLOCK or preferred & (preferred - 1):
        raise ValueError(f"rotation block must be a power of two >= {MIN_BLOCK}, got {preferred}")
    padded = cols if cols % MIN_BLOCK == 0 else cols + MIN_BLOCK - cols % MIN_BLOCK
    block = preferred
    while padded % block:
        block //= 2
    return block, padded


def rotate(w: torch.Tensor, block: int, padded: int, seed: Optional[int], overwrite: bool = False) -> torch.Tensor:
    """The rows of w rotated (padded to `padded` columns). ``overwrite``: w is the caller's
    scratch copy and may be rotated in place."""
    if padded != w.shape[1]:
        w, overwrite = torch.nn.functional.pad(w, (0, padded - w.shape[1])), True
    return ops.hadamard(w, block=block, seed=seed, overwrite=overwrite)


def unrotate(x: torch.Tensor, block: int, cols: int, seed: Optional[int]) -> torch.Tensor:
    return ops.hadamard(x, block=block, seed=seed, inverse=True)[:, :cols].contiguous()


def feedback_factor(hessian: torch.Tensor, block: int, padded: int, seed: Optional[int], name: str,
                    damp: float = 0.01, tokens: Optional[int] = None) -> torch.Tensor:
    """The upper Cholesky factor of the damped inverse covariance *in the rotated domain*
    (H -> M H M^T, eoq.methods.feedback.rotate_hessian), which error feedback walks the rotated
    coordinates with. The rotation mixes the zero-padded columns into every coordinate of their
    block, so with padding the rotated H is singular (rank <= cols); the damping makes it
    factorizable, and error that lands in the padding is cropped by ``unrotate``."""
    from . import feedback

    return feedback.inverse_cholesky(feedback.rotate_hessian(hessian, block, padded, seed), damp=damp, name=name,
                                     tokens=tokens)
