"""What a reader checks in a manifest before it trusts any field (docs/FORMAT.md).

A folder may come from a stranger or a damaged disk, so nothing read from it is used before
it is checked here: every entry's kind, shapes, dtypes, method parameters and stored parts
are validated against each other and against fixed ranges *before* anything is allocated
from them (a ``qshape`` of [2^28, 64] must fail here, not after a 64 GB allocation), and
every entry's checksum must be present (its value is compared with the stored bytes by
eoq.folder). Each problem raises FormatError naming the file, the tensor and the field.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import FormatError

KINDS = ("quantized", "protected", "passthrough", "tied")
METHODS = ("absmax", "polar", "turbo", "ecsq")
SIDE_PARTS = {"absmax": ("scales",), "polar": ("scales", "codebook"), "turbo": ("scales", "codebook"),
              "ecsq": ("steps",)}
OPTIONAL_PARTS = ("awq_scales",)
# torch dtype names a stored tensor may have (what safetensors can hold and a model uses)
DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int64", "int32", "int16",
          "int8", "uint8", "bool")
PART_DTYPES = {"codes": "uint8", "scales": "float16", "steps": "float32", "codebook": "float32",
               "awq_scales": "float16"}
MAX_DIMS = 8
MAX_NUMEL = 1 << 40          # a trillion parameters in one tensor is beyond any model
MAX_BLOCK = 1 << 16          # the methods' rotation blocks are <= 512; allow far more, never 2^29
MIN_BLOCK = 16               # eoq.methods.rotation.MIN_BLOCK
MAX_TENSORS = 1 << 20
CHECKSUM = re.compile(r"crc32c:[0-9a-f]{8}\Z")
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors\Z")


def _fail(where: str, msg: str):
    raise FormatError(f"{where}: {msg}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def want_int(where: str, field: str, v, lo: int, hi: int) -> int:
    if not is_int(v) or not lo <= v <= hi:
        _fail(where, f"{field} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def want_whole(where: str, field: str, v, lo: int, hi: int) -> int:
    """An integer, possibly written as a float (4.0): the fixed-rate methods' bits."""
    if not is_num(v) or not float(v).is_integer() or not lo <= v <= hi:
        _fail(where, f"{field} must be a whole number in [{lo}, {hi}], got {v!r}")
    return int(v)


def want_shape(where: str, field: str, v, dims=None) -> list[int]:
    if not isinstance(v, list) or not all(is_int(s) and 0 <= s <= MAX_NUMEL for s in v) or len(v) > MAX_DIMS:
        _fail(where, f"{field} must be a list of at most {MAX_DIMS} non-negative integers, got {v!r}")
    if dims is not None and len(v) != dims:
        _fail(where, f"{field} must have {dims} dimensions, got {v!r}")
    if math.prod(v) > MAX_NUMEL:
        _fail(where, f"{field} {v} holds more than 2^40 values")
    return v


def want_pow2(where: str, field: str, v, lo: int, hi: int) -> int:
    want_int(where, field, v, lo, hi)
    if v & (v - 1):
        _fail(where, f"{field} must be a power of two, got {v}")
    return v


def want_dtype(where: str, field: str, v) -> str:
    if v not in DTYPES:
        _fail(where, f"{field} must be one of {', '.join(DTYPES)}, got {v!r}")
    return v


