"""Quantization methods behind eoq.quantize_tensor. Each module has
``quantize(w, bits, block_size, importance, seed, name, **options) -> QuantizedTensor`` and
``dequantize(qt) -> float32 tensor``.

- absmax: symmetric block absmax (EOQ Q-k), optional importance-weighted scale search.
- polar:  PolarQuant: per-block L2 norm, Walsh-Hadamard, Lloyd-Max for N(0, 1).
- turbo:  TurboQuant-mse: per-row/group norm, seeded random rotation, Lloyd-Max for the
          law of one coordinate of a random unit vector.
- ecsq:   randomised Hadamard, uniform quantizer with a rate-distortion chosen step,
          rANS-coded (the default).
"""

from . import absmax
from . import ecsq
from . import polar
from . import turbo

from .quantized import DEQUANTIZERS

METHODS = {"absmax": absmax, "polar": polar, "turbo": turbo, "ecsq": ecsq}
DEQUANTIZERS.update({name: module.dequantize for name, module in METHODS.items()})

__all__ = ["METHODS"]
