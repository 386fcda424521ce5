"""eoq: entropy-optimal quantization of LLM checkpoints.

torch is imported before the extension on purpose: the extension links libc10 and
libtorch, which are found because torch has already loaded them. Importing eoq registers
the "eoq" quantization method with transformers, so ``from_pretrained`` loads eoq folders.

Large CPU tensors go on transparent huge pages: PyTorch's own switch THP_MEM_ALLOC_ENABLE
(read once, at its first large allocation) aligns allocations of 2 MiB and more to 2 MiB and
marks them MADV_HUGEPAGE. A conversion allocates and frees block- and tensor-sized buffers
thousands of times; glibc maps each afresh, so on 4 KiB pages every one faults in page by
page (656 M minor faults, 1 487 s of system time, in an 8 B conversion) where huge pages
fault 512 times fewer. Set before torch is imported, in case it is not yet; a value the
user set (0 turns it off) is kept.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: F401,E402  (must precede the extension)


def _check_torch_version() -> None:
    """Refuse a torch other than the one the extension was compiled against.

    _C links libtorch's C++ symbols, whose ABI changes between torch releases: loading it
    under another torch fails with an undefined-symbol error at best. The build records
    its torch in _build_info.py (CMake), read here before _C is imported. A source tree
    without a build has no _build_info (and no _C): the import of _C reports that.
    """
    try:
        from ._build_info import TORCH_VERSION as built
    except ImportError:
        return
    running = torch.__version__.split("+")[0]
    if running != built:
        raise ImportError(
            f"eoq's C++ extension was built against torch {built}, but torch {running} is installed "
            f"({torch.__version__}). Reinstall eoq against this torch, from source: "
            f"`pip install --no-build-isolation --force-reinstall --no-deps eoq` "
            f"(or `pip install --no-build-isolation --force-reinstall --no-deps .` in a checkout), "
            f"or install the torch it was built for: `pip install torch=={built}`.")


_check_torch_version()

from . import _C  # noqa: E402
from . import ops
from .errors import CorruptStreamError
from .methods.quantized import QuantizedTensor
from .methods.quantize import quantize_tensor
from .convert.quant_config import ProtectRule, QuantConfig, parse_size
from .errors import FormatError
from .convert import calibrate_model, quantize_model, summary_table
from .load.loader import load_quantized, read_state_dict
from .load.hf_quantizer import register as _register

from ._version import __version__  # noqa: E402
__all__ = ["ops", "CorruptStreamError", "FormatError", "QuantizedTensor", "quantize_tensor", "QuantConfig",
           "ProtectRule", "parse_size", "calibrate_model", "quantize_model", "summary_table", "load_quantized", "read_state_dict", "__version__"]

_register()

from . import _moved  # noqa: E402

_moved.install()


def __getattr__(name: str):
    """``eoq.repo`` and the other modules of the flat layout: their new place (eoq._moved)."""
    if name in _moved.MOVED:
        return _moved.resolve(name)
    raise AttributeError(f"module 'eoq' has no attribute {name!r}")