def validate_manifest(manifest: Any, where: str) -> dict:
    """Every field a reader uses, for every entry; returns the manifest."""
    if not isinstance(manifest, dict):
        _fail(where, "the manifest is not a JSON object")
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict) or not 0 < len(tensors) <= MAX_TENSORS:
        _fail(where, f"'tensors' must be an object of 1 to {MAX_TENSORS} entries")
    for name, entry in tensors.items():
        validate_entry(name, entry, f"{where}: tensor {name!r}")
    for name, entry in tensors.items():
        if entry["kind"] == "tied":
            target = tensors.get(entry["tied_to"])
            if target is None or target["kind"] == "tied":
                _fail(f"{where}: tensor {name!r}", f"tied_to {entry['tied_to']!r} is not a stored tensor")
            if target["shape"] != entry["shape"]:
                _fail(f"{where}: tensor {name!r}", f"shape {entry['shape']} differs from the shape "
                      f"{target['shape']} of {entry['tied_to']!r} it is tied to")
    claimed = {}
    for name, entry in tensors.items():  # two entries must never claim one stored tensor
        if entry["kind"] == "tied":
            continue
        for key in ([f"{name}.{p}" for p in entry["parts"]] if "method" in entry else [name]):
            if key in claimed:
                _fail(f"{where}: tensor {name!r}", f"its stored tensor {key!r} is also claimed by {claimed[key]!r}")
            claimed[key] = name
    marker = manifest.get("marker")
    if marker is None and any("method" in e for e in tensors.values()):
        _fail(where, "quantized entries but no marker (the marker keeps eoq-less loaders from loading garbage)")
    if marker is not None:
        if not isinstance(marker, str) or marker not in tensors or tensors[marker]["kind"] not in ("quantized",
                                                                                                    "protected") \
                or "method" not in tensors[marker]:
            _fail(where, f"marker {marker!r} is not a quantized tensor of the manifest")
    if not isinstance(manifest.get("checksum"), str) or not CHECKSUM.match(manifest["checksum"]):
        _fail(where, f"the manifest checksum is missing or malformed ({manifest.get('checksum')!r})")
    return manifest


