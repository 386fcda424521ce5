"""transformers integration: ``from_pretrained`` of an eoq folder after ``import eoq``.

Registered through transformers' public ``register_quantization_config`` /
``register_quantizer`` for ``quant_method: "eoq"``. transformers' loader (5.x) matches
checkpoint keys against ``WeightConverter`` patterns: every ``P.codes`` / ``P.<side>`` of a
quantized parameter ``P`` is collected for target ``P`` and handed to ``EoqDequantize``,
which verifies and decodes them with the C++ kernels (repo.dequantize_entry) into a dense
weight of the parameter's dtype. The weights are dequantized on load: the model computes
with ordinary Linear layers.

The recipe of each parameter comes from ``quant_manifest.json`` next to the weights
(fetched from the hub with the weights when the folder is remote). The marker tensor
(docs/FORMAT.md) is routed to the same converter and ignored.

Integrity: before transformers reads a weight, ``preprocess_model`` opens the folder with
eoq.format.folder (manifest validated, names confined, every stored tensor and checksum verified,
passthrough tensors included, which transformers then loads as they are) and checks that
every parameter of the model has an entry, so none is left at its random initialisation.

Errors: transformers catches every exception raised inside a converter and replaces it by a
generic "We encountered some issues during automatic conversion" RuntimeError, the real
message going to a log. So a converter that fails records its FormatError and hands back an
empty placeholder; transformers, seeing the placeholder's shape differ from the parameter's,
asks ``param_needs_quantization``, which raises the recorded error itself, out of
``from_pretrained``, message intact.

Saving: the loaded model is dense, so it saves like any other. ``save_pretrained`` asks the
quantizer for its state dict (``get_state_dict_and_metadata``) before it writes config.json;
the quantizer then lets go of the model (``remove_quantization_config``: no ``hf_quantizer``,
no ``quantization_config``), and transformers writes a plain folder of the dense weights in the
model's dtype. transformers reverses the load-time conversions on saving
(``revert_weight_conversion``); the reverse of eoq's (``EoqConverter.reverse_transform``) is
the dense weight under its own name, so a model whose quantizer was detached by hand saves
too. ``eoq decode`` writes the same folder from the files alone (eoq.load.decode).
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..format import repo

SIDE_PARTS = ("codes", "scales", "steps", "codebook", "awq_scales", "low", "recon")


class EoqConfig(QuantizationConfigMixin):
    """What config.json's ``quantization_config`` holds for an eoq folder (its QuantConfig
    and format version); loading needs nothing from the user."""

    def __init__(self, format_version: int = repo.FORMAT_VERSION, **kwargs):
        self.quant_method = "eoq"
        self.format_version = format_version
        for k, v in kwargs.items():
            if k != "quant_method":
                setattr(self, k, v)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class EoqDequantize(ConversionOps):
    def __init__(self, hf_quantizer: "EoqHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo):
        # transformers deep-copies the converter once per parameter; the quantizer (and its
        # manifest) is shared state, and copying it made loading quadratic in the tensor count
        return EoqDequantize(self.hf_quantizer)

    def convert(self, input_dict: dict, model=None, full_layer_name: Optional[str] = None, **kwargs):
        q = self.hf_quantizer
        entry = None
        try:
            name, entry = q.entry_for(full_layer_name)
            parts = {}
            for pattern, tensors in input_dict.items():
                part = pattern.rpartition(".")[2]
                if part in SIDE_PARTS:
                    parts[part] = tensors[0] if isinstance(tensors, list) else tensors
            dtype = None
            if model is not None:
                module_name, _, attr = full_layer_name.rpartition(".")
                dtype = getattr(model.get_submodule(module_name), attr).dtype
            return {full_layer_name: repo.dequantize_entry(name, entry, parts, dtype, verified=q.verified)}
        except Exception as e:  # surfaced by param_needs_quantization (module docstring)
            where = os.path.join(q.folder, entry["file"]) if entry is not None else q.folder
            e = repo.FormatError(f"{where}: {e}" if isinstance(e, repo.FormatError) else
                                 f"{where}: {full_layer_name}: cannot load ({type(e).__name__}: {e})")
            q.pending_error = q.pending_error or e
            return {full_layer_name: torch.empty(0)}


class EoqConverter(WeightConverter):
    """eoq's converter: its reverse, for saving, leaves the dense weight as it is."""

    def reverse_transform(self):
        targets = self._original_target_patterns
        return WeightRenaming([re.escape(t) for t in targets], targets)  # the identity


