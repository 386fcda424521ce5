"""Bits-per-weight allocation: per-tensor ecsq rates that spend the whole model's budget
while minimising the predicted loss.

Why: a uniform rate gives every tensor the same bits/weight, but tensors differ in how much
the model's output loses per bit. Minimising sum_i c_i D_i(R_i) subject to
sum_i n_i R_i = B (n_i weights, R_i bits/weight of tensor i) is solved by equal slope: every
tensor sits where one more bit per weight buys the same reduction c_i dD_i / (n_i dR_i) (a
Lagrange multiplier, the classic reverse water-filling).

Which D and c, with the Fisher pass (eoq.calibrate.sensitivity; "sensitivity", the default with
calibration): KL ~ sum_rc F_rc dW_rc^2 / 2 per token, and ecsq's rotation spreads each row's
error evenly over the row, so with sigma_r^2 row r's mean squared error KL ~ sum_r (sum_c F_rc)
sigma_r^2 / 2. Hence (ERROR_MODEL "white") D_i = sum rho_r a_c dW_rc^2 / (sum rho_r sum a_c),
the weighted mean squared error (a_c = E[x_c^2] of its inputs when activation statistics
exist, rho_r the row weights of the token embedding and output head, their Fisher row sums),
and c_i = sum F / 2: then sum_i c_i D_i is the predicted KL divergence of the output, and the
allocation minimises it. Until 2026-12 c_i was sum F W^2 / 2 over the *relative* error (D
over sum rho a W^2; "relative"), which reads the error as scaling with each weight's W^2: it
agrees when F and W^2 are uncorrelated, and under-predicted Qwen2.5-Coder-1.5B's down
projections 3.1x against gate's 1.2x, starving them (bench/kl_prediction.py, BENCHMARKS.md).
Without that pass ("proxy", the default data-free) every c_i is 1: equal slope of the layers' own relative errors, which knows
nothing of how the network amplifies an error downstream. Measured on SmolLM2-135M-
dithered's down projections at 4 bits/weight with calibration (8 WikiText-2 windows): uniform
KLD 0.0317, proxy with the absolute output error 0.071 (the residual stream grows with
depth, so it poured bits into the last layers), proxy with the relative error 0.032; the
whole-model figures of "sensitivity" are in BENCHMARKS.md.

How:
  1. ``rd_curve``: each tensor is rotated once (as ecsq does) and measured at a grid of
     uniform-quantizer steps: rate = the coded size ecsq would store (empirical entropy +
     stream overhead + side data, the same count its ``bits`` target uses), distortion =
     squared error, weighted per input channel by E[a^2] when activation statistics exist
     (measured in the rotated domain, where the rotation has spread each row's error evenly
     over the columns: ecsq.Problem.rate_and_spread_distortion), over the same weighted energy of W.
     The grid is clipped to [min_bits, max_bits].
     With error feedback (QuantConfig.feedback, the inputs' covariance H measured) the curve is
     that of the quantizer feedback makes: at each step the codes GPTQ chooses, their coded
     rate, and the output error sum rho_r e_r H e_r^T (ecsq.Problem.rate_and_output_error),
     over the same energy (diag H = E[a^2], so both measures agree for errors that do not
     correlate with the inputs, and the sensitivity coefficients keep their meaning). Feedback's
     gain is not a constant: it depends on how correlated a tensor's inputs are. Measured on
     SmolLM2-dithered at 4 bits (bench/bench_feedback_gain.py), D_feedback / D_plain is
     0.01-0.58 across its 211 weights (median 0.18 for q/k/v, 0.39 for gate/up/down), and
     allocating on feedback's curves lowers the *predicted* KL by 17 %. Each point costs a
     GPTQ pass and a rows x cols^2 product, so only FEEDBACK_POINTS steps are measured: those
     whose plain-rounding rate lies in [min_bits, max_bits], thinned evenly.
     A conversion does not use them yet (FEEDBACK_CURVES): measured on the covariance feedback
     was fitted to, the gain is overstated (about halved on other text), and allocating on it
     starved the tensors where it is overstated most: the measured KL rose (BENCHMARKS.md,
     "Part (a) with feedback").
  2. ``lower_hull``: only the lower convex hull of each curve can be an equal-slope
     solution; it also makes the greedy step below exact.
  3. ``solve``: every tensor starts at its lowest rate; hull segments of all tensors, most
     distortion removed per bit first, are taken until the budget is spent; the last one is
     taken in part (the curves are interpolated linearly between measured points). The
     rates then add up to the budget exactly.
  4. Each tensor is then quantized by ecsq with its rate as the ``bits`` target, which ecsq
     meets from below (within 1e-4 relative on large tensors; a tiny tensor's rate moves in
     steps), and what it leaves unspent is passed on: the tensors are quantized in waves
     (eoq.convert.CARRY_WAVE, tapering to one tensor at the end) and what the earlier waves
     left unspent is spread over the next wave's targets, so the model lands on the budget
     from below, within 0.5 %, while a wave's tensors run in parallel.

Traps:
  * Distortions are sums of squares whose last bits depend on how torch splits a reduction
    across threads; they are rounded to 9 significant digits so that the allocation, and so
    the output bytes, do not depend on the thread count.
  * The curve's distortion is the layer's own relative output error; how much the network
    amplifies it downstream is the coefficient's job (eoq.calibrate.sensitivity), which assumes the
    errors of different tensors add up (measured: within ~10 %, BENCHMARKS.md).
  * With AWQ the curve is measured before AWQ's scales (which depend on the rate); AWQ is
    then searched at the allocated rate.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..methods import ecsq
from ..methods.quantized import evenly_spaced_rows

# How a tensor's error becomes KL (module docstring, "Which D and c"): "white", the error
# spread evenly over each row (what the rotation does), KL = sum F / 2 x the weighted mean
# squared error; "relative", KL = sum F W^2 / 2 x the relative error, which assumes the error
# of each weight scales with W^2. Measured against each class's KL alone on Qwen2.5-Coder-1.5B
# (bench/kl_prediction.py): "relative" under-predicted the down projections 3.1x and gate
# 1.2x, "white" 1.6x and 1.0x; on SmolLM2 "white" predicts the whole model's KL within 2 %.
ERROR_MODEL = "white"
GRID = 32            # steps per curve: rates ~0.35 bit apart from 0 to max_bits + 2 bits/weight
TOP_MARGIN = 2.0     # the finest step is aimed at max_bits + 2 (the Gaussian estimate's margin)
# Whether a conversion with error feedback allocates on feedback's own curves. Off: measured on
# SmolLM2-dithered at 4 bits per parameter (AWQ + feedback, 40 windows, BENCHMARKS.md), they
# gave KL 0.161 against 0.133 on plain rounding's curves, because feedback's gain measured on
# the calibration's covariance is ~2x what holds on other text (it overfits), most on q/k/v.
# Curves measured on held-out calibration tokens are the fix this waits for.
FEEDBACK_CURVES = False
FEEDBACK_POINTS = 16  # with feedback, points measured per curve (~0.55 bit apart over 1.5-10 bits): each
                      # costs a GPTQ pass and an output-error product, rows * cols^2 flops each
FEEDBACK_MARGIN = 0.5  # bits: how far outside [min_bits, max_bits] feedback's points may start
SIG_DIGITS = 9       # distortions are rounded to this many significant digits (thread-count proof)
# A plain curve is measured on at most this many weights: evenly spaced rows of a larger
# tensor. The rate is an entropy of a distribution and the relative distortion a mean, both
# estimated from 2^20 values to ~0.01 bit and ~0.1 % (tests/test_allocate.py checks a sample
# against the whole); measuring every weight of an 8 B model's 32 steps was most of a
# conversion's time.
CURVE_SAMPLE = 1 << 20


def round_sig(x: float) -> float:
    return float(f"{x:.{SIG_DIGITS}g}")


def rd_curve(w: torch.Tensor, importance: Optional[torch.Tensor] = None, block_size: Optional[int] = None,
             seed: int = 0, min_bits: float = 2.0, max_bits: float = 8.0, row_importance=None,
             row_tokens=None, hessian: Optional[torch.Tensor] = None, damp: float = 0.01,
             hessian_tokens: Optional[int] = None, name: str = "tensor",
             absolute: bool = False) -> tuple[list[float], list[float]]:
    """(rates, relative distortions) of ecsq on weight w [rows, cols] at GRID steps, clipped to
    [min_bits, max_bits] bits/weight (end points interpolated), rates increasing. Row importance
    (an embedding's or head's) is used as ecsq uses it: row steps, and rows weighted in D.
    With ``hessian`` (the inputs' covariance) the points are those of error feedback
    (ecsq.Problem.rate_and_output_error), at FEEDBACK_POINTS of the steps (module docstring).
    With ``absolute`` the distortions are the weighted mean squared error per weight instead
    (over sum rho * sum a, not over the weighted energy of w): what ERROR_MODEL "white" needs."""
    w = w if ecsq.streams(w.numel(), hessian) and w.element_size() == 2 else w.float()  # streamed: bf16 kept
    n = w.numel()
    rows = w.shape[0]
    scale_to = None
    # A sample of rows (CURVE_SAMPLE), except for a vocabulary tensor: its row weights (token
    # frequencies) are so skewed that a few rows carry most of the weighted distortion, which
    # evenly spaced rows would mostly miss; it is measured whole.
    if hessian is None and n > CURVE_SAMPLE and rows > 1 and row_importance is None:
        w = w[evenly_spaced_rows(rows, CURVE_SAMPLE // w.shape[1])].float()
    p = ecsq.Problem(w, block_size, seed, importance, row_importance=row_importance, row_tokens=row_tokens,
                     stream=hessian is None)
    if w.shape[0] < rows:
        scale_to = (rows * p.padded, rows if p.m is not None else p.stored_steps)
    energy = (p.weight_total() if absolute else p.energy()) or 1.0
    # The finest step: where a Gaussian of the rows' RMS would cost max_bits + TOP_MARGIN bits
    # (h = log2(rms / step) + 2.05), no finer than ecsq's own floor p.lo.
    rms = p.rms()
    finest = max(p.lo, min(rms * 2.0 ** (2.05 - max_bits - TOP_MARGIN), p.hi / 2))
    lo, hi = torch.tensor([finest, p.hi]).log().tolist()  # float32, as the grid itself
    steps = [max(s, p.lo) for s in torch.linspace(lo, hi, GRID).exp().tolist()]
    plain = p.rates_and_spread_distortions(steps, scale_to)
    if hessian is None:
        pts = [(bits / n, round_sig(dist / energy)) for bits, dist in plain]
    else:
        from ..methods import feedback

        h_rot = feedback.rotate_hessian(hessian, p.block, p.padded, seed)  # as rotation.feedback_factor
        p.u = feedback.inverse_cholesky(h_rot, damp=damp, name=name, tokens=hessian_tokens)
        pts = []
        for i in _feedback_steps([bits / n for bits, _ in plain], min_bits, max_bits):
            bits, dist = p.rate_and_output_error(steps[i], h_rot)
            pts.append((bits / n, round_sig(dist / energy)))
    pts.sort()
    return _clip(pts, min_bits, max_bits)


def _feedback_steps(plain_rates: list[float], lo: float, hi: float) -> list[int]:
    """Indices of at most FEEDBACK_POINTS grid steps, evenly spread over those whose plain-
    rounding rate lies within FEEDBACK_MARGIN of [lo, hi], plus the nearest step outside on
    either side (so that the clipped curve reaches both ends: feedback widens the codes, which
    raises a step's rate by up to a few tenths of a bit at low rates)."""
    inside = [i for i, r in enumerate(plain_rates) if lo - FEEDBACK_MARGIN <= r <= hi + FEEDBACK_MARGIN]
    if not inside:  # the whole range falls between two steps, or outside the grid
        near = min(range(len(plain_rates)), key=lambda i: min(abs(plain_rates[i] - lo), abs(plain_rates[i] - hi)))
        inside = [near]
    first, last = max(inside[0] - 1, 0), min(inside[-1] + 1, len(plain_rates) - 1)
    count = last - first + 1
    if count <= FEEDBACK_POINTS:
        return list(range(first, last + 1))
    return sorted({first + round(k * (count - 1) / (FEEDBACK_POINTS - 1)) for k in range(FEEDBACK_POINTS)})


def _clip(pts: list[tuple[float, float]], lo: float, hi: float) -> tuple[list[float], list[float]]:
    """The piecewise-linear curve through pts restricted to rates in [lo, hi]."""
    def at(r):
        for (r0, d0), (r1, d1) in zip(pts, pts[1:]):
            if r0 <= r <= r1:
                return d0 if r1 == r0 else d0 + (d1 - d0) * (r - r0) / (r1 - r0)
        return None

    inside = [(r, d) for r, d in pts if lo < r < hi]
    for edge in (lo, hi):
        d = at(edge)
        if d is not None:
            inside.append((edge, round_sig(d)))
    if not inside:  # the whole curve lies outside: keep the nearest end
        inside = [min(pts, key=lambda p: min(abs(p[0] - lo), abs(p[0] - hi)))]
    inside.sort()
    return [r for r, _ in inside], [d for _, d in inside]


def lower_hull(rates: list[float], dists: list[float]) -> list[tuple[float, float]]:
    """Vertices of the lower convex hull of the points, rates increasing and distortion
    strictly decreasing (points that cost bits without removing error are dropped)."""
    hull: list[tuple[float, float]] = []
    for r, d in sorted(zip(rates, dists)):
        if hull and d >= hull[-1][1]:
            continue  # more bits, no less error
        while len(hull) >= 2:
            (r0, d0), (r1, d1) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the chord from hull[-2] to (r, d)
            if (d1 - d0) * (r - r0) >= (d - d0) * (r1 - r0):
                hull.pop()
            else:
                break
        hull.append((r, d))
    return hull


def hull_value(rates: list[float], dists: list[float], r: float) -> float:
    """The distortion at rate r on the curve's lower hull (interpolated; held at the ends)."""
    h = lower_hull(rates, dists)
    if r <= h[0][0]:
        return h[0][1]
    for (r0, d0), (r1, d1) in zip(h, h[1:]):
        if r <= r1:
            return d0 + (d1 - d0) * (r - r0) / (r1 - r0)
    return h[-1][1]


def solve(curves: dict[str, tuple[int, list[float], list[float]]], budget_bits: float) -> dict[str, float]:
    """Rates (bits/weight) per tensor with sum n_i R_i = budget_bits, equal slope on the
    lower hulls. curves: name -> (weights, rates, distortions)."""
    hulls = {name: lower_hull(r, d) for name, (_, r, d) in curves.items()}
    rate = {name: h[0][0] for name, h in hulls.items()}
    floor = sum(curves[name][0] * r for name, r in rate.items())
    ceil = sum(curves[name][0] * h[-1][0] for name, h in hulls.items())
    if budget_bits < floor * (1 - 1e-12):
        raise ValueError(f"size target {budget_bits / 8:.0f} bytes is below what the lowest allowed rate "
                         f"gives ({floor / 8:.0f} bytes); raise bits or lower the allocation's min_bits")
    if budget_bits >= ceil:
        return {name: h[-1][0] for name, h in hulls.items()}
    segments = []
    for name, h in sorted(hulls.items()):
        n = curves[name][0]
        for i, ((r0, d0), (r1, d1)) in enumerate(zip(h, h[1:])):
            segments.append(((d0 - d1) / (n * (r1 - r0)), name, i, n * (r1 - r0)))
    # Most error removed per bit first; within one convex hull that is the hull's own order.
    segments.sort(key=lambda s: (-s[0], s[1], s[2]))
    left = budget_bits - floor
    for _, name, i, cost in segments:
        h = hulls[name]
        if cost <= left:
            rate[name] = h[i + 1][0]
            left -= cost
        else:
            rate[name] = h[i][0] + left / curves[name][0]
            break
    return rate


__all__ = ["rd_curve", "lower_hull", "hull_value", "solve", "round_sig"]