def validate_entry(name: str, entry: Any, where: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 1024:
        _fail(where, "tensor names must be non-empty strings of at most 1024 characters")
    if not isinstance(entry, dict):
        _fail(where, "the entry is not a JSON object")
    kind = entry.get("kind")
    if kind not in KINDS:
        _fail(where, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(entry.get("checksum"), str) or not CHECKSUM.match(entry["checksum"]):
        _fail(where, f"checksum is missing or malformed ({entry.get('checksum')!r}); every entry must have one")
    shape = want_shape(where, "shape", entry.get("shape"))
    want_dtype(where, "dtype", entry.get("dtype"))
    if kind == "tied":
        if not isinstance(entry.get("tied_to"), str):
            _fail(where, f"tied_to must name a tensor, got {entry.get('tied_to')!r}")
        return
    file = entry.get("file")
    if not isinstance(file, str) or not FILE_NAME.match(file):
        _fail(where, f"file must be a plain *.safetensors file name in the folder, got {file!r}")
    if "method" in entry:
        validate_quantized(where, entry, shape)
    elif kind == "quantized":
        _fail(where, "a quantized entry has no method")


def validate_quantized(where: str, entry: dict, shape: list[int]) -> None:
    method = entry["method"]
    if method not in METHODS:
        _fail(where, f"method must be one of {', '.join(METHODS)}, got {method!r}")
    rows, cols = want_shape(where, "qshape", entry.get("qshape"), dims=2)
    if rows < 1 or cols < 1:
        _fail(where, f"qshape {entry['qshape']} is empty")
    transposed = entry.get("transposed")
    if not isinstance(transposed, bool):
        _fail(where, f"transposed must be true or false, got {transposed!r}")
    if shape != ([cols, rows] if transposed else [rows, cols]):
        _fail(where, f"shape {shape} does not match qshape {entry['qshape']} (transposed: {transposed})")
    want_int(where, "seed", entry.get("seed"), 0, (1 << 64) - 1)
    code_bits = want_int(where, "code_bits", entry.get("code_bits"), 1, 8)
    codec = entry.get("codec")
    if codec not in ("rans", "packed"):
        _fail(where, f"codec must be 'rans' or 'packed', got {codec!r}")
    code_shape = want_shape(where, "code_shape", entry.get("code_shape"))
    meta = entry.get("meta")
    if not isinstance(meta, dict):
        _fail(where, f"meta must be an object, got {meta!r}")
    if not is_num(entry.get("bits")):
        _fail(where, f"bits must be a finite number, got {entry.get('bits')!r}")
    parts = validate_parts(where, entry, method)
    n_codes = math.prod(code_shape)
    if codec == "packed" and parts["codes"] != [-(-n_codes * code_bits // 8)]:
        _fail(where, f"packed codes of {n_codes} codes at {code_bits} bits take {-(-n_codes * code_bits // 8)} "
                     f"bytes, parts.codes says {parts['codes']}")
    if "awq_scales" in parts and parts["awq_scales"] != [cols]:
        _fail(where, f"awq_scales must have one value per input feature ({cols}), parts say {parts['awq_scales']}")
    if method == "absmax":
        bits = want_whole(where, "bits", entry["bits"], 2, 8)
        block = want_int(where, "block_size", entry.get("block_size"), 16, 256)
        expect(where, "code_shape", code_shape, [rows, cols])
        expect(where, "code_bits", code_bits, bits)
        expect(where, "parts.scales", parts["scales"], [rows, -(-cols // block)])
        return
    block = want_pow2(where, "meta.rotation_block", meta.get("rotation_block"), MIN_BLOCK, MAX_BLOCK)
    padded = want_int(where, "meta.padded_cols", meta.get("padded_cols"), cols, cols + MIN_BLOCK - 1)
    if padded % block:
        _fail(where, f"meta.padded_cols {padded} is not a multiple of the rotation block {block}")
    expect(where, "code_shape", code_shape, [rows, padded])
    if method == "ecsq":
        expect(where, "block_size", entry.get("block_size"), block)
        want_int(where, "meta.offset", meta.get("offset"), -(1 << 31), (1 << 31) - 256)
        g = meta.get("group_rows")
        if g is not None:
            want_int(where, "meta.group_rows", g, 1, rows)
        expect(where, "parts.steps", parts["steps"], [1 if g is None else -(-rows // g)])
        return
    bits = want_whole(where, "bits", entry["bits"], 1, 8)
    expect(where, "code_bits", code_bits, bits)
    expect(where, "parts.codebook", parts["codebook"], [1 << bits])
    if method == "polar":
        if not isinstance(meta.get("random_signs"), bool):
            _fail(where, f"meta.random_signs must be true or false, got {meta.get('random_signs')!r}")
        group = block
    else:
        if meta.get("group") not in ("block", "row"):
            _fail(where, f"meta.group must be 'block' or 'row', got {meta.get('group')!r}")
        group = want_int(where, "meta.dim", meta.get("dim"), 1, padded)
        expect(where, "meta.dim", group, block if meta["group"] == "block" else padded)
    expect(where, "parts.scales", parts["scales"], [rows, padded // group])


def validate_parts(where: str, entry: dict, method: str) -> dict[str, list[int]]:
    """{part: shape} after checking the names, dtypes and shapes the entry lists."""
    parts = entry.get("parts")
    allowed = ("codes",) + SIDE_PARTS[method] + OPTIONAL_PARTS
    if not isinstance(parts, dict):
        _fail(where, f"parts must be an object, got {parts!r}")
    missing = [p for p in ("codes",) + SIDE_PARTS[method] if p not in parts]
    unknown = [p for p in parts if p not in allowed]
    if missing or unknown:
        _fail(where, f"parts must be {', '.join(allowed[:-1])} (and optionally awq_scales); "
                     + (f"missing {missing}" if missing else f"unknown {unknown}"))
    out = {}
    for part, spec in parts.items():
        if not isinstance(spec, dict):
            _fail(where, f"parts.{part} must be an object, got {spec!r}")
        if spec.get("dtype") != PART_DTYPES[part]:
            _fail(where, f"parts.{part} must be stored as {PART_DTYPES[part]}, the manifest says {spec.get('dtype')!r}")
        out[part] = want_shape(where, f"parts.{part}.shape", spec.get("shape"), dims=None if part == "scales" else 1)
    return out


def expect(where: str, field: str, got, want) -> None:
    if got != want:
        _fail(where, f"{field} is {got!r}, the entry's shapes need {want!r}")
