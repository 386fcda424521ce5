"""The quantized model folder (repo format 1, docs/FORMAT.md): manifest entries, checksums,
and the decoding of one entry back into a weight.

Both directions live here so that what the writer records is exactly what the readers
check: an entry is built from a QuantizedTensor and its stored parts, and a QuantizedTensor
is rebuilt from an entry and the parts read back, after the checksum and every shape and
dtype the manifest promises have been verified.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import zlib
from typing import Optional

import torch

from . import ops
from .errors import CorruptStreamError
from .quantized import QuantizedTensor, code_entropy_bits

FORMAT = "eoq"
FORMAT_VERSION = 1
MANIFEST = "quant_manifest.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MARKER_TEXT = "eoq-quantized weights: `import eoq` before from_pretrained, or use load_quantized.py"
QUANTIZED_KINDS = ("quantized", "protected")


class FormatError(ValueError):
    """A quantized folder that is missing, damaged, or disagrees with its manifest."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, where: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"{where}: unknown dtype {name!r}")
    return dt


def entry_numel(entry: dict) -> int:
    return math.prod(entry["shape"])


def entry_itemsize(entry: dict) -> int:
    return torch.empty(0, dtype=dtype_from_name(entry["dtype"], "entry")).element_size()


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes safetensors stores for t."""
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def checksum(tensors: list[torch.Tensor]) -> str:
    crc = 0
    for t in tensors:
        crc = zlib.crc32(tensor_bytes(t), crc)
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


def part_order(parts: dict) -> list[str]:
    """codes first, then the side parts by name: the order the checksum covers."""
    return (["codes"] if "codes" in parts else []) + sorted(p for p in parts if p != "codes")


def is_quantized(entry: dict) -> bool:
    return entry.get("kind") in QUANTIZED_KINDS and "method" in entry


# ---- writing -------------------------------------------------------------------------------


def choose_codec(qt: QuantizedTensor, codec: str) -> tuple[str, torch.Tensor]:
    """The stored codes: ``auto`` keeps whichever of rANS and fixed-rate packing is smaller
    (ties to rANS); ecsq's codes only make sense entropy-coded, but packing is still exact."""
    if codec in ("rans", "packed"):
        return codec, qt.code_stream(codec)
    rans, packed = qt.code_stream("rans"), qt.code_stream("packed")
    return ("rans", rans) if rans.numel() <= packed.numel() else ("packed", packed)


