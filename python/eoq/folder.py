"""A quantized folder opened for reading: every name confined, every header validated, every
stored byte checked before a weight is decoded from it.

``Folder(path)`` reads the manifest (validated field by field, eoq.validate), the shard
index (file names must be plain names in the folder: no ``../x``, no absolute paths) and
each safetensors header (parsed here because safetensors' Python API does not give the byte
offsets; lengths and offsets are checked against the file size before anything is read).
The stored tensors must be exactly what the manifest describes: every part of every entry
with its dtype and shape, in the file the entry names, the marker, and nothing else.
``verify()`` then checks every entry's checksum over the bytes of its parts, read in place
through a memory map (CRC-32C runs at memory speed and nothing is copied), and the side
tensors' values; ``parts(name)`` hands out the stored tensors as zero-copy views.

Every loader goes through here: ``read_state_dict``, ``load_quantized`` and ``from_pretrained``
(eoq's quantizer verifies the folder before transformers reads a weight from it).
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import struct
from typing import Iterable, Optional

import torch

from . import repo
from .errors import FormatError
from .standalone import load_quantized as _reader



def weight_files(folder: os.PathLike) -> dict[str, str]:
    """tensor name -> safetensors file, from the shard index or the single file; index entries
    must be plain file names present in the folder (the stand-alone loader's code)."""
    return _reader.weight_files(os.fspath(folder))


def read_header(path: os.PathLike) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """{key: (dtype, shape, begin, end)} of a safetensors file, offsets absolute, every length
    checked against the file before it is trusted (the stand-alone loader's parser: the
    safetensors package does not expose the offsets)."""
    return {k: (repo.dtype_from_name(d, str(path)), shape, b, e)
            for k, (d, shape, b, e) in _reader.read_header(os.fspath(path)).items()}


class Folder:
    """An eoq folder's manifest and stored tensors, cross-checked (module docstring)."""

    def __init__(self, path: os.PathLike, manifest: Optional[dict] = None):
        self.path = pathlib.Path(path)
        self.manifest = manifest if manifest is not None else repo.read_manifest(self.path)
        self.files = weight_files(self.path)
        self.headers: dict[str, tuple] = {}
        for file in sorted(set(self.files.values())):
            header = read_header(file)
            for key, spec in header.items():
                if self.files.get(key) != file:
                    raise FormatError(f"{file}: holds tensor {key!r}, which the shard index puts elsewhere or omits")
                self.headers[key] = (file,) + spec
        unstored = sorted(set(self.files) - set(self.headers))
        if unstored:
            raise FormatError(f"{self.path / repo.INDEX}: lists {unstored[0]!r} in {self.files[unstored[0]]}, "
                              "which does not hold it")
        self._maps: dict[str, mmap.mmap] = {}
        self._check_keys()

    # -- structure --------------------------------------------------------------------------

    def _check_keys(self) -> None:
        tensors, marker = self.manifest["tensors"], self.manifest.get("marker")
        expected = {}
        for name, entry in tensors.items():
            if entry["kind"] == "tied":
                continue
            specs = entry["parts"] if repo.is_quantized(entry) else {"tensor": entry}
            for part, key in repo.stored_keys(name, entry).items():
                expected[key] = (name, entry["file"], specs[part]["dtype"], specs[part]["shape"])
        if marker is not None:
            expected[marker] = (marker, tensors[marker]["file"], "uint8", [len(repo.MARKER_TEXT.encode())])
        for key, (name, file, dtype, shape) in expected.items():
            if key not in self.headers:
                raise FormatError(f"{self.path}: tensor {key!r} of {name} is missing from the weights")
            got_file, got_dtype, got_shape = self.headers[key][:3]
            if os.path.basename(got_file) != file:
                raise FormatError(f"{got_file}: holds {key!r}, which the manifest puts in {file}")
            if repo.dtype_name(got_dtype) != dtype or got_shape != list(shape):
                raise FormatError(f"{got_file}: tensor {key!r} is stored as {repo.dtype_name(got_dtype)} {got_shape}, "
                                  f"the manifest says {dtype} {list(shape)}")
        extra = sorted(set(self.headers) - set(expected))
        if extra:
            file = self.headers[extra[0]][0]
            raise FormatError(f"{file}: holds tensor {extra[0]!r}, which the manifest does not list"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))

    # -- bytes ------------------------------------------------------------------------------

    def tensor(self, key: str) -> torch.Tensor:
        """A stored tensor as a view of the file (copy-on-write map: reading copies nothing)."""
        file, dtype, shape, b, e = self.headers[key]
        if file not in self._maps:
            try:
                with open(file, "rb") as f:
                    self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as err:
                raise FormatError(f"{file}: cannot map ({err})") from err
            if len(self._maps[file]) < e:
                raise FormatError(f"{file}: shorter than its header says (truncated?)")
        m = self._maps[file]
        if e == b:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(m, dtype=dtype, count=(e - b) // dtype.itemsize, offset=b).view(shape)

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        entry = self.manifest["tensors"][name]
        return {part: self.tensor(key) for part, key in repo.stored_keys(name, entry).items()}

    def verify(self, names: Optional[Iterable[str]] = None) -> None:
        """Every checksum and side tensor (of ``names``, default all) and the marker's text."""
        tensors = self.manifest["tensors"]
        for name in (sorted(tensors) if names is None else names):
            entry = tensors[name]
            if entry["kind"] == "tied":
                got = repo.entry_checksum(name, entry, 0)
                if got != entry["checksum"]:
                    raise FormatError(f"{self.path / repo.MANIFEST}: {name}: checksum mismatch ({got}, the manifest "
                                      f"says {entry['checksum']}); the manifest is damaged")
                continue
            try:
                repo.verify(name, entry, self.parts(name))
            except FormatError as e:
                raise FormatError(f"{self.path / entry['file']}: {e}") from None
        marker = self.manifest.get("marker")
        if marker is not None and bytes(self.tensor(marker).numpy()) != repo.MARKER_TEXT.encode():
            raise FormatError(f"{self.path / tensors[marker]['file']}: the marker tensor {marker!r} is damaged")

    def dequantize(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """One verified entry, decoded (a copy: nothing returned refers to the file)."""
        entry = self.manifest["tensors"][name]
        if not repo.is_quantized(entry):
            t = self.tensor(name)
            return t.to(dtype) if dtype is not None and t.is_floating_point() and dtype != t.dtype else t.clone()
        try:
            return repo.dequantize_entry(name, entry, self.parts(name), dtype, verified=True)
        except FormatError as e:
            raise FormatError(f"{self.path / entry['file']}: {e}") from None

    def close(self) -> None:
        """Unmap the files (views still alive keep their map until they go)."""
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass
        self._maps.clear()
