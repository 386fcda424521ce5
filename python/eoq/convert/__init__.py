"""Conversion: a model in, an eoq folder out (``quantize_model``).

``pipeline`` drives the stages; ``quant_config`` is what the user asks for; ``allocate`` spends
the bit budget; ``executor`` runs the per-tensor jobs (in process or on Ray); ``card`` writes
the model card; ``push`` uploads a folder.

Imports: everything below it (kernels, methods, format, calibrate, load).
"""

from .pipeline import calibrate_model, quantize_model, summary_table

__all__ = ["calibrate_model", "quantize_model", "summary_table"]
