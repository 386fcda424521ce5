"""eoq: entropy-optimal quantization of LLM checkpoints.

torch is imported before the extension on purpose: the extension links libc10 and
libtorch, which are found because torch has already loaded them.
"""

import torch  # noqa: F401  (must precede the extension)

from . import _C
from . import ops
from .errors import CorruptStreamError
from .quantized import QuantizedTensor, quantize_tensor

__version__ = "0.1.0"
__all__ = ["ops", "CorruptStreamError", "QuantizedTensor", "quantize_tensor", "__version__"]
