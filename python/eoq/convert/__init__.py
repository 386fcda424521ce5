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
