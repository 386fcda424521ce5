"""eoq: entropy-optimal quantization of LLM checkpoints.

torch is imported before the extension on purpose: the extension links libc10 and
libtorch, which are found because torch has already loaded them. Importing eoq registers
the "eoq" quantization method with transformers, so ``from_pretrained`` loads eoq folders.
"""

import torch  # noqa: F401  (must precede the extension)

from . import _C
from . import ops
from .errors import CorruptStreamError
from .quantized import QuantizedTensor, quantize_tensor
from .quant_config import ProtectRule, QuantConfig, parse_size
from .repo import FormatError
from .convert import calibrate_model, quantize_model, summary_table
from .loading import load_quantized, read_state_dict
from .hf_quantizer import register as _register

__version__ = "0.1.0"
__all__ = ["ops", "CorruptStreamError", "FormatError", "QuantizedTensor", "quantize_tensor", "QuantConfig",
           "ProtectRule", "parse_size", "calibrate_model", "quantize_model", "summary_table", "load_quantized", "read_state_dict", "__version__"]

_register()
