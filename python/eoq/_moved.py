"""Where the modules of eoq's flat layout (up to 0.1.0) went, and the import hook that keeps
``import eoq.repo`` and ``from eoq import repo`` working: the old name is the new module
itself (the same object), with a DeprecationWarning naming the new place. ``eoq.calibration``
and ``eoq.testmodels`` are documented names and stay without a warning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "quantized": "methods.quantized", "awq": "methods.awq", "feedback": "methods.feedback",
    "repo": "format.repo", "validate": "format.validate", "folder": "format.folder", "fused": "format.fused",
    "sources": "format.sources", "gguf_weights": "format.gguf_weights",
    "calibration": "calibrate.statistics", "sensitivity": "calibrate.sensitivity",
    "blockwise": "calibrate.blockwise", "sampling_blockwise": "calibrate.sampling_blockwise",
    "sampling_checkpoint": "calibrate.sampling_checkpoint", "fisher_checkpoint": "calibrate.fisher_checkpoint",
    "stored_inputs": "calibrate.stored_inputs", "streamed_vocab": "calibrate.streamed_vocab",
    "allocate": "convert.allocate", "executor": "convert.executor", "quant_config": "convert.quant_config",
    "card": "convert.card", "push": "convert.push",
    "loading": "load.loader", "hf_quantizer": "load.hf_quantizer",
    "embeddings": "evaluate.embeddings",
    "testmodels": "testing.models", "dithered": "testing.dithered",
}
QUIET = {"calibration", "testmodels"}  # public names: no warning


def warn(old: str, new: str, stacklevel: int) -> None:
    """The DeprecationWarning of a name that moved: ``old`` is at ``new`` now."""
    warnings.warn(f"{old} moved to {new}; import it from there", DeprecationWarning, stacklevel=stacklevel + 1)


def resolve(old: str):
    """The module an old name ``eoq.<old>`` stands for (imported), warning unless public."""
    new = "eoq." + MOVED[old]
    if old not in QUIET:
        warn(f"eoq.{old}", new, stacklevel=3)
    return importlib.import_module(new)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        pkg, _, old = fullname.partition(".")
        if pkg != "eoq" or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def __init__(self):
        self._own: dict = {}  # old name -> the new module's own spec, between the two calls below

    def create_module(self, spec):
        module = resolve(spec.name.partition(".")[2])
        self._own[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # the new module ran when it was imported; the import system has just set its
        # __spec__ to the old name's: give it back its own (pickling, reload, tracebacks)
        module.__spec__ = self._own.pop(module.__spec__.name)


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
