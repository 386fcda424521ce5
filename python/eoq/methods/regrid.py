"""Error feedback for the methods whose grid is fixed before rounding (absmax, polar, turbo).

Each of them first quantizes plainly, which fixes its grid: a scale per block (absmax's
signed fp16 scale, polar's and turbo's fp16 scale of a Lloyd-Max codebook). ``requantize``
then chooses the codes again on that very grid with GPTQ-style error feedback (eoq.methods.feedback)
and returns them; the side data stays as stored, so the format and the dequantizer do not
change. The scales used are the stored fp16 values widened to float32, so the errors fed
back are exactly the errors the file will have. A block whose scale is 0 dequantizes to 0
whatever its codes: it is given a negligible scale, so the feedback sees its reconstruction
as 0 too.
"""

from __future__ import annotations

from typing import Optional

import torch

TINY = 1e-30  # stands for a zero scale: code * TINY is 0 to float32's resolution of any weight


def requantize(x: torch.Tensor, u: torch.Tensor, scales: torch.Tensor, group: int, qmin: int = -(1 << 31),
               qmax: int = (1 << 31) - 1, levels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int32 codes of x [rows, n] (the weight, or its rotated rows) on the grid of `scales`
    [rows, ceil(n / group)] (uniform integers in [qmin, qmax], or indices into `levels`), with
    error feedback through u (eoq.methods.feedback.inverse_cholesky of the covariance in x's domain)."""
    from . import feedback

    s = scales.float().reshape(x.shape[0], -1)
    s = torch.where(s == 0, torch.full_like(s, TINY), s).contiguous()
    codes, _ = feedback.gptq(x.float().contiguous(), u, s, group=group, levels=levels, qmin=qmin, qmax=qmax)
    return codes
