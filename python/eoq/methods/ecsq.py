"""ecsq (the default): entropy-coded scalar quantization.

Each row is rotated by a seeded randomised Walsh-Hadamard transform (blocks of up to 512
along the input dimension, eoq.methods.rotation), which makes the coordinates close to
Gaussian and spreads outliers; then a *uniform* quantizer q = round(x / step) is applied
and the integer codes are rANS-coded. No per-block scales: the entropy coder spends bits
where the values are large, which is where a fixed-rate quantizer needs its scales.

The step is chosen to minimise distortion + lam * rate, rate = the codes' empirical
entropy (what the rANS coder reaches within ~0.1 %). Three ways to set it:
  - ``bits`` (default use): a target coded rate in bits per weight, side data and stream
    overhead included; the step (or, with groups, lam) is searched to meet it.
  - ``step=``: the step itself.
  - ``lam=``: the slope; each group takes the step minimising D + lam * R. Equal lam
    across tensors is the rate-optimal allocation, which a global allocator uses.
Distortion is the squared error of the weights, importance-weighted per input channel when
importance is given. ``group_rows=N`` gives every N rows their own step (option).

Theory (high rate, Gaussian): a uniform quantizer with ideal entropy coding sits
0.254 bit/weight above the rate-distortion bound (the 1.53 dB space-filling loss); fixed-
rate Lloyd-Max sits further above it (0.42 bit at 4 bits).

Codes are stored as q - min(q) in uint8 (the offset is in the metadata), so q must span
at most 256 values: the step never goes below (max - min of x) / 254, which caps the rate
at about 7 bits per weight for Gaussian-like rows.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import ops
from ..quantized import QuantizedTensor, code_entropy_bits, weighted_error
from . import rotation

DEFAULT_BLOCK = 512
RATE_TARGET = True  # `bits` is a coded rate that side data counts against
GOLDEN = (math.sqrt(5) - 1) / 2
SEARCH_ITERS = 48


def stream_overhead_bits(n: int, alphabet: int) -> int:
    """Bytes an EOQR stream adds to n * H (docs/FORMAT.md): header, table, index, states."""
    chunks = max(1, -(-n // (1 << 18)))
    return 8 * (30 + 2 * alphabet + 4 + chunks * (8 + 128))


class Problem:
    """The rotated rows of one tensor and what every trial step needs (quantize here, and the
    rate-distortion curves of eoq.allocate)."""

    def __init__(self, w, block_size=None, seed=0, importance=None, group_rows=None):
        self.block, self.padded = rotation.choose_block(w.shape[1], int(block_size or DEFAULT_BLOCK))
        x = rotation.rotate(w, self.block, self.padded, seed)
        self.w, self.x, self.seed, self.imp = w, x, seed, importance
        rows = x.shape[0]
        g = rows if not group_rows else int(group_rows)
        self.groups = [slice(r, min(rows, r + g)) for r in range(0, rows, g)]
        self.lo = max(float(x.max() - x.min()) / 254.0, 1e-30)  # q spans <= 255 steps even after rounding
        self.hi = max(2.0 * float(x.abs().max()), 2 * self.lo)  # every q = 0

    def q(self, sl, step):
        return torch.round(self.x[sl] / step)

    def distortion(self, sl, step):
        xh = self.q(sl, step) * step
        if self.imp is None:
            return float((self.x[sl] - xh).double().pow(2).sum())
        cols = self.w.shape[1]
        return weighted_error(self.w[sl], rotation.unrotate(xh, self.block, cols, self.seed), self.imp)

    def codes(self, steps):
        return torch.cat([self.q(sl, s) for sl, s in zip(self.groups, steps)])

    def total_bits(self, steps, numel):
        q = self.codes(steps)
        qmin, qmax = int(q.min()), int(q.max())
        n = q.numel()
        h = code_entropy_bits((q - qmin).to(torch.uint8))
        return h * n + stream_overhead_bits(n, qmax - qmin + 1) + 32 * len(steps)

    def best_step(self, sl, lam):
        """argmin over log(step) of D + lam * R for one group (golden-section search)."""
        n = self.x[sl].numel()

        def cost(log_step):
            s = math.exp(log_step)
            q = self.q(sl, s)
            h = code_entropy_bits((q - q.min()).to(torch.uint8))
            return self.distortion(sl, s) + lam * h * n

        a, b = math.log(self.lo), math.log(self.hi)
        c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
        fc, fd = cost(c), cost(d)
        while b - a > 1e-3:  # step known to 0.1 %
            if fc <= fd:
                b, d, fd = d, c, fc
                c = b - GOLDEN * (b - a)
                fc = cost(c)
            else:
                a, c, fc = c, d, fd
                d = a + GOLDEN * (b - a)
                fd = cost(d)
        return math.exp((a + b) / 2)


def _solve(f, lo, hi, tol):
    """The x in [lo, hi] where decreasing f crosses 0, searched on log(x) by regula falsi
    with the Illinois fix (rate is close to linear in log(step), so a few evaluations
    suffice); stops when |f| <= tol. f(lo) <= 0 or f(hi) >= 0 returns that end."""
    a, b = math.log(lo), math.log(hi)
    fa, fb = f(lo), f(hi)
    if fa <= 0:
        return lo
    if fb >= 0:
        return hi
    side = 0
    for _ in range(SEARCH_ITERS):
        m = b - fb * (b - a) / (fb - fa)
        fm = f(math.exp(m))
        if abs(fm) <= tol:
            return math.exp(m)
        if fm > 0:
            a, fa = m, fm
            if side == +1:
                fb /= 2
            side = +1
        else:
            b, fb = m, fm
            if side == -1:
                fa /= 2
            side = -1
    return math.exp(b)


def _meet_exactly(p: _Problem, steps, target: float):
    """Widen the steps until the real stream (not the entropy estimate) fits the target.

    The estimate misses the rANS coder's model error (frequencies at 2^-12 resolution),
    a few thousandths of a bit. At high rate R ~ h - log2(step), so growing every step by
    2^(excess / n) removes about `excess` bits.
    """
    for _ in range(8):
        q = p.codes(steps)
        codes = (q - q.min()).to(torch.uint8).reshape(-1)
        excess = 8 * ops.rans_encode(codes).numel() + 32 * len(steps) - target
        if excess <= 0:
            break
        steps = [s * 2.0 ** (excess / q.numel() + 1e-4) for s in steps]
    return steps


def quantize(w: torch.Tensor, bits, block_size=None, importance=None, seed=0, name="tensor",
             step: Optional[float] = None, lam: Optional[float] = None, group_rows: Optional[int] = None,
             **options):
    if options:
        raise ValueError(f"{name}: ecsq takes no options {sorted(options)}")
    if step is not None and lam is not None:
        raise ValueError(f"{name}: give at most one of step= and lam=")
    if step is None and lam is None and not (0 < float(bits) <= 8):
        raise ValueError(f"{name}: ecsq bits (a target coded rate) must be in (0, 8], got {bits}")
    rows, cols = w.shape
    p = Problem(w, block_size, seed, importance, group_rows)
    numel = rows * cols
    block = p.block
    meta = {"rotation_block": block, "padded_cols": p.padded, "group_rows": group_rows}

    if step is not None:
        if not step > 0:
            raise ValueError(f"{name}: step must be positive, got {step}")
        steps = [max(float(step), p.lo)] * len(p.groups)
    elif lam is not None:
        if not lam > 0:
            raise ValueError(f"{name}: lam must be positive, got {lam}")
        steps = [p.best_step(sl, float(lam)) for sl in p.groups]
        meta["lam"] = float(lam)
    else:
        target = float(bits) * numel
        if len(p.groups) == 1:
            s = _solve(lambda s: p.total_bits([s], numel) - target, p.lo, p.hi, tol=1e-4 * target)
            steps = [s]
        else:  # equal slope across groups, slope searched to meet the rate
            def steps_for(lam_):
                return [p.best_step(sl, lam_) for sl in p.groups]

            scale = float(p.x.pow(2).mean()) + 1e-30  # distortion per weight at zero rate
            lam_ = _solve(lambda l: p.total_bits(steps_for(l), numel) - target, scale * 1e-9, scale * 10,
                          tol=1e-3 * target)
            steps = steps_for(lam_)
            meta["lam"] = lam_
        meta["rate_limited"] = bool(p.total_bits([p.lo] * len(p.groups), numel) < target)
        steps = _meet_exactly(p, steps, target)

    q = p.codes(steps)
    offset = int(q.min())
    if int(q.max()) - offset > 255:  # the step floor p.lo makes this impossible; never wrap silently
        raise AssertionError(f"{name}: ecsq codes span {int(q.max()) - offset + 1} values")
    codes = (q - offset).to(torch.uint8)
    meta["offset"] = offset
    code_bits = max(1, math.ceil(math.log2(int(codes.max()) + 1))) if codes.numel() else 1
    side = {"steps": torch.tensor(steps, dtype=torch.float32)}
    return QuantizedTensor("ecsq", float(bits), (rows, cols), w.dtype, block, seed, codes, code_bits, side, meta)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    rows, cols = qt.shape
    q = qt.codes.float() + qt.meta["offset"]
    steps = qt.side["steps"]
    g = rows if not qt.meta["group_rows"] else int(qt.meta["group_rows"])
    per_row = steps.repeat_interleave(g)[:rows].unsqueeze(1)
    return rotation.unrotate(q * per_row, qt.meta["rotation_block"], cols, qt.seed)
