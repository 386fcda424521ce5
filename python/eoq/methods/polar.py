"""polar (PolarQuant): blocks of 128 along the input dimension, an orthonormal
Walsh-Hadamard rotation (random signs from the seed unless ``random_signs=False``),
coordinates scaled by sqrt(block)/||x|| so they are close to N(0, 1), and the 2^bits
Lloyd-Max centroids of N(0, 1) (bits 2-6; up to 8 accepted).

Dequantize: centroid * scale, inverse rotation, with one fp16 scale per block. PolarQuant
stores scale = ||x|| / sqrt(block) (``scale="norm"``); the default ``scale="fit"`` stores
the least-squares scale <x, c> / <c, c> of the chosen centroids c instead: the same codes,
never a larger error, and dequantized weights are a fixed point (quantizing them again
gives them back). With ``hessian=`` the codes are chosen again on those scales with error
feedback in the rotated domain (eoq.methods.regrid). Side data: the scales plus the codebook (2^bits float32). in_features
that 128 does not divide use the rule of eoq.methods.rotation.
"""

from __future__ import annotations

import math

import torch

from .. import ops
from .quantized import QuantizedTensor
from . import rotation
from .codebooks import codebook

DEFAULT_BLOCK = 128


def check_bits(bits, name: str) -> int:
    if bits != int(bits) or not 1 <= int(bits) <= 8:
        raise ValueError(f"{name}: bits must be an integer in 1..8, got {bits}")
    return int(bits)


def check_scale(scale: str, name: str) -> None:
    if scale not in ("fit", "norm"):
        raise ValueError(f"{name}: scale must be 'fit' or 'norm', got {scale!r}")


def fit_scales(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Least-squares scale of centroids c for values x along the last dimension, fp16."""
    return ((x * c).sum(-1) / c.pow(2).sum(-1).clamp_min(1e-30)).to(torch.float16)


def quantize(w: torch.Tensor, bits, block_size=None, importance=None, seed=0, name="tensor",
             random_signs: bool = True, scale: str = "fit", hessian=None, damp: float = 0.01, hessian_tokens=None,
             **options):
    if options:
        raise ValueError(f"{name}: polar takes no options {sorted(options)}")
    bits = check_bits(bits, name)
    check_scale(scale, name)
    rows, cols = w.shape
    block, padded = rotation.choose_block(cols, int(block_size or DEFAULT_BLOCK))
    signs_seed = seed if random_signs else None
    x = rotation.rotate(w, block, padded, signs_seed).view(rows, padded // block, block)
    n = x.norm(dim=-1, keepdim=True)
    u = torch.where(n > 0, x * (math.sqrt(block) / n.clamp_min(1e-30)), torch.zeros_like(x))
    cb = codebook(bits)
    codes = ops.codebook_quantize(u, cb.boundaries.float())
    if scale == "fit":
        scales = fit_scales(x, ops.codebook_dequantize(codes, cb.centroids.float()))
    else:
        scales = (n.squeeze(-1) / math.sqrt(block)).to(torch.float16)
    meta = {"rotation_block": block, "padded_cols": padded, "random_signs": bool(random_signs), "scale": scale}
    if hessian is not None:  # the same scales and codebook, codes chosen with error feedback
        from .regrid import requantize

        u = rotation.feedback_factor(hessian, block, padded, signs_seed, name, damp, hessian_tokens)
        codes = requantize(x.reshape(rows, padded), u, scales, block, levels=cb.centroids.float()).to(torch.uint8)
        meta["feedback"] = "gptq"
    return QuantizedTensor("polar", bits, (rows, cols), w.dtype, block, seed, codes.reshape(rows, padded), bits,
                           {"scales": scales, "codebook": cb.centroids.float()}, meta)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    rows, cols = qt.shape
    block, padded = qt.meta["rotation_block"], qt.meta["padded_cols"]
    c = ops.codebook_dequantize(qt.codes, qt.side["codebook"]).view(rows, padded // block, block)
    x = c * qt.side["scales"].float().unsqueeze(-1)
    return rotation.unrotate(x.reshape(rows, padded), block, cols, qt.seed if qt.meta["random_signs"] else None)
