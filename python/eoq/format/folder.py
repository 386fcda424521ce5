"""A quantized folder opened for reading: every name confined, every header validated, every
stored byte checked before a weight is decoded from it.

``Folder(path)`` reads the manifest (validated field by field, eoq.format.validate), the shard
index (file names must be plain names in the folder: no ``../x``, no absolute paths) and
each safetensors header (parsed by hand because safetensors' Python API does not give the
byte offsets; lengths and offsets are checked against the file size before anything is
read). The stored tensors must be exactly what the manifest describes: every part of every
entry with its dtype and shape, in the file the entry names, the marker, and nothing else.
``verify()`` then checks every entry's checksum over the bytes of its parts, read in place
through a memory map (CRC-32C in C++ at memory speed; nothing is copied), and the side
tensors' values; ``parts(name)`` hands out the stored tensors as zero-copy views.

The structure checks are the stand-alone loader's (``_Folder`` in
python/eoq/standalone/load_quantized.py, which must run without eoq): eoq subclasses it and
replaces what eoq does faster (the checksums) or more (decoding with the C++ kernels).
Every loader goes through here: ``read_state_dict``, ``load_quantized`` and
``from_pretrained`` (eoq's quantizer verifies the folder before transformers reads a weight).
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import torch

from . import repo
from ..errors import FormatError
from ..standalone import load_quantized as _reader


class Folder(_reader._Folder):
    """An eoq folder's manifest and stored tensors, cross-checked (module docstring)."""

    def __init__(self, path: os.PathLike, manifest: Optional[dict] = None):
        super().__init__(path, manifest if manifest is not None else repo.read_manifest(path))

    def verify(self, names: Optional[Iterable[str]] = None) -> None:
        """Every checksum and side tensor (of ``names``, default all) and the marker's text."""
        tensors = self.manifest["tensors"]
        for name in (sorted(tensors) if names is None else names):
            entry = tensors[name]
            if entry["kind"] == "tied":
                got = repo.entry_checksum(name, entry, 0)
                if got != entry["checksum"]:
                    raise FormatError(f"{os.path.join(self.path, repo.MANIFEST)}: {name}: checksum mismatch ({got}, "
                                      f"the manifest says {entry['checksum']}); the manifest is damaged")
                continue
            try:
                repo.verify(name, entry, self.parts(name))
            except FormatError as e:
                raise FormatError(f"{os.path.join(self.path, entry['file'])}: {e}") from None
        marker = self.manifest.get("marker")
        if marker is not None and bytes(self.tensor(marker).numpy()) != repo.MARKER_TEXT.encode():
            raise FormatError(f"{os.path.join(self.path, tensors[marker]['file'])}: the marker tensor {marker!r} "
                              "is damaged")

    def dequantize(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """One verified entry, decoded (a copy: nothing returned refers to the file)."""
        entry = self.manifest["tensors"][name]
        if not repo.is_quantized(entry):
            t = self.tensor(name)
            return t.to(dtype) if dtype is not None and t.is_floating_point() and dtype != t.dtype else t.clone()
        try:
            return repo.dequantize_entry(name, entry, self.parts(name), dtype, verified=True)
        except FormatError as e:
            raise FormatError(f"{os.path.join(self.path, entry['file'])}: {e}") from None
