"""Loading an eoq folder: ``load_quantized`` (a model) and ``read_state_dict`` (tensors).

``load_quantized`` goes through transformers' ``from_pretrained`` with eoq's registered
quantizer (eoq.hf_quantizer), so a model loads the same way whichever door it comes in by;
``read_state_dict`` decodes the tensors alone, verifying every checksum, without building
a model.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from . import repo


def load_quantized(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = torch.bfloat16,
                   device: Union[str, torch.device] = "cpu"):
    """(model, manifest) from an eoq folder (local, or a hub id when the hub is reachable)."""
    from transformers import AutoConfig

    from .hf_quantizer import register
    from .sources import model_class

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
    """Every stored parameter of an eoq folder, verified and dequantized (tied ones omitted)."""
    from safetensors import safe_open

    manifest = repo.read_manifest(path)
    files = repo.weight_files(path)
    handles = {}
    out = {}
    for name, entry in manifest["tensors"].items():
        if entry["kind"] == "tied" or (names is not None and name not in names):
            continue
        keys = [f"{name}.{p}" for p in entry["parts"]] if repo.is_quantized(entry) else [name]
        parts = {}
        for key in keys:
            if key not in files:
                raise repo.FormatError(f"{path}: tensor {key!r} of {name} is missing from the weights")
            file = files[key]
            try:
                if file not in handles:
                    handles[file] = safe_open(file, "pt")
                t = handles[file].get_tensor(key)
            except Exception as e:
                raise repo.FormatError(f"{file}: cannot read {key!r} ({e})") from e
            parts[key[len(name) + 1:] if repo.is_quantized(entry) else "tensor"] = t
        out[name] = repo.dequantize_entry(name, entry, parts, dtype)
    return out
