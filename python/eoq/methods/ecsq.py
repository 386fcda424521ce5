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

Row importance (option ``row_importance``, one weight per row): an embedding row matters
as often as its token occurs, and an output-head row as much as its token is predicted.
Minimising sum_i rho_i D_i + lam * R at high rate gives row i the step ~ rho_i^(-1/2)
(D_i ~ step_i^2, R_i ~ -log2 step_i), so each row gets its own step: a common step, searched
as usual, times a fixed multiplier m_i = (rho'_i / geomean rho')^(-1/2). rho' smooths the
weights the way counts are smoothed: rows never seen get ROW_PRIOR times the average weight
of one calibration token (``row_tokens`` = how many tokens the weights were summed over), so
an unseen token is treated like one seen once, not as worthless; and rho' is clipped to
ROW_RANGE times its geometric mean either way, so the multipliers span at most
2 * log2(ROW_RANGE) / 2 = 4 bits and the finest rows cannot push the shared 256-code
alphabet's step floor (below) up for everybody. The per-row steps are stored (32 bits a
row), so the dequantizer is the ``group_rows=1`` one.

Error feedback (option ``hessian=``, the input covariance E[a a^T] of the Linear; GPTQ,
eoq.methods.feedback): the rotated rows are quantized column by column on the same grid (the same
steps), each column's rounding error pushed onto the columns not yet quantized through the
inverse of the covariance in the rotated domain, so the output error (W - W_hat) H (W -
W_hat)^T drops while the format stays as it is. The codes' distribution changes (it
widens), so every rate the step search and the exact-size loop measure is measured on the
codes after feedback: the rate target is met honestly. The codes are clamped to the range
plain rounding gives at that step. ``rate_and_output_error`` measures a point of feedback's
own rate-distortion curve (the rate of the codes it chooses, the output error through the
covariance) for eoq.convert.allocate, which a conversion does not use yet (allocate.FEEDBACK_CURVES).

Reconstruction at low rates: the midpoint q * step is the best reconstruction of a cell only
where the density is flat across it. At 2-3 bits the cells next to zero are wide against the
distribution's width, and the conditional mean of each cell lies closer to zero. After the
codes are chosen, the reconstruction of the levels |q| = 1..RECON_MAX is fitted: r_m = the
(step^2-weighted) mean of |x| / step over the values coded +-m (the conditional mean), stored
as ``recon`` (float32, a few values per tensor, counted in the size) and kept only when it
removes at least RECON_GAIN of the error. The rate is unchanged (same codes); the error can
only fall on the weights it was fitted on. Not with error feedback (which already chose the
codes for the midpoints' errors) nor with low bits (high rates, where it gains nothing).

Speed: a trial step is measured without materialising its codes: ops.code_histogram counts
round(x / step) and sums each row's squared error in one pass (C++), and the rate is read off
the counts (counts_coded_bits, the same number coded_bits gives on the codes). The step
search, the exact-size loop's first estimate and eoq.convert.allocate's curves all use it; only
error feedback, which chooses other codes than rounding, still counts real codes.

Memory: a tensor of more than two CHUNK_VALUES chunks (a vocabulary matrix) is streamed
(Problem ``stream``): it stays in the caller's dtype (bf16 from the file), and every pass
(range, histograms, codes, reconstruction sums) rotates it again chunk by chunk. Every
step is row-local and the reconstruction sums add chunk onto chunk in row order, so the
codes, steps and points are the whole-tensor path's bit for bit; only the codes (a byte a
weight) are whole. It costs a rotation per pass (~2x the time of such a tensor) and saves
three float32 copies of it.

Theory (high rate, Gaussian): a uniform quantizer with ideal entropy coding sits
0.254 bit/weight above the rate-distortion bound (the 1.53 dB space-filling loss); fixed-
rate Lloyd-Max sits further above it (0.42 bit at 4 bits).

