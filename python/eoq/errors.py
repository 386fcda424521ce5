"""Exceptions raised by eoq."""

from ._C import CorruptStreamError  # noqa: F401  (defined by the extension, a ValueError)

CorruptStreamError.__doc__ = "A coded stream (rANS, packed bits) is corrupt or truncated; the message says what is wrong."
CorruptStreamError.__module__ = "eoq"


# One class for both readers: the stand-alone loader (copied into every folder, runnable
# without eoq) defines it, and eoq's own reader uses that loader's validation code.
from .standalone.load_quantized import FormatError  # noqa: E402

FormatError.__doc__ = ("A quantized folder that is missing, damaged, or disagrees with its manifest; the message "
                       "names the file, the tensor and the problem.")
FormatError.__module__ = "eoq"
