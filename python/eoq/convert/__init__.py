"""Conversion: a model in, an eoq folder out (``quantize_model``).

In the order a tensor meets them: ``quant_config`` (what the user asks for), ``plan`` (what
happens to each parameter, the budget checked), ``calibration`` (the calibrate stage run for a
conversion, resumable), ``rates`` with ``allocate`` (the budget spent by equal slope), ``jobs``
on an ``executor`` (the per-tensor work, in process or on Ray), ``partial`` (what a resumed run
starts from), ``write`` (shards, manifest, config, loader, ``card``), ``summary`` (the table);
``pipeline`` drives them. ``push`` uploads a finished folder.

Imports: everything below it (kernels, methods, format, calibrate, load).
"""

from .calibration import calibrate_model
from .pipeline import quantize_model
from .summary import summary_table

__all__ = ["calibrate_model", "quantize_model", "summary_table"]

# What the one-module eoq.convert (up to 0.1.0) held, and where each name lives now: an old
# ``from eoq.convert import tensor_seed`` still works, with a DeprecationWarning naming the place.
_MOVED = {
    **dict.fromkeys(("tensor_seed", "stored_dtype", "importance_for", "stats_for", "feedback_options",
                     "tied_entry", "row_importance_for", "budget_bits", "check_budget", "check_settings"), "plan"),
    **dict.fromkeys(("TensorJob", "tensor_job", "run_tensor_job", "weights_bar", "cached_curve", "CurveJob",
                     "curve_job", "run_curve_job"), "jobs"),
    **dict.fromkeys(("CARRY_WAVE", "waves", "wave_bits", "allocate_rates"), "rates"),
    **dict.fromkeys(("Partial", "atomic_write"), "partial"),
    **dict.fromkeys(("FAULT_SENSITIVITY_ENV", "has_covariance", "calibrate", "block_runner", "activation_stats",
                     "sensitivity_of"), "calibration"),
    **dict.fromkeys(("stored_tensors", "write_shards", "totals", "write_config"), "write"),
    "FAULT_ENV": "pipeline", "run_line": "summary",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        from .._moved import warn

        where = f"eoq.convert.{_MOVED[name]}"
        warn(f"eoq.convert.{name}", f"{where}.{name}", stacklevel=2)
        return getattr(importlib.import_module(where), name)
    raise AttributeError(f"module 'eoq.convert' has no attribute {name!r}")
