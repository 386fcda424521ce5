"""absmax (EOQ Q-k): symmetric block absmax along the input dimension, bits 2-8, block
32-256 (ragged tails allowed). With importance, each block's scale is searched to minimise
the importance-weighted squared error (ggml's make_qx_quants). Side data: one fp16 scale
per block, so bits + 16/block bits per weight at a fixed rate."""

from __future__ import annotations

import torch

from .. import ops
from ..quantized import QuantizedTensor

DEFAULT_BLOCK = 32


def quantize(w: torch.Tensor, bits, block_size=None, importance=None, seed=0, name="tensor", **options):
    if options:
        raise ValueError(f"{name}: absmax takes no options {sorted(options)}")
    if bits != int(bits) or not 2 <= int(bits) <= 8:
        raise ValueError(f"{name}: absmax bits must be an integer in 2..8, got {bits}")
    block = int(block_size or DEFAULT_BLOCK)
    if not 32 <= block <= 256:
        raise ValueError(f"{name}: absmax block must be in 32..256, got {block}")
    codes, scales = ops.absmax_quantize(w, int(bits), block, importance)
    return QuantizedTensor("absmax", int(bits), tuple(w.shape), w.dtype, block, seed, codes, int(bits),
                           {"scales": scales}, {})


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    return ops.absmax_dequantize(qt.codes, qt.side["scales"], qt.code_bits, qt.block_size)