Codes past 8 bits (docs/FORMAT.md "ecsq codes"): the level c = q - min(q) (the offset is
in the metadata) is split as c = (hi << k) | lo with k = low_bits, the fewest bits that leave
hi < 256. hi is rANS-coded as byte symbols; lo is stored raw, k bits a value (a side part
``low``, bit-packed). Whenever q spans at most 256 values k = 0 and nothing changes. Storing
lo raw costs close to nothing: k > 0 only when q spans more than 256 values, so a cell of
hi is at most (span / 128) steps wide, i.e. a few hundredths of the distribution's width,
where any smooth density is flat; the measured loss at 8 bits/weight on Gaussian rows is
under 0.1 % of the entropy (tests/test_methods.py). The step never goes below
(max - min of x) / (LEVELS - 2): levels span less than 2^16 values (k <= 8), enough for
about 12 bits per weight on Gaussian rows.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import ops
from . import ecsq_search as search
from .ecsq_codes import (LEVELS, coded_bits, counts_coded_bits, low_bits_for, merge_histograms,  # noqa: F401
                         split_bytes, split_codes, stored_code_bytes, stream_overhead_bits)
from .quantized import QuantizedTensor, block_sums, exact_sum, weighted_error, weighted_error_blocks
from . import rotation

DEFAULT_BLOCK = 512
GOLDEN = (math.sqrt(5) - 1) / 2  # golden-section search of a row group's step (Problem.best_step)
RATE_TARGET = True  # `bits` is a coded rate that side data counts against
COL_SCALE = True    # quantize() takes col_scale= (AWQ's scales applied as the rows are read)
ROW_PRIOR = 1.0      # an unseen row weighs like a token seen once (additive smoothing)
ROW_RANGE = 16.0     # row weights clipped to [gm / 16, gm * 16]: step multipliers within 4x either way
MAX_BITS = 12.0      # the largest target rate: Gaussian rows need ~2^(bits-2) * 9 < LEVELS levels
RECON_MAX = 4        # fitted reconstruction levels |q| = 1..4: where cells are wide against the density
RECON_GAIN = 0.005   # kept only if they remove >= 0.5 % of the error (32 bits each are then well spent)
RECON_RATE = 4.0     # fitted only up to this target rate: above it they never remove RECON_GAIN
# Rotated values a streamed Problem holds at a time (64 MiB in float32). A tensor of more than
# two such chunks (a vocabulary matrix: 128 256 x 4096 = 32 chunks) is rotated chunk by chunk
# on every pass instead of being held rotated: its float32 copies (rotated, divided by the
# row multipliers, the codes as floats) would cost 3 x 4 bytes a weight, 6 GiB for an 8 B
# model's head. A chunk is a multiple of whole rows (every step is row-local) and its size
# depends on the shape alone, so the result does not depend on it: the same bits as whole.
CHUNK_VALUES = 1 << 24


def streams(numel: int, hessian=None, lam=None, group_rows=None, **_) -> bool:
    """Whether quantize() takes a weight of numel values chunk by chunk (Problem's ``stream``),
    so that the caller can hand it over in its own dtype (bf16: half the float32 copy)."""
    return numel > 2 * CHUNK_VALUES and hessian is None and lam is None and not group_rows


def row_multipliers(row_importance: torch.Tensor, row_tokens: Optional[float] = None) -> torch.Tensor:
    """Step multipliers m_i (float32, geometric mean 1) from per-row weights (module docstring).
    Every sum is an exact_sum: a vocabulary's rows (> 32 768) are otherwise summed by thread,
    and the stored steps would change with the thread count."""
    rho = row_importance.double().clamp_min(0)
    n = rho.numel()
    total = exact_sum(rho)
    if total <= 0:  # nothing seen at all: every row alike
        return torch.ones(n, dtype=torch.float32)
    tokens = float(row_tokens) if row_tokens else float(n)
    rho = rho + ROW_PRIOR * total / max(tokens, 1.0)
    gm = math.exp(exact_sum(rho.log()) / n)
    rho = rho.clamp(gm / ROW_RANGE, gm * ROW_RANGE)
    m = rho.pow(-0.5)
    return (m / math.exp(exact_sum(m.log()) / n)).float()


