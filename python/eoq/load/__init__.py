"""Loading an eoq folder: ``load_quantized`` / ``read_state_dict`` (``loader``), the
transformers quantizer behind ``from_pretrained`` and the loaded model's ``save_pretrained``
(``hf_quantizer``), and ``eoq decode``: the folder as a plain 16-bit one (``decode``).

Imports: kernels, methods and format only.
"""

from .loader import load_quantized, read_state_dict

__all__ = ["load_quantized", "read_state_dict"]
