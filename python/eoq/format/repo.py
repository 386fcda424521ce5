"""The quantized model folder (repo format 2, docs/FORMAT.md): manifest entries, checksums,
and the decoding of one entry back into a weight.

Both directions live here so that what the writer records is exactly what the readers
check: an entry is built from a QuantizedTensor and its stored parts, and a QuantizedTensor
is rebuilt from an entry and the parts read back, after the checksum and every shape and
dtype the manifest promises have been verified.
"""

from __future__ import annotations

import math
import os
import pathlib
import shutil
from typing import Optional

import torch

from .. import ops
from ..errors import CorruptStreamError, FormatError
from ..methods.quantized import QuantizedTensor, code_entropy_bits
from ..standalone import load_quantized as _reader

# The format's names and limits: the stand-alone reader's (it defines the format it reads)
FORMAT, FORMAT_VERSION, MANIFEST = _reader.FORMAT, _reader.FORMAT_VERSION, _reader.MANIFEST
WEIGHTS, INDEX, MARKER_TEXT = _reader.WEIGHTS, _reader.INDEX, _reader.MARKER_TEXT
QUANTIZED_KINDS = _reader.QUANTIZED_KINDS
MAX_MANIFEST_BYTES = _reader.MAX_MANIFEST_BYTES  # a manifest is ~1 KB a tensor; refuse to parse a bomb
MAX_WEIGHT = 1e37  # the largest weight magnitude side tensors may imply (float32 tops out at 3.4e38)


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


def part_order(parts: dict) -> list[str]:
    """codes first, then the side parts by name: the order the checksum covers."""
    return (["codes"] if "codes" in parts else []) + sorted(p for p in parts if p != "codes")


def is_quantized(entry: dict) -> bool:
    return entry.get("kind") in QUANTIZED_KINDS and "method" in entry


# ---- checksums -----------------------------------------------------------------------------
#
# An entry's checksum covers what it stores *and* how it is read: CRC-32C over the stored
# tensors' bytes (parts in part_order), continued over the canonical JSON of the entry itself
# without its checksum (its recipe: method, shapes, offset, seed, rotation block, ...). A
# changed byte or a changed field both fail it. The manifest's own checksum covers the list
# of entries and the marker, so an entry removed together with its tensors fails too. CRC-32C
# finds damage, not forgery: a folder's author can always write consistent lies, and for
# those the reader's validation (eoq.format.validate) keeps every length and shape in bounds.


canonical_json = _reader.canonical_json


def crc32c_bytes(data: bytes, value: int = 0) -> int:
    return ops.crc32c(torch.frombuffer(bytearray(data), dtype=torch.uint8), value) if data else value


def data_crc(tensors: list[torch.Tensor]) -> int:
    crc = 0
    for t in tensors:
        crc = ops.crc32c_tensor(t, crc)
    return crc


def _crc(data, value: int = 0) -> int:
    """The stand-alone reader's CRC interface (bytes or a tensor, continuing ``value``) on
    eoq's C++ CRC-32C: the reader's checksum functions run on it at memory speed."""
    if isinstance(data, (bytes, bytearray)):
        return crc32c_bytes(bytes(data), value)
    return ops.crc32c_tensor(data, value)


def entry_checksum(name: str, entry: dict, crc: int) -> str:
    """The checksum of entry `name` whose stored bytes have CRC-32C `crc` (0 when nothing is
    stored): `crc` continued over the canonical JSON of [name, the entry without its checksum]."""
    return _reader.recipe_checksum(name, entry, crc, _crc)


def manifest_checksum(manifest: dict, where: str = "manifest") -> str:
    return _reader.manifest_checksum(manifest, where, _crc)


def seal(manifest: dict) -> None:
    """Give every entry its final checksum (from the data CRC it carries while being built,
    ``data_crc32c``) and the manifest its own; the writer's last step."""
    for name, e in manifest["tensors"].items():
        crc = e.pop("data_crc32c", 0)
        e["checksum"] = entry_checksum(name, e, crc)
    manifest["checksum"] = manifest_checksum(manifest)


# ---- writing -------------------------------------------------------------------------------


def choose_codec(qt: QuantizedTensor, codec: str) -> tuple[str, torch.Tensor]:
    """The stored codes: ``auto`` keeps whichever of rANS and fixed-rate packing is smaller
    (ties to rANS); ecsq's codes only make sense entropy-coded, but packing is still exact."""
    if codec in ("rans", "packed"):
        return codec, qt.code_stream(codec)
    rans = qt.code_stream("rans")
    packed_bytes = -(-qt.codes.numel() * qt.code_bits // 8)  # (ops.pack_bits: ceil(n bits / 8), not made twice)
    return ("rans", rans) if rans.numel() <= packed_bytes else ("packed", qt.code_stream("packed"))


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
        "data_crc32c": data_crc([parts[p] for p in part_order(parts)]),
    }
    if rule is not None:
        entry["rule"] = rule
    return entry, parts