class Problem:
    """The rotated rows of one tensor and what every trial step needs (quantize here, and the
    rate-distortion curves of eoq.convert.allocate). With row multipliers the codes are
    round(x_i / (step * m_i)): ``x`` holds the rotated rows divided by m_i, so one step serves
    every row, and the distortion is measured back in the weight's own scale.

    ``col_scale``: per-column factors the weight is multiplied by first (AWQ's scales), so that
    the scaled weight is never materialised. ``stream=True`` lets a large tensor (more than two
    CHUNK_VALUES chunks, one group, no feedback) be rotated chunk by chunk on every pass
    (``spans``) instead of held rotated: ``rotated`` and ``x`` are then None, and every pass
    goes through x_rows / rotated_rows. w may then stay in its own dtype (bf16)."""

    def __init__(self, w, block_size=None, seed=0, importance=None, group_rows=None, row_importance=None,
                 row_tokens=None, feedback_u=None, col_scale=None, stream=False):
        self.block, self.padded = rotation.choose_block(w.shape[1], int(block_size or DEFAULT_BLOCK))
        self.w, self.seed, self.imp, self.col_scale = w, seed, importance, col_scale
        self.u = feedback_u  # error feedback's factor in the rotated domain, or None
        self.rows = rows = w.shape[0]
        self.rows_w = None if row_importance is None else row_importance.double().reshape(-1, 1)
        self.m = None if row_importance is None else row_multipliers(row_importance, row_tokens).reshape(-1, 1)
        g = rows if not group_rows else int(group_rows)
        self.groups = [slice(r, min(rows, r + g)) for r in range(0, rows, g)]
        self.stored_steps = rows if self.m is not None else len(self.groups)
        span = max(1, CHUNK_VALUES // self.padded)
        self.streamed = bool(stream) and feedback_u is None and len(self.groups) == 1 and rows > 2 * span
        self.spans = [slice(r, min(rows, r + span)) for r in range(0, rows, span)] if self.streamed \
            else [slice(0, rows)]
        self.rotated = self.x = None
        if self.streamed:
            ranges = [torch.aminmax(self.x_rows(sl)) for sl in self.spans]
            lo, hi = min(float(r[0]) for r in ranges), max(float(r[1]) for r in ranges)
        else:
            self.rotated = self._rotate(self.w_rows(slice(0, rows)))
            self.x = self.rotated if self.m is None else self.rotated / self.m
            lo, hi = (float(v) for v in torch.aminmax(self.x))
        self.range = (lo, hi)  # of x: the code histograms' span (ops.code_histogram)
        self.lo = max((hi - lo) / (LEVELS - 2), 1e-30)  # q spans < LEVELS even after rounding
        self.hi = max(2.0 * max(-lo, hi), 2 * self.lo)  # every q = 0

    def _rotate(self, w: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        return rotation.rotate(w, self.block, self.padded, self.seed, overwrite)

    def w_rows(self, sl) -> torch.Tensor:
        """Rows of the weight (slice or index tensor) in float32, times col_scale."""
        w = self.w[sl].float()
        return w if self.col_scale is None else w * self.col_scale

    def rotated_rows(self, sl) -> torch.Tensor:
        """Rows of the rotated weight; computed when streamed, in a fresh tensor the caller owns
        (in place from one float32 copy of the rows: the same values as out of place)."""
        if self.rotated is not None:
            return self.rotated[sl]
        w = self.w[sl].to(torch.float32, copy=True)
        if self.col_scale is not None:
            w.mul_(self.col_scale)
        return self._rotate(w, overwrite=True)

    def x_rows(self, sl) -> torch.Tensor:
        """Rows of x (rotated, divided by the row multipliers), computed when streamed."""
        if self.x is not None:
            return self.x[sl]
        x = self.rotated_rows(sl)
        return x if self.m is None else x.div_(self.m[sl])

    def q(self, sl, step):
        return torch.round(self.x_rows(sl) / step)

    def distortion(self, sl, step):
        xs = self.x_rows(sl)
        xh = torch.round(xs / step) * step
        rows_w = None if self.rows_w is None else self.rows_w[sl]
        if self.m is not None:
            xh = xh * self.m[sl]
        x = xs if self.m is None else xs * self.m[sl]
        if self.imp is None:
            d2 = (x - xh).double().pow(2)
            return exact_sum(d2 * rows_w if rows_w is not None else d2)
        cols = self.w.shape[1]
        return weighted_error(self.w_rows(sl), rotation.unrotate(xh, self.block, cols, self.seed), self.imp, rows_w)

    def histogram(self, step, row_error: bool = True) -> tuple[int, torch.Tensor, Optional[torch.Tensor]]:
        """(qmin, counts, per-row squared errors or None) of round(x / step) over every row:
        one ops.code_histogram pass, chunk by chunk when streamed."""
        return self.histograms([step], row_error)[0]

    def histograms(self, steps, row_error: bool = True) -> list[tuple[int, torch.Tensor, Optional[torch.Tensor]]]:
        """histogram() at each of several steps; when streamed, each chunk is rotated once for
        all of them (a rate-distortion curve's grid: one rotation pass, not one per step)."""
        per_step = [[] for _ in steps]
        for sl in self.spans:
            x = self.x_rows(sl)
            for out, step in zip(per_step, steps):
                out.append(ops.code_histogram(x, step, self.range, row_error=row_error))
        result = []
        for hs in per_step:
            qmin, counts = merge_histograms([(h.qmin, h.hist) for h in hs])
            errors = None
            if row_error:
                errors = hs[0].row_error if len(hs) == 1 else torch.cat([h.row_error for h in hs])
            result.append((qmin, counts, errors))
        return result

    def rms(self) -> float:
        """The root mean square of x."""
        squares = [b for sl in self.spans for b in block_sums(self.x_rows(sl).double().pow(2))]
        return math.sqrt(math.fsum(squares) / (self.rows * self.padded))

    def split(self, steps) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """split_codes(codes(steps)) (offset, k, hi, lo); when streamed, written chunk by chunk,
        so no float copy of the codes is made. Rounding is monotonic, so the codes' range is
        round(range / step), computed by the very operation q() applies (each chunk checked)."""
        if not self.streamed:
            return split_codes(self.codes(steps))
        step = steps[0]
        offset, top = (int(v) for v in torch.round(torch.tensor(self.range, dtype=torch.float32) / step))
        if top - offset >= LEVELS:  # the step floor makes this impossible; never wrap silently
            raise AssertionError(f"ecsq codes span {top - offset + 1} values")
        k = 0 if top - offset < 256 else low_bits_for(top - offset + 1)
        hi = torch.empty(self.rows, self.padded, dtype=torch.uint8)
        lo = torch.empty(self.rows, self.padded, dtype=torch.uint8) if k else torch.zeros(0, dtype=torch.uint8)
        for sl in self.spans:
            c = self.q(sl, step) - offset
            low, high = (float(v) for v in torch.aminmax(c))
            if low < 0 or high > top - offset:  # x outside self.range: never, unless a kernel errs
                raise AssertionError(f"codes of rows {sl.start}..{sl.stop} outside [{offset}, {top}]")
            if k:
                c = c.to(torch.int32)
                hi[sl] = (c >> k).to(torch.uint8)
                lo[sl] = (c & ((1 << k) - 1)).to(torch.uint8)
            else:
                hi[sl] = c.to(torch.uint8)
        return offset, k, hi, lo

    def rate_and_spread_distortion(self, step, scale_to: Optional[tuple[int, int]] = None) -> tuple[float, float]:
        return self.rates_and_spread_distortions([step], scale_to)[0]

    def rates_and_spread_distortions(self, steps, scale_to: Optional[tuple[int, int]] = None
                                     ) -> list[tuple[float, float]]:
        """[(total_bits, weighted distortion)] of the whole tensor at each step, each from one
        rounding (a streamed tensor rotated once for all the steps). The distortion is measured in the rotated domain: sum_i rho_i ||e_i||^2 * mean_c E[a_c^2]
        * cols / padded. A random rotation spreads each row's error evenly over its columns, so
        this is the expectation of the exact distortion() without the inverse rotation and the
        float64 copies (what makes a rate-distortion curve of a whole model affordable;
        eoq.convert.allocate); measured within 0.1 % of it on Gaussian rows. ``scale_to`` = (codes,
        stored steps) of the whole tensor when these rows are a sample of it: the bits are
        then the whole tensor's (the distortion stays the sample's)."""
        codes, stored_steps = scale_to if scale_to is not None else (None, self.stored_steps)
        return [self._rate_and_spread(counts, e, codes, stored_steps) for _, counts, e in self.histograms(steps)]

    def _rate_and_spread(self, counts, e, codes, stored_steps) -> tuple[float, float]:
        bits = counts_coded_bits(counts, codes) + 32 * stored_steps
        if self.m is not None:
            e = e * self.m.reshape(-1).double().pow(2)
        if self.rows_w is not None:
            e = e * self.rows_w.reshape(-1)
        scale = exact_sum(self.imp) / self.imp.numel() if self.imp is not None else 1.0
        return bits, exact_sum(e) * scale * self.w.shape[1] / self.padded

    def weight_total(self) -> float:
        """sum_r rho_r * sum_c a_c: what the weighted distortion of an error of 1 in every
        weight would be (the divisor that makes a distortion a weighted mean square)."""
        rows = exact_sum(self.rows_w) if self.rows_w is not None else float(self.rows)
        return rows * (exact_sum(self.imp.double()) if self.imp is not None else float(self.w.shape[1]))

    def energy(self):
        """The distortion of an all-zero reconstruction (the weighted energy of w)."""
        blocks = []
        for sl in self.spans:
            w = self.w_rows(sl)
            blocks += weighted_error_blocks(w, torch.zeros_like(w), self.imp,
                                            None if self.rows_w is None else self.rows_w[sl])
        return math.fsum(blocks)

    def codes(self, steps):
        if self.u is None:
            if len(self.groups) == 1:
                return self.q(self.groups[0], steps[0])
            return torch.cat([self.q(sl, s) for sl, s in zip(self.groups, steps)])
        return self.feedback_codes(steps)[0].float()

    def feedback_codes(self, steps) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int32, reconstruction of the rotated rows) with error feedback at these steps,
        the codes clamped to the range plain rounding gives."""
        from . import feedback

        plain = torch.cat([self.q(sl, s) for sl, s in zip(self.groups, steps)])
        scale = torch.cat([torch.full((sl.stop - sl.start, 1), float(s)) for sl, s in zip(self.groups, steps)])
        if self.m is not None:
            scale = scale * self.m
        return feedback.gptq(self.rotated, self.u, scale.float().contiguous(), group=self.padded,
                             qmin=int(plain.min()), qmax=int(plain.max()))

    def rate_and_output_error(self, step, h_rot: torch.Tensor) -> tuple[float, float]:
        """(total_bits, distortion) of the whole tensor at one step *with error feedback*: the
        rate of the codes feedback chooses, and the output error sum_i rho_i e_i H e_i^T of the
        rotated rows' errors e_i (H in the rotated domain, eoq.methods.feedback.rotate_hessian). Its
        diagonal is E[a^2], the importance: for errors that do not correlate with the inputs
        this equals rate_and_spread_distortion's distortion in expectation; feedback's errors do
        correlate (they are pushed where the inputs are quiet), which only this measure sees."""
        codes, xhat = self.feedback_codes([step] * len(self.groups))
        bits = coded_bits(codes) + 32 * self.stored_steps
        e = (self.rotated - xhat).double()
        per_row = ((e @ h_rot) * e).sum(1)
        if self.rows_w is not None:
            per_row = per_row * self.rows_w.reshape(-1)
        return bits, exact_sum(per_row)

    def stored(self, steps) -> torch.Tensor:
        """The float32 steps as stored: one per group, or one per row with row multipliers."""
        if self.m is None:
            return torch.tensor(steps, dtype=torch.float32)
        return (float(steps[0]) * self.m.reshape(-1)).float()

    def total_bits(self, steps, numel):
        if self.u is not None:  # feedback chooses other codes than rounding: count those
            return coded_bits(self.codes(steps)) + 32 * self.stored_steps
        return counts_coded_bits(self.code_counts(steps)) + 32 * self.stored_steps

    def code_counts(self, steps) -> torch.Tensor:
        """The histogram of codes(steps) (plain rounding), from one pass per group and without
        the codes themselves: what every rate search measures."""
        if len(self.groups) == 1:
            return self.histogram(steps[0], row_error=False)[1]
        hists = [ops.code_histogram(self.x[sl], s, self.range, row_error=False) for sl, s in zip(self.groups, steps)]
        return merge_histograms([(h.qmin, h.hist) for h in hists])[1]

    def best_step(self, sl, lam):
        """argmin over log(step) of D + lam * R for one group (golden-section search)."""
        def cost(log_step):
            s = math.exp(log_step)
            q = self.q(sl, s)
            return self.distortion(sl, s) + lam * coded_bits(q)

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


def fit_recon(p: Problem, split: tuple[int, int, torch.Tensor, torch.Tensor], steps) -> Optional[torch.Tensor]:
    """Fitted reconstruction points for levels 1..RECON_MAX (module docstring), or None when
    they would remove less than RECON_GAIN of the error. Measured in the rotated domain with
    each row's error in the weight's scale (an orthonormal rotation keeps squared errors).
    ``split``: the codes as split_codes gives them, without low bits."""
    offset, k, codes, _ = split
    if k:
        raise ValueError("fit_recon: codes with low bits (high rates) get no fitted reconstruction")
    s = torch.cat([torch.full((sl.stop - sl.start, 1), float(st)) for sl, st in zip(p.groups, steps)])
    if p.m is not None:
        s = s * p.m
    s = s.reshape(-1)
    lo, hi = offset, offset + int(codes.max())
    top = min(RECON_MAX, max(-lo, hi))
    if top < 1:
        return None
    # Per cell m (|q| = m): S0 = sum w, S1 = sum w t sign(q), S2 = sum w t^2, w = step^2 (errors
    # in the weight's scale), t = x / step (ops.recon_sums, one pass; chunk by chunk when
    # streamed, each chunk adding onto the last's sums). A value v for the cell costs
    # S2 - 2 v S1 + v^2 S0, least at v = S1 / S0 (the conditional mean).
    sums = None
    for sl in p.spans:
        q = codes[sl].float() + offset
        sums = ops.recon_sums(p.rotated_rows(sl), q, s[sl], top, start=sums)
    s0, s1, s2 = sums[0:3 * top:3], sums[1:3 * top:3], sums[2:3 * top:3]
    before = float(sums[-1])
    mids = torch.arange(1, top + 1, dtype=torch.float64)
    fit = torch.where(s0 > 0, s1 / s0.clamp_min(1e-300), mids)
    r = fit.float()
    rr = r.double()
    gain = float(((s2 - 2 * mids * s1 + mids ** 2 * s0) - (s2 - 2 * rr * s1 + rr ** 2 * s0)).sum())
    after = before - gain
    moved = float((r - torch.arange(1, top + 1)).abs().max()) > 1e-3  # midpoints to rounding: nothing to store
    return r if moved and before > 0 and before - after >= RECON_GAIN * before else None


def quantize(w: torch.Tensor, bits, block_size=None, importance=None, seed=0, name="tensor",
             step: Optional[float] = None, lam: Optional[float] = None, group_rows: Optional[int] = None,
             row_importance: Optional[torch.Tensor] = None, row_tokens: Optional[float] = None,
             hessian: Optional[torch.Tensor] = None, damp: float = 0.01, hessian_tokens: Optional[int] = None,
             recon: bool = True, col_scale: Optional[torch.Tensor] = None, **options):
    """The QuantizedTensor of w [rows, cols] at ``bits`` (or ``step`` / ``lam``; module
    docstring). ``col_scale``: per-column factors w is multiplied by first (AWQ's scales).
    A large tensor that streams() is taken chunk by chunk (Problem): it may come in bf16."""
    if options:
        raise ValueError(f"{name}: ecsq takes no options {sorted(options)}")
    if row_importance is not None:
        if group_rows:
            raise ValueError(f"{name}: give at most one of group_rows= and row_importance= (both set row steps)")
        row_importance = torch.as_tensor(row_importance).detach().cpu().reshape(-1)
        if row_importance.numel() != w.shape[0]:
            raise ValueError(f"{name}: row_importance has {row_importance.numel()} values for {w.shape[0]} rows")
        if not bool(torch.isfinite(row_importance).all()) or bool((row_importance < 0).any()):
            raise ValueError(f"{name}: row_importance must be finite and non-negative")
    if step is not None and lam is not None:
        raise ValueError(f"{name}: give at most one of step= and lam=")
    if step is None and lam is None and not (0 < float(bits) <= MAX_BITS):
        raise ValueError(f"{name}: ecsq bits (a target coded rate) must be in (0, {MAX_BITS:g}], got {bits}")
    rows, cols = w.shape
    recon = bool(recon) and hessian is None and (step is not None or lam is not None or float(bits) <= RECON_RATE)
    p = Problem(w, block_size, seed, importance, group_rows, row_importance, row_tokens, col_scale=col_scale,
                stream=streams(w.numel(), hessian, lam, group_rows))
    if hessian is not None:
        p.u = rotation.feedback_factor(hessian, p.block, p.padded, seed, name, damp, hessian_tokens)
    numel = rows * cols
    block = p.block
    meta = {"rotation_block": block, "padded_cols": p.padded, "group_rows": 1 if p.m is not None else group_rows}

    split = None  # the codes (split_codes), once measured at the final steps
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
        if recon:  # room for the reconstruction points, should they be kept
            target -= 32 * RECON_MAX
        if len(p.groups) == 1:
            s = search._solve_single(p, numel, target)
            steps = [s]
            # the search returns the floor exactly when even the finest step stays below the target
            meta["rate_limited"] = bool(s <= p.lo)
        else:  # equal slope across groups, slope searched to meet the rate
            def steps_for(lam_):
                return [p.best_step(sl, lam_) for sl in p.groups]

            scale = exact_sum(p.x.double().pow(2)) / p.x.numel() + 1e-30  # distortion per weight at zero rate
            lam_ = search._solve(lambda l: p.total_bits(steps_for(l), numel) - target, scale * 1e-9, scale * 10,
                          tol=1e-3 * target)
            steps = steps_for(lam_)
            meta["lam"] = lam_
            meta["rate_limited"] = bool(p.total_bits([p.lo] * len(p.groups), numel) < target)
        if p.m is not None:
            meta["row_importance"] = True
        steps, split = search._meet_exactly(p, steps, target)

    split = p.split(steps) if split is None else split
    offset, k, codes, lo = split
    meta["offset"] = offset
    code_bits = max(1, math.ceil(math.log2(int(codes.max()) + 1))) if codes.numel() else 1
    side = {"steps": p.stored(steps)}
    if hessian is not None:
        meta["feedback"] = "gptq"
    if k:
        meta["low_bits"] = k
        side["low"] = ops.pack_bits(lo.reshape(-1), k)
    elif recon:
        r = fit_recon(p, split, steps)
        if r is not None:
            meta["recon"] = r.numel()
            side["recon"] = r
    return QuantizedTensor("ecsq", float(bits), (rows, cols), w.dtype, block, seed, codes, code_bits, side, meta)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    rows, cols = qt.shape
    k = int(qt.meta.get("low_bits", 0))
    q = qt.codes
    if k:
        lo = ops.unpack_bits(qt.side["low"], k, q.numel()).view(q.shape)
        q = (q.to(torch.int32) << k) | lo.to(torch.int32)
    if qt.meta.get("recon"):  # fitted reconstruction points: one value per code
        from ..standalone.load_quantized import recon_table
        q = recon_table(int(qt.meta["offset"]), qt.side["recon"])[q.long()]
    else:
        q = q.float() + qt.meta["offset"]
    steps = qt.side["steps"]
    g = rows if not qt.meta["group_rows"] else int(qt.meta["group_rows"])
    per_row = steps.repeat_interleave(g)[:rows].unsqueeze(1)
    return rotation.unrotate(q * per_row, qt.meta["rotation_block"], cols, qt.seed)
