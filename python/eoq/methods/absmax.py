"""absmax (EOQ Q-k): symmetric block absmax along the input dimension, bits 2-8, block
32-256 (ragged tails allowed). With importance, each block's scale is searched to minimise
the importance-weighted squared error (ggml's make_qx_quants). Side data: one fp16 scale
per block, so bits + 16/block bits per weight at a fixed rate. With ``hessian=`` (the input
covariance) the codes are chosen again on the same scales with error feedback
(eoq.methods.regrid)."""

from __future__ import annotations

import torch

from .. import ops
from .quantized import QuantizedTensor

DEFAULT_BLOCK = 32


def quantize(w: torch.Tensor, bits, block_size=None, importance=None, seed=0, name="tensor", hessian=None,
             damp: float = 0.01, hessian_tokens=None, **options):
    if options:
        raise ValueError(f"{name}: absmax takes no options {sorted(options)}")
    if bits != int(bits) or not 2 <= int(bits) <= 8:
        raise ValueError(f"{name}: absmax bits must be an integer in 2..8, got {bits}")
    block = int(block_size or DEFAULT_BLOCK)
    if not 32 <= block <= 256:
        raise ValueError(f"{name}: absmax block must be in 32..256, got {block}")
    codes, scales = ops.absmax_quantize(w, int(bits), block, importance)
    meta = {}
    if hessian is not None:  # value = (code - half) * scale, scale signed (cpp/absmax.cpp)
        from . import feedback
        from .regrid import requantize

        half = 1 << (int(bits) - 1)
        u = feedback.inverse_cholesky(hessian, damp=damp, name=name, tokens=hessian_tokens)
        q = requantize(w, u, scales, block, qmin=-half, qmax=half - 1)
        codes = (q + half).to(torch.uint8).reshape(codes.shape)
        meta["feedback"] = "gptq"
    return QuantizedTensor("absmax", int(bits), tuple(w.shape), w.dtype, block, seed, codes, int(bits),
                           {"scales": scales}, meta)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    return ops.absmax_dequantize(qt.codes, qt.side["scales"], qt.code_bits, qt.block_size)
