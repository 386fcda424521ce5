"""What every method returns: a ``QuantizedTensor``, and the measures they share.

A QuantizedTensor holds what a file would store: uint8 codes, side tensors (scales,
norms, AWQ scales, codebook) and metadata (method, bits, block, seed, shape, dtype, and
the method's own parameters). ``dequantize()`` rebuilds the weight; ``stored_bytes(codec)``
is the exact size of everything stored, codes fixed-rate packed (``"packed"``) or
rANS-coded (``"rans"``), side tensors at their stored dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch

from .. import ops

# method name -> its dequantize(qt): filled by eoq.methods (its __init__ runs before any of its
# modules), so this module, which every method imports, imports none of them
DEQUANTIZERS: dict = {}


@dataclasses.dataclass
class QuantizedTensor:
    method: str
    bits: float                       # the requested bits (a coded rate for ecsq)
    shape: tuple[int, int]            # of the original weight
    dtype: torch.dtype                # of the original weight
    block_size: Optional[int]
    seed: int
    codes: torch.Tensor               # uint8, any shape; values < 2 ** code_bits
    code_bits: int                    # width of a code when packed at a fixed rate
    side: dict[str, torch.Tensor]     # stored side tensors, at their stored dtype
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # scalar parameters
    name: str = "tensor"
    _stored: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # codec -> bytes

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        w = DEQUANTIZERS[self.method](self)
        if "awq_scales" in self.side:
            w = w / self.side["awq_scales"].float()
        return w.to(dtype or self.dtype)

    def code_stream(self, codec: str = "rans") -> torch.Tensor:
        """The codes as they are stored: a rANS stream or packed bytes."""
        flat = self.codes.reshape(-1).contiguous()
        if codec == "rans":
            return ops.rans_encode(flat)
        if codec == "packed":
            return ops.pack_bits(flat, self.code_bits)
        raise ValueError(f"{self.name}: codec must be 'rans' or 'packed', got {codec!r}")

    def side_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.side.values())

    def stored_bytes(self, codec: str = "rans") -> int:
        if codec not in self._stored:
            self._stored[codec] = int(self.code_stream(codec).numel()) + self.side_bytes()
        return self._stored[codec]

    def bits_per_weight(self, codec: str = "rans") -> float:
        return 8.0 * self.stored_bytes(codec) / (self.shape[0] * self.shape[1])

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def evenly_spaced_rows(rows: int, k: int) -> torch.Tensor:
    """The indices of about k (at least 2) evenly spaced rows of `rows`, first and last included:
    the sample the step search, the curves and AWQ's alpha search measure a large tensor on."""
    return torch.linspace(0, rows - 1, max(2, int(k))).round().long().unique()


# Rows checked for non-finite values at a time when a weight keeps its dtype (check_weight).
CHECK_ROWS_VALUES = 1 << 24


def check_weight(weight: torch.Tensor, name: str, keep_dtype: bool = False) -> torch.Tensor:
    """The weight as contiguous float32 [out, in]; a clear ValueError for anything else.
    ``keep_dtype``: a 16-bit weight stays in its dtype (checked chunk by chunk), for a method
    that converts it chunk by chunk itself (ecsq.streams)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name}: only 2-D weights (out_features x in_features) are quantized, got shape "
                         f"{tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point weight, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name}: empty weight {tuple(weight.shape)}")
    w = weight.detach().cpu()
    w = w.contiguous() if keep_dtype and w.element_size() == 2 else w.to(torch.float32).contiguous()
    span = max(1, CHECK_ROWS_VALUES // w.shape[1])
    for r0 in range(0, w.shape[0], span):
        bad = ~torch.isfinite(w[r0:r0 + span])
        if bool(bad.any()):
            r, c = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name}: non-finite value {float(w[r0 + r, c])} at [{r0 + r}, {c}]; "
                             f"refusing to quantize")
    return w


def weighted_error(w: torch.Tensor, w_hat: torch.Tensor, importance: Optional[torch.Tensor],
                   row_importance: Optional[torch.Tensor] = None) -> float:
    return math.fsum(weighted_error_blocks(w, w_hat, importance, row_importance))


def weighted_error_blocks(w: torch.Tensor, w_hat: torch.Tensor, importance: Optional[torch.Tensor],
                          row_importance: Optional[torch.Tensor] = None) -> list[float]:
    """sum_r sum_c row_importance_r * importance_c * (w - w_hat)[r, c]^2 (either weight 1 when
    None): the output error E||(W - W_hat) a||^2 when input channels are uncorrelated, with rows
    weighted by how much their output matters. As block sums (block_sums): their math.fsum
    is the error, and rows in chunks give the blocks of the rows whole."""
    d2 = (w - w_hat).double().pow(2)
    if importance is not None:
        d2 = d2 * importance.double()
    if row_importance is not None:
        d2 = d2 * row_importance.double().reshape(-1, 1)
    return block_sums(d2)


# Values summed by one thread before the exact sum of the blocks (exact_sum): torch splits a
# reduction over its outputs when there are enough of them (at least its thread count), and
# a tensor small enough to have fewer blocks (< 32 768 values) is reduced serially anyway.
SUM_BLOCK = 256


def block_sums(t: torch.Tensor) -> list[float]:
    """The float64 sums of t's rows (a 1-D t: one row) in blocks of SUM_BLOCK values, each
    row zero-padded to whole blocks so that no block spans two rows: row chunks of a tensor
    give the very blocks of the whole. Each block is summed by one thread, so the sums are the
    same at any thread count."""
    t = t.double().reshape(1, -1) if t.dim() == 1 else t.double().reshape(t.shape[0], -1)
    pad = -t.shape[1] % SUM_BLOCK
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(-1, SUM_BLOCK).sum(1).tolist()


def exact_sum(t: torch.Tensor) -> float:
    """The sum of t's values in float64, the same bits at any thread count (a plain ``sum()``
    splits the work by thread, and the last bits move with it: AWQ's alpha and the curves
    compare such sums): block_sums added exactly (math.fsum, whose result does not depend on
    the order either)."""
    return math.fsum(block_sums(t))


def code_entropy_bits(codes: torch.Tensor) -> float:
    """Empirical order-0 entropy of uint8 codes, in bits per code."""
    # bincount takes the bytes as they are: .long() would copy 8 bytes a code (4 GiB for a head)
    return counts_entropy_bits(torch.bincount(codes.reshape(-1), minlength=256))


def counts_entropy_bits(counts: torch.Tensor) -> float:
    """Order-0 entropy, in bits per symbol, of a histogram (integer counts; zeros anywhere)."""
    counts = counts.double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum()) if p.numel() else 0.0


def bits_for(levels: int) -> int:
    return max(1, math.ceil(math.log2(max(levels, 2))))