def plain_entry(t: torch.Tensor, kind: str, reason: Optional[str] = None, rule: Optional[str] = None) -> dict:
    entry = {"kind": kind, "shape": list(t.shape), "dtype": dtype_name(t.dtype),
             "stored_bytes": t.numel() * t.element_size(), "data_crc32c": data_crc([t])}
    if reason:
        entry["reason"] = reason
    if rule:
        entry["rule"] = rule
    return entry


# ---- reading -------------------------------------------------------------------------------


def read_manifest(path: os.PathLike) -> dict:
    """The manifest of a folder, every field validated (eoq.format.validate) and its own checksum
    checked (the stand-alone reader's read_manifest on eoq's CRC); entries' checksums are
    checked against the bytes by eoq.format.folder."""
    return _reader.read_manifest(os.fspath(path), _crc, newer="convert the model again with this eoq, or use the "
                                                               "eoq that wrote it")


def stored_keys(name: str, entry: dict) -> dict[str, str]:
    """{part: safetensors key} of a stored entry ("tensor" for an unquantized one)."""
    if is_quantized(entry):
        return {p: f"{name}.{p}" for p in entry["parts"]}
    return {"tensor": name}


def verify(name: str, entry: dict, parts: dict[str, torch.Tensor]) -> None:
    """Every part the manifest lists is there with its dtype and shape, the checksum (bytes
    and recipe) holds, and the side tensors' values are sound (the stand-alone reader's
    verify_entry on eoq's CRC)."""
    _reader.verify_entry(name, entry, parts, _crc)


def decode_codes(name: str, entry: dict, stream: torch.Tensor) -> torch.Tensor:
    shape = [int(s) for s in entry["code_shape"]]
    n = math.prod(shape)
    try:
        if entry["codec"] == "rans":
            codes = ops.rans_decode(stream, expected=n)  # the count is checked before anything is allocated
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
    return codes.view(shape)


def to_quantized_tensor(name: str, entry: dict, parts: dict[str, torch.Tensor]) -> QuantizedTensor:
    codes = decode_codes(name, entry, parts["codes"])
    side = {k: v for k, v in parts.items() if k != "codes"}
    return QuantizedTensor(entry["method"], entry["bits"], tuple(entry["qshape"]),
                           dtype_from_name(entry["dtype"], name), entry["block_size"], int(entry["seed"]), codes,
                           int(entry["code_bits"]), side, dict(entry["meta"]), name)


def dequantize_entry(name: str, entry: dict, parts: dict[str, torch.Tensor],
                     dtype: Optional[torch.dtype] = None, verified: bool = False) -> torch.Tensor:
    """Decode one stored parameter (any kind but tied) into its tensor. The entry must come
    from read_manifest (validated); its parts are verified here unless the caller already did
    (``verified``: eoq.format.folder checks every checksum of a folder before anything is decoded)."""
    if not verified:
        verify(name, entry, parts)
    if not is_quantized(entry):
        t = parts["tensor"]
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t
    try:
        from .fused import dequantize_fused  # one C++ pass for ecsq, bit-identical to the reference below

        w = dequantize_fused(name, entry, parts, dtype)
        if w is not None:
            return w
        w = to_quantized_tensor(name, entry, parts).dequantize(dtype)
    except CorruptStreamError as e:
        raise FormatError(f"{name}.codes: corrupt code stream ({e})") from e
    except FormatError:
        raise
    except (ValueError, KeyError, RuntimeError, IndexError) as e:
        raise FormatError(f"{name}: cannot dequantize ({type(e).__name__}: {e})") from e
    return w.t().contiguous() if entry.get("transposed") else w


def weight_files(folder: os.PathLike) -> dict[str, str]:
    """tensor name -> safetensors file, from the shard index or the single file; index entries
    must be plain file names present in the folder (the stand-alone loader's check)."""
    return _reader.weight_files(os.fspath(folder))


def shard_plan(names: list[str], sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """``names`` in order, a new shard whenever the next tensor would take the current one past
    ``max_bytes`` (a larger tensor gets a shard of its own), as transformers shards; one shard
    (perhaps empty) at least."""
    shards, current, size = [], [], 0
    for name in names:
        n = sizes[name]
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current or not shards:
        shards.append(current)
    return shards


def shard_files(count: int) -> list[str]:
    """The shard file names of a folder of ``count`` shards, as transformers names them."""
    return [WEIGHTS] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def publish(dest: pathlib.Path, out: pathlib.Path) -> None:
    """Rename the finished folder ``dest`` to ``out``; an old ``out`` is moved aside first and
    removed only once the new one is there, so ``out`` is never half written."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.eoq-old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(dest, out)
    if old is not None:
        shutil.rmtree(old)
