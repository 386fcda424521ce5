"""How ecsq's integer codes are stored and what they cost: split into a rANS-coded high
byte and raw low bits when they span more than 256 levels (docs/FORMAT.md), the exact stored
bytes, and the estimate of them from the codes or from a histogram alone (the step search
runs on histograms, eoq.ops.code_histogram).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from .quantized import code_entropy_bits, counts_entropy_bits


LEVELS = 1 << 16     # q spans fewer values than this: hi a byte, lo at most 8 bits (ops.pack_bits)


def stream_overhead_bits(n: int, alphabet: int) -> int:
    """Bytes an EOQR stream adds to n * H (docs/FORMAT.md): header, table, index, states."""
    chunks = max(1, -(-n // (1 << 18)))
    return 8 * (30 + 2 * alphabet + 4 + chunks * (8 + 128))


def low_bits_for(span: int) -> int:
    """k: the fewest low bits that leave (span - 1) >> k < 256 (span = the number of levels)."""
    k = 0
    while (span - 1) >> k > 255:
        k += 1
    return k


def split_codes(q: torch.Tensor) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(offset, k, hi, lo) of integer-valued codes q: q = offset + (hi << k | lo), hi and lo uint8."""
    lo_, hi_ = (int(v) for v in torch.aminmax(q))
    offset = lo_
    if hi_ - lo_ < 256:  # the common case: the levels are the byte codes themselves
        return offset, 0, (q - offset).to(torch.uint8), torch.zeros(0, dtype=torch.uint8)
    if hi_ - lo_ >= LEVELS:  # the step floor makes this impossible; never wrap silently
        raise AssertionError(f"ecsq codes span {hi_ - lo_ + 1} values")
    c = (q - offset).to(torch.int32)
    k = low_bits_for(hi_ - lo_ + 1)
    hi = (c >> k).to(torch.uint8)
    lo = (c & ((1 << k) - 1)).to(torch.uint8)
    return offset, k, hi, lo


def coded_bits(q: torch.Tensor) -> float:
    """The estimated stored size of integer codes q in bits: n * H(hi) + the raw low bits
    (whole bytes) + the stream's overhead (what the rANS coder reaches within ~0.1 %)."""
    _, k, hi, _ = split_codes(q)
    n = q.numel()
    return code_entropy_bits(hi) * n + 8 * (-(-n * k // 8)) + stream_overhead_bits(n, int(hi.max()) + 1)


def counts_coded_bits(counts: torch.Tensor, n: Optional[int] = None) -> float:
    """coded_bits of the codes a histogram counts (int64, one bin per level, consecutive
    levels; empty bins at either end allowed): the same number, without the codes. With
    ``n``: the estimate for n codes distributed as the counted ones (counts from a sample)."""
    live = torch.nonzero(counts).reshape(-1)
    if not live.numel():
        return 0.0
    counts = counts[int(live[0]):int(live[-1]) + 1]
    n, span = int(counts.sum()) if n is None else int(n), counts.numel()
    k = low_bits_for(span)
    if k:  # hi = level >> k: 2^k neighbouring levels share a symbol
        counts = torch.nn.functional.pad(counts, (0, -span % (1 << k))).reshape(-1, 1 << k).sum(1)
    return counts_entropy_bits(counts) * n + 8 * (-(-n * k // 8)) + stream_overhead_bits(n, counts.numel())


def stored_code_bytes(q: torch.Tensor) -> int:
    """The exact bytes the codes of q take: the rANS stream of hi and the packed low bits."""
    return split_bytes(split_codes(q))


def split_bytes(split: tuple[int, int, torch.Tensor, torch.Tensor]) -> int:
    """The exact bytes of split codes (split_codes' (offset, k, hi, lo)) as stored."""
    _, k, hi, _ = split
    return int(ops.rans_encode(hi.reshape(-1).contiguous()).numel()) + -(-hi.numel() * k // 8)


def merge_histograms(hists: list[tuple[int, torch.Tensor]]) -> tuple[int, torch.Tensor]:
    """(qmin, counts) of several (qmin, counts) histograms added up (one is returned as it is)."""
    if len(hists) == 1:
        return hists[0]
    lo = min(q for q, _ in hists)
    out = torch.zeros(max(q + h.numel() for q, h in hists) - lo, dtype=torch.int64)
    for q, h in hists:
        out[q - lo:q - lo + h.numel()] += h
    return lo, out
