"""Loading an eoq folder: ``load_quantized`` / ``read_state_dict`` (``loader``) and the
transformers quantizer behind ``from_pretrained`` (``hf_quantizer``).

Imports: kernels, methods and format only.
"""

from .loader import load_quantized, read_state_dict

__all__ = ["load_quantized", "read_state_dict"]
