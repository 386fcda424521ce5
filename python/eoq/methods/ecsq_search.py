"""ecsq's step search (``p``: an ecsq.Problem): the step (or per-group steps) whose coded size meets a target rate.
The rate is close to linear in log(step), so regula falsi on log(step) converges in a few
evaluations; a large tensor first solves on a sample of its rows and brackets the whole
tensor's search around that answer; the last step is widened until the real stream, not its
estimate, fits.
"""

from __future__ import annotations

import math

from .. import ops
from .ecsq_codes import counts_coded_bits, split_bytes
from .quantized import evenly_spaced_rows




SEARCH_ITERS = 48


SEARCH_SAMPLE = 1 << 20  # values the step search first runs on (_solve_bracketed): ~0.01-bit estimates


SEARCH_BRACKET = 0.03    # log2 of the bracket's half-width around the sample's step (~3x its error)


def _solve(f, lo, hi, tol, fa=None, fb=None):
    """The x in [lo, hi] where decreasing f crosses 0, searched on log(x) by regula falsi
    with the Illinois fix (rate is close to linear in log(step), so a few evaluations
    suffice); stops when |f| <= tol. f(lo) <= 0 or f(hi) >= 0 returns that end. ``fa``,
    ``fb``: f(lo), f(hi) when the caller has them."""
    a, b = math.log(lo), math.log(hi)
    fa = f(lo) if fa is None else fa
    fb = f(hi) if fb is None else fb
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


def _solve_single(p, numel: int, target: float) -> float:
    """The one step that meets the target. With feedback the plain-rounding step comes first
    (cheap) and brackets the search: feedback widens the codes, so its step is larger."""
    u, p.u = p.u, None
    s = _solve_bracketed(lambda s: p.total_bits([s], numel) - target, p, target)
    p.u = u
    if u is None:
        return s
    hi = min(p.hi, 2 * s)
    if p.total_bits([hi], numel) > target:
        hi = p.hi
    return _solve(lambda s: p.total_bits([s], numel) - target, s, hi, tol=1e-4 * target)


def _solve_bracketed(f, p, target: float) -> float:
    """_solve over [p.lo, p.hi], started from a narrow bracket around the step that meets the
    target on a sample of the rows (SEARCH_SAMPLE values, the rate scaled to the whole tensor):
    on a large tensor each evaluation is a pass over every weight, and the sample's step is
    within a few hundredths of a bit of the answer, so the whole tensor is measured ~3 times
    instead of ~7. A bracket the answer lies outside of falls back to the side it lies on."""
    tol = 1e-4 * target
    rows = p.rows
    if rows * p.padded <= 4 * SEARCH_SAMPLE or rows < 8 or len(p.groups) != 1:
        return _solve(f, p.lo, p.hi, tol)
    xs = p.x_rows(evenly_spaced_rows(rows, SEARCH_SAMPLE // p.padded)).contiguous()
    full = (rows * p.padded, p.stored_steps)

    def f_sample(step):
        return counts_coded_bits(ops.code_histogram(xs, step, p.range, row_error=False).hist, full[0]) \
            + 32 * full[1] - target

    guess = _solve(f_sample, p.lo, p.hi, tol)
    lo, hi = max(p.lo, guess * 2.0 ** -SEARCH_BRACKET), min(p.hi, guess * 2.0 ** SEARCH_BRACKET)
    if not lo < hi:
        return _solve(f, p.lo, p.hi, tol)
    f_lo = f(lo)
    if f_lo <= 0:  # the answer is a finer step than the bracket's
        return _solve(f, p.lo, lo, tol, fb=f_lo)
    f_hi = f(hi)
    if f_hi >= 0:  # a coarser one
        return _solve(f, hi, p.hi, tol, fa=f_hi)
    return _solve(f, lo, hi, tol, fa=f_lo, fb=f_hi)


def _meet_exactly(p, steps, target: float):
    """Widen the steps until the real stream (not the entropy estimate) fits the target.
    Returns (steps, their split codes).

    The estimate misses the rANS coder's model error (frequencies at 2^-12 resolution),
    a few thousandths of a bit. At high rate R ~ h - log2(step), so growing every step by
    2^(excess / n) removes about `excess` bits.
    """
    for _ in range(8):
        split = None  # (the last try's codes freed before the next: a byte a weight)
        split = p.split(steps)
        excess = 8 * split_bytes(split) + 32 * p.stored_steps - target
        if excess <= 0:
            return steps, split  # the codes of these steps: not computed again
        steps = [s * 2.0 ** (excess / split[2].numel() + 1e-4) for s in steps]
    return steps, None