def quantized_entry(qt: QuantizedTensor, codec: str, kind: str, transposed: bool, shape, rule: Optional[str]
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest entry, stored parts) for one quantized parameter."""
    codec, stream = choose_codec(qt, codec)
    parts = {"codes": stream, **{k: v.contiguous() for k, v in qt.side.items()}}
    stored = sum(t.numel() * t.element_size() for t in parts.values())
    rows, cols = qt.shape
    entry = {
        "kind": kind, "method": qt.method, "bits": qt.bits, "block_size": qt.block_size, "seed": qt.seed,
        "shape": list(shape), "dtype": dtype_name(qt.dtype), "transposed": transposed, "qshape": [rows, cols],
        "code_shape": list(qt.codes.shape), "code_bits": qt.code_bits, "codec": codec,
        "parts": {k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for k, t in parts.items()},
        "meta": qt.meta, "code_entropy": round(code_entropy_bits(qt.codes), 6), "stored_bytes": stored,
        "bits_per_weight": round(8.0 * stored / (rows * cols), 6),
        "checksum": checksum([parts[p] for p in part_order(parts)]),
    }
    if rule is not None:
        entry["rule"] = rule
    return entry, parts


def plain_entry(t: torch.Tensor, kind: str, reason: Optional[str] = None, rule: Optional[str] = None) -> dict:
    entry = {"kind": kind, "shape": list(t.shape), "dtype": dtype_name(t.dtype),
             "stored_bytes": t.numel() * t.element_size(), "checksum": checksum([t])}
    if reason:
        entry["reason"] = reason
    if rule:
        entry["rule"] = rule
    return entry


# ---- reading -------------------------------------------------------------------------------


def read_manifest(path: os.PathLike) -> dict:
    folder = pathlib.Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        raise FormatError(f"{folder}: no {MANIFEST}; not an eoq-quantized folder")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{file}: unreadable or not JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FormatError(f"{file}: not an eoq manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{file}: format version {manifest.get('format_version')!r} is not supported by this eoq "
                          f"(it reads version {FORMAT_VERSION}); upgrade eoq")
    if not isinstance(manifest.get("tensors"), dict):
        raise FormatError(f"{file}: no 'tensors' table")
    return manifest


def weight_files(folder: os.PathLike) -> dict[str, str]:
    """tensor name -> safetensors file, from the index or the single file."""
    folder = pathlib.Path(folder)
    if (folder / INDEX).is_file():
        try:
            index = json.loads((folder / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{folder / INDEX}: unreadable shard index ({e})") from e
        files = {k: str(folder / v) for k, v in index.items()}
        for f in sorted(set(files.values())):
            if not os.path.isfile(f):
                raise FormatError(f"{folder / INDEX} names {os.path.basename(f)}, which is missing")
        return files
    single = folder / WEIGHTS
    if not single.is_file():
        raise FormatError(f"{folder}: neither {WEIGHTS} nor {INDEX} is present")
    from safetensors import safe_open
    try:
        with safe_open(str(single), "pt") as f:
            return {k: str(single) for k in f.keys()}
    except Exception as e:
        raise FormatError(f"{single}: not a readable safetensors file ({e})") from e


def check_part(name: str, part: str, t: torch.Tensor, spec: dict) -> None:
    want_dtype = dtype_from_name(spec["dtype"], f"{name}.{part}")
    if t.dtype != want_dtype or list(t.shape) != list(spec["shape"]):
        raise FormatError(f"{name}.{part}: stored as {dtype_name(t.dtype)} {list(t.shape)}, the manifest says "
                          f"{spec['dtype']} {spec['shape']}")


def verify(name: str, entry: dict, parts: dict[str, torch.Tensor]) -> None:
    """Every part the manifest lists is there with its dtype and shape, and the checksum holds."""
    if is_quantized(entry):
        specs = entry["parts"]
        missing = sorted(set(specs) - set(parts))
        if missing:
            raise FormatError(f"{name}: stored parts {missing} are missing")
        for part, spec in specs.items():
            check_part(name, part, parts[part], spec)
        tensors = [parts[p] for p in part_order(specs)]
    else:
        check_part(name, "tensor", parts["tensor"], entry)
        tensors = [parts["tensor"]]
    got = checksum(tensors)
    if got != entry.get("checksum"):
        raise FormatError(f"{name}: checksum mismatch (stored bytes give {got}, the manifest says "
                          f"{entry.get('checksum')}); the file is damaged")


def decode_codes(name: str, entry: dict, stream: torch.Tensor) -> torch.Tensor:
    shape = [int(s) for s in entry["code_shape"]]
    n = math.prod(shape)
    try:
        if entry["codec"] == "rans":
            codes = ops.rans_decode(stream)
        elif entry["codec"] == "packed":
            codes = ops.unpack_bits(stream, int(entry["code_bits"]), n)
        else:
            raise FormatError(f"{name}: unknown codec {entry['codec']!r}")
    except CorruptStreamError as e:
        raise FormatError(f"{name}.codes: corrupt code stream ({e})") from e
    except ValueError as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{name}.codes: {e}") from e
    if codes.numel() != n:
        raise FormatError(f"{name}.codes: decodes to {codes.numel()} codes, the manifest says {shape}")
    return codes.view(shape)


def to_quantized_tensor(name: str, entry: dict, parts: dict[str, torch.Tensor]) -> QuantizedTensor:
    codes = decode_codes(name, entry, parts["codes"])
    side = {k: v for k, v in parts.items() if k != "codes"}
    return QuantizedTensor(entry["method"], entry["bits"], tuple(entry["qshape"]),
                           dtype_from_name(entry["dtype"], name), entry["block_size"], int(entry["seed"]), codes,
                           int(entry["code_bits"]), side, dict(entry["meta"]), name)


def dequantize_entry(name: str, entry: dict, parts: dict[str, torch.Tensor],
                     dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Verify and decode one stored parameter (any kind but tied) into its tensor."""
    verify(name, entry, parts)
    if not is_quantized(entry):
        t = parts["tensor"]
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t
    from .methods import METHODS
    if entry["method"] not in METHODS:
        raise FormatError(f"{name}: unknown method {entry['method']!r}")
    try:
        w = to_quantized_tensor(name, entry, parts).dequantize(dtype)
    except FormatError:
        raise
    except (ValueError, KeyError, RuntimeError) as e:
        raise FormatError(f"{name}: cannot dequantize ({type(e).__name__}: {e})") from e
    return w.t().contiguous() if entry.get("transposed") else w
