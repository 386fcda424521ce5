"""Spending the budget: every allocated tensor's rate-distortion curve measured (on the
executor), scaled by its sensitivity, and the rates chosen by equal slope (eoq.convert.allocate),
kept as allocation.json so a resumed run uses the same rates; then the waves the tensors are
quantized in, each carrying what the earlier waves left unspent.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

from ..calibrate.sensitivity import Sensitivity
from ..format import repo
from ..format.sources import Source
from . import allocate
from .executor import LocalExecutor
from .jobs import curve_job, run_curve_job, weights_bar
from .partial import Partial, atomic_write
from .plan import budget_bits
from .quant_config import QuantConfig


def allocate_rates(source: Source, config: QuantConfig, partial: "Partial", plans: dict, entries: dict,
                   stats: Optional[dict], sens: Optional[Sensitivity], progress: bool,
                   curve_cache: Optional[pathlib.Path] = None, executor=None) -> dict:
    """Per-tensor ecsq rates for the tensors the default setting quantizes, so that the whole
    folder's stored tensors meet the budget. The fixed part (passthrough tensors, protect rules,
    the marker) is already in ``entries`` with its real size. Computed once and kept in the
    partial folder, so that a resumed run uses the same rates. The curves are measured on
    ``executor`` (eoq.convert.executor; default: in this process)."""
    executor = executor or LocalExecutor()
    path = partial.root / "allocation.json"
    if path.is_file():
        return json.loads(path.read_text())
    lo, hi = config.allocation_range
    names = [n for n in source.names if plans[n]["action"] == "quantize" and plans[n]["kind"] == "quantized"]
    fixed = sum(e["stored_bytes"] for n, e in entries.items() if n not in names)
    fixed += len(repo.MARKER_TEXT.encode()) if names or any(repo.is_quantized(e) for e in entries.values()) else 0
    budget = budget_bits(source, config)
    sizes = {n: source.spec(n).numel() for n in names}  # (each header read once)
    weights = sum(sizes.values())
    left = budget - 8 * fixed
    if weights and left < lo * weights * (1 - 1e-9):
        raise ValueError(f"{source.name}: after the fixed tensors ({fixed / 1e6:.3f} MB: passthrough, protect rules) "
                         f"the budget leaves {left / 8 / 1e6:.3f} MB for {weights:,} weights, below "
                         f"allocation_range[0] = {lo} bits/weight; raise the budget")
    mode, note = config.allocation, None
    if mode == "sensitivity" and (sens is None or not sens.tokens):
        mode, note = "proxy", ("no calibration (data-free)" if config.data_free else
                               "the model has no output distribution to differentiate, or no calibration ran")
        import warnings
        warnings.warn(f"{source.name}: sensitivity allocation needs the Fisher pass, which did not run ({note}); "
                      f"allocating by each tensor's own relative error instead", stacklevel=3)
    result = {"mode": mode, "requested": config.allocation, "budget_bits": budget, "fixed_bytes": fixed,
              "weights": weights, "tensors": len(names), "range": [lo, hi]}
    if note:
        result["note"] = note
    if mode == "uniform" or not names:
        rate = min(left / max(weights, 1), hi)
        rates = {n: rate for n in names}
    else:
        with_feedback = [0]  # tensors whose curve is error feedback's
        # with the Fisher sums the error model decides the curves' unit (allocate.ERROR_MODEL)
        white = mode == "sensitivity" and allocate.ERROR_MODEL == "white"

        def jobs():
            for n in names:
                job = curve_job(source, config, plans, n, stats, sens, curve_cache, absolute=white)
                with_feedback[0] += bool(job.feedback)
                yield job

        measured = {}
        with weights_bar(source, names, "allocate", progress) as bar:
            for i, curve in executor.map(run_curve_job, jobs()):
                measured[names[i]] = curve
                bar.update(sizes[names[i]])
        curves = {}
        for name in names:  # in the tensors' order, whatever order the curves came in
            rates_, dists = measured[name]
            c = 1.0 if mode != "sensitivity" else sens.white_coefficient(name) if white else sens.coefficient(name)
            curves[name] = (sizes[name], rates_, [allocate.round_sig(d * c) for d in dists])
        rates = allocate.solve(curves, left)
        result["feedback_curves"] = with_feedback[0]
        if mode == "sensitivity":  # what the linear model predicts for this allocation
            result["predicted_kl"] = allocate.round_sig(sum(allocate.hull_value(curves[n][1], curves[n][2], r)
                                                            for n, r in rates.items()))
    result.update({"min_bits": min(rates.values(), default=None), "max_bits": max(rates.values(), default=None),
                   "rates": dict(sorted(rates.items()))})
    atomic_write(path, json.dumps(result, sort_keys=True))
    return result


# The allocated tensors are quantized in waves, in their order. ecsq meets a rate from below,
# so each tensor leaves a little of its rate unspent; that is passed on so that the whole model
# lands on its budget. Passing it to the very next tensor would chain every tensor to the one
# before; a wave's tensors depend only on the waves before it, so a wave runs in parallel
# (eoq.convert.executor). Waves hold CARRY_WAVE tensors (32: enough work for a cluster), except the
# last ones, which halve down to a single tensor (..., 32, 16, 8, 4, 2, 1): the last wave's
# shortfall has nowhere to go, so it must be one tensor's, as when every tensor passed its
# shortfall to the next. Equal waves of 32 missed the budget by 0.86 % on a 16-tensor model
# (one wave: nothing carried); the taper costs log2(32) = 5 small waves at the end.
CARRY_WAVE = 32


def waves(names: list[str]) -> list[list[str]]:
    """`names` in consecutive waves: CARRY_WAVE each, then halving to 1 at the end (the first
    wave takes what is left over)."""
    sizes, left, size = [], len(names), 1
    while left > 0:  # from the end: 1, 2, 4, ..., CARRY_WAVE, CARRY_WAVE, ...
        sizes.append(min(size, left))
        left -= sizes[-1]
        size = min(2 * size, CARRY_WAVE)
    out, i = [], 0
    for size in reversed(sizes):
        out.append(names[i:i + size])
        i += size
    return out


def wave_bits(wave: list[str], before: list[str], rates: dict, entries: dict, specs: dict, hi: float) -> dict:
    """The bits each tensor of `wave` is quantized at: its allocated rate plus, spread evenly over
    the wave's weights, what the tensors of the earlier waves (`before`, all finished) left
    unspent; at most `hi`. A function of finished entries alone, so a resumed run, and any
    order of execution, gives the same bits."""
    carry = sum(rates[n] * repo.entry_numel(entries[n]) - 8 * entries[n]["stored_bytes"] for n in before)
    weights = sum(specs[n].numel() for n in wave)
    return {n: min(rates[n] + carry / max(weights, 1), hi) for n in wave}