class EoqHfQuantizer(HfQuantizer):
    requires_calibration = True  # eoq folders are made by eoq.quantize_model, not on the fly
    serialized_names = {"weight": [f"weight.{p}" for p in SIDE_PARTS]}

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.manifest: Optional[dict] = None
        self.verified = False
        self.folder = ""
        self.pending_error: Optional[Exception] = None
        self._names: dict[str, str] = {}

    def validate_environment(self, *args, **kwargs):
        version = getattr(self.quantization_config, "format_version", None)
        if version != repo.FORMAT_VERSION:
            raise repo.FormatError(f"this eoq folder has format version {version!r}; this eoq reads version "
                                   f"{repo.FORMAT_VERSION}: convert the model again with this eoq, or use the "
                                   "eoq that wrote it")

    def preprocess_model(self, model, dtype=None, checkpoint_files=None, **kwargs):
        from ..format.folder import Folder

        self.folder = self._folder(model, checkpoint_files)
        folder = Folder(self.folder)
        folder.verify()
        folder.close()
        self.manifest, self.verified, self.pending_error = folder.manifest, True, None
        self._names = self._name_map(model)
        return super().preprocess_model(model, dtype=dtype, **kwargs)

    @staticmethod
    def _folder(model, checkpoint_files) -> str:
        if checkpoint_files:
            folder = os.path.dirname(checkpoint_files[0])
            if os.path.isfile(os.path.join(folder, repo.MANIFEST)):
                return folder
        from transformers.utils import cached_file

        path = cached_file(model.config.name_or_path, repo.MANIFEST, _raise_exceptions_for_missing_entries=False)
        if path is None:
            raise repo.FormatError(f"{model.config.name_or_path}: {repo.MANIFEST} is missing next to the weights")
        return os.path.dirname(path)

    def _name_map(self, model) -> dict[str, str]:
        """model state_dict key -> manifest name (tolerating a base-model prefix difference);
        a key no entry covers would keep its random initialisation: an error."""
        tensors = self.manifest["tensors"]
        where = os.path.join(self.folder, repo.MANIFEST)
        out = {}
        for key, param in model.state_dict().items():
            found = [key] if key in tensors else [n for n in tensors if n.endswith("." + key) or key.endswith("." + n)]
            if len(found) != 1:
                raise repo.FormatError(f"{where}: the model's parameter {key!r} has "
                                       f"{'no entry' if not found else 'several entries'}; "
                                       "it would not be loaded from the folder")
            # the config decides what the model holds; an entry claiming more is refused before decoding
            if list(param.shape) != tensors[found[0]]["shape"]:
                raise repo.FormatError(f"{where}: {found[0]} has shape {tensors[found[0]]['shape']}, the model's "
                                       f"parameter {key!r} has {list(param.shape)}")
            out[key] = found[0]
        return out

    def entry_for(self, param: str) -> tuple[str, dict]:
        """The manifest entry of a model parameter."""
        name = self._names.get(param)
        if name is None:
            raise repo.FormatError(f"{param}: quantized parts found but the manifest has no entry for it")
        return name, self.manifest["tensors"][name]

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pending_error is not None:  # a converter failed: raise its error here (module docstring)
            error, self.pending_error = self.pending_error, None
            raise error
        return False

    def get_weight_conversions(self):
        return [EoqConverter(self.serialized_names["weight"], "weight", [EoqDequantize(self)])]

    def update_weight_conversions(self, weight_conversions, model):
        extra = []
        marker = (self.manifest or {}).get("marker")
        if marker:  # the marker goes to its parameter's converter, which ignores it
            extra.append(EoqConverter(re.escape(marker) + "$", marker, [EoqDequantize(self)]))
        return list(weight_conversions) + extra + self.get_weight_conversions()

    def is_serializable(self):
        return True  # as a plain model (module docstring)

    def get_state_dict_and_metadata(self, model):
        """save_pretrained's first step: the quantizer lets go, so that config.json is written
        without quantization_config; the state dict is the model's own."""
        self.remove_quantization_config(model)
        return None, {}

    def remove_quantization_config(self, model):
        """transformers' detach, keeping the load-time conversions: eoq's reverse to the
        identity, the model's own (renamings) are still reversed when it is saved."""
        conversions = getattr(model, "_weight_conversions", None)
        super().remove_quantization_config(model)
        if conversions is not None:
            model._weight_conversions = conversions

    def _dequantize(self, model, dtype=None):
        return model  # the weights were decoded on load; ``model.dequantize()`` only detaches

    @property
    def is_trainable(self) -> bool:
        return False


_REGISTERED = False


def register() -> None:
    """Register eoq with transformers (idempotent; ``import eoq`` does it)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if "eoq" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("eoq")(EoqConfig)
    if "eoq" not in AUTO_QUANTIZER_MAPPING:
        register_quantizer("eoq")(EoqHfQuantizer)
    _REGISTERED = True
