"""Exceptions raised by eoq."""

from ._C import CorruptStreamError  # noqa: F401  (defined by the extension, a ValueError)

CorruptStreamError.__doc__ = "A coded stream (rANS, packed bits) is corrupt or truncated; the message says what is wrong."
CorruptStreamError.__module__ = "eoq"


class FormatError(ValueError):
    """A quantized folder that is missing, damaged, or disagrees with its manifest; the message
    names the file, the tensor and the problem."""

    __module__ = "eoq"
