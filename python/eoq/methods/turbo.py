"""turbo (TurboQuant-mse, arXiv 2504.19874, applied to weight rows): each row (or group of
``block`` values along the input dimension) is split into an fp16 norm and a unit vector;
the unit vector is rotated by a seeded random rotation (a randomised Walsh-Hadamard
transform in blocks of the rotation rule), and each coordinate is quantized with the
Lloyd-Max codebook of the exact law of one coordinate of a uniformly random unit vector in
d dimensions (d = the group size), computed on a grid of 8193 points with 96 Lloyd
iterations by default (``grid=``, ``iters=``).

Dequantize: centroid * scale, inverse rotation; ``scale="fit"`` (default) stores the
least-squares scale of the chosen centroids, ``scale="norm"`` the norm itself (as in the
paper); see eoq.methods.polar.

Options: ``group="block"`` (default; one norm per block of ``block_size``, default 128) or
``group="row"`` (one norm per row, d = the padded row width). ``hessian=``: codes chosen again
on the same scales with error feedback in the rotated domain (eoq.methods.regrid).
"""

from __future__ import annotations

import torch

from .. import ops
from .quantized import QuantizedTensor
from . import rotation
from .codebooks import codebook
from .polar import check_bits, check_scale, fit_scales

DEFAULT_BLOCK = 128


def quantize(w: torch.Tensor, bits, block_size=None, importance=None, seed=0, name="tensor",
             group: str = "block", grid: int = 8193, iters: int = 96, scale: str = "fit", hessian=None,
             damp: float = 0.01, hessian_tokens=None, **options):
    if options:
        raise ValueError(f"{name}: turbo takes no options {sorted(options)}")
    if group not in ("block", "row"):
        raise ValueError(f"{name}: turbo group must be 'block' or 'row', got {group!r}")
    bits = check_bits(bits, name)
    check_scale(scale, name)
    rows, cols = w.shape
    block, padded = rotation.choose_block(cols, int(block_size or DEFAULT_BLOCK))
    x = rotation.rotate(w, block, padded, seed)
    x = x.view(rows, padded // block, block) if group == "block" else x.view(rows, 1, padded)
    dim = x.shape[-1]
    n = x.norm(dim=-1, keepdim=True)
    u = torch.where(n > 0, x / n.clamp_min(1e-30), torch.zeros_like(x))
    cb = codebook(bits, "sphere", dim, grid, iters)
    codes = ops.codebook_quantize(u, cb.boundaries.float())
    scales = fit_scales(x, ops.codebook_dequantize(codes, cb.centroids.float())) if scale == "fit" else \
        n.squeeze(-1).to(torch.float16)
    meta = {"rotation_block": block, "padded_cols": padded, "group": group, "dim": dim, "grid": grid,
            "iters": iters, "scale": scale}
    if hessian is not None:  # the same scales and codebook, codes chosen with error feedback
        from .regrid import requantize

        u = rotation.feedback_factor(hessian, block, padded, seed, name, damp, hessian_tokens)
        codes = requantize(x.reshape(rows, padded), u, scales, dim, levels=cb.centroids.float()).to(torch.uint8)
        meta["feedback"] = "gptq"
    return QuantizedTensor("turbo", bits, (rows, cols), w.dtype, block, seed, codes.reshape(rows, padded), bits,
                           {"scales": scales, "codebook": cb.centroids.float()}, meta)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    rows, cols = qt.shape
    block, padded, dim = qt.meta["rotation_block"], qt.meta["padded_cols"], qt.meta["dim"]
    c = ops.codebook_dequantize(qt.codes, qt.side["codebook"]).view(rows, padded // dim, dim)
    x = (c * qt.side["scales"].float().unsqueeze(-1)).reshape(rows, padded)
    return rotation.unrotate(x, block, cols, qt.seed)
