"""Loading an eoq folder: ``load_quantized`` (a model) and ``read_state_dict`` (tensors).

``load_quantized`` goes through transformers' ``from_pretrained`` with eoq's registered
quantizer (eoq.load.hf_quantizer), so a model loads the same way whichever door it comes in by;
``read_state_dict`` decodes the tensors alone, verifying every checksum, without building
a model.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from ..format import repo


def load_quantized(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = torch.bfloat16,
                   device: Union[str, torch.device] = "cpu"):
    """(model, manifest) from an eoq folder (local, or a hub id when the hub is reachable)."""
    from transformers import AutoConfig

    from .hf_quantizer import register
    from ..format.sources import model_class

    register()
    path = os.fspath(path)
    manifest = repo.read_manifest(path) if os.path.isdir(path) else None
    config = AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if method != "eoq":
        raise repo.FormatError(f"{path}: config.json has no eoq quantization_config (quant_method {method!r})")
    model = model_class(config).from_pretrained(path, dtype=dtype if dtype is not None else "auto")
    model.to(device).eval()
    if manifest is None:
        manifest = model.hf_quantizer.manifest
    return model, manifest


def read_state_dict(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                    names: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """Every stored parameter of an eoq folder, verified and dequantized (tied ones omitted).
    The whole folder is checked (structure, every checksum) before anything is decoded."""
    from ..format.folder import Folder

    folder = Folder(path)
    tensors = folder.manifest["tensors"]
    if names is not None:
        unknown = sorted(set(names) - set(tensors))
        if unknown:
            raise KeyError(f"{path}: no tensor {unknown[0]!r} in the manifest")
    folder.verify(None if names is None else [n for n in names if tensors[n]["kind"] != "tied"])
    out = {}
    for name in sorted(tensors) if names is None else names:
        if tensors[name]["kind"] != "tied":
            out[name] = folder.dequantize(name, dtype)
    folder.close()
    return out
