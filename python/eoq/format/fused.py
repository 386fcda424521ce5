"""Fused decoding of one stored entry: from the stored parts straight to the final weight.

``repo.dequantize_entry`` rebuilds a QuantizedTensor and runs the method's reference
dequantizer, a handful of whole-tensor passes in Python (decode the codes into fresh memory,
widen them, scale, inverse Hadamard in float32, crop, divide by the AWQ scales, cast). For
ecsq, the default method, ``dequantize_fused`` does all of it in one C++ pass per few rANS
chunks (``ops.ecsq_dequantize``, cpp/dequant.h), with the same bits as the reference.

It returns None for anything the kernel does not cover (another method or codec, an output
dtype other than bfloat16 / float16 / float32, steps not stored as float32, or values so
large that an intermediate could overflow float32, where only the reference defines the
NaNs); the caller then takes the reference path. Everything it does cover is checked before
any allocation, and a bad entry raises ValueError (CorruptStreamError for a damaged stream),
the message starting with the tensor's name.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import ops
from ..errors import CorruptStreamError

__all__ = ["dequantize_fused", "handles"]

MIN_BLOCK = 16
MAX_BLOCK = 1 << 16
ECSQ_PARTS = {"codes", "steps", "awq_scales", "low", "recon"}
# Every intermediate stays below this (the largest partial sum of a Hadamard block is
# block * max |(code + offset) * step|); past it float32 could overflow into inf - inf = NaN.
FINITE_BOUND = 2.0 ** 126


def _int(v, what: str, name: str, lo: int, hi: int) -> int:
    return ops._int(v, f"{name}: {what}", lo, hi)


def _shape2(v, what: str, name: str) -> tuple[int, int]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ValueError(f"{name}: {what} must be [rows, cols], got {v!r}")
    return _int(v[0], what, name, 1, 1 << 40), _int(v[1], what, name, 1, 1 << 40)


def _dtype(entry: dict, dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None:
        dtype = getattr(torch, str(entry.get("dtype")), None)
    return dtype if dtype in ops.DEQUANT_DTYPES else None


def handles(entry: dict, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether dequantize_fused takes this entry at all (method, codec, output dtype), from
    the entry alone; the parts can still make it return None (see the module docstring)."""
    return (isinstance(entry, dict) and entry.get("method") == "ecsq" and entry.get("codec") in ("rans", "packed")
            and _dtype(entry, dtype) is not None)


def _side(name: str, part: str, t, n: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}.{part}: expected a tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{name}.{part}: expected {n} values (1-D), got shape {list(t.shape)}")
    return t


def dequantize_fused(name: str, entry: dict, parts: dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
                     out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The weight of an ecsq entry, exactly as ``repo.dequantize_entry`` returns it (its
    ``dtype``, or the entry's when None; transposed entries transposed back, contiguous),
    or None when the kernel does not handle the entry.

    ``entry``: a manifest entry (fields method, codec, qshape, code_shape, code_bits, seed,
    dtype, transposed, meta {offset, rotation_block, padded_cols, group_rows}), its checksum
    already verified; ``parts``: its stored tensors (codes: uint8 stream; steps: float32;
    awq_scales: optional). ``out``: a contiguous CPU tensor of the final shape and dtype to
    write into (returned), e.g. the model's parameter.
    """
    if not handles(entry, dtype):
        return None
    dtype = _dtype(entry, dtype)
    if not isinstance(parts, dict) or "codes" not in parts or "steps" not in parts:
        raise ValueError(f"{name}: ecsq needs the parts codes and steps, got {sorted(parts) if isinstance(parts, dict) else parts!r}")
    if set(parts) - ECSQ_PARTS:
        return None  # parts the kernel does not know: the reference path decides
    rows, cols = _shape2(entry.get("qshape"), "qshape", name)
    meta = entry.get("meta")
    if not isinstance(meta, dict):
        raise ValueError(f"{name}: meta must be an object, got {meta!r}")
    block = _int(meta.get("rotation_block"), "meta.rotation_block", name, MIN_BLOCK, MAX_BLOCK)
    if block & (block - 1):
        raise ValueError(f"{name}: meta.rotation_block must be a power of two, got {block}")
    padded = _int(meta.get("padded_cols"), "meta.padded_cols", name, cols, 1 << 40)
    if padded % block:
        raise ValueError(f"{name}: meta.padded_cols {padded} is not a multiple of the rotation block {block}")
    if _shape2(entry.get("code_shape"), "code_shape", name) != (rows, padded):
        raise ValueError(f"{name}: code_shape {entry.get('code_shape')} must be [rows, padded_cols] = [{rows}, {padded}]")
    low_bits = _int(meta.get("low_bits", 0), "meta.low_bits", name, 0, 8)
    top = (256 << low_bits) - 1  # the largest level
    offset = _int(meta.get("offset"), "meta.offset", name, -(1 << 31), (1 << 31) - 1 - top)
    low = parts.get("low")
    if (low is not None) != (low_bits > 0):
        raise ValueError(f"{name}: the part low must be stored exactly when meta.low_bits > 0")
    if low is not None and not (isinstance(low, torch.Tensor) and low.dtype == torch.uint8 and low.dim() == 1):
        raise ValueError(f"{name}.low: expected a 1-D uint8 tensor")
    if low is not None:  # ops.unpack_bits' own checks, which the kernel's reader skips
        total = rows * padded * low_bits
        if low.numel() != -(-total // 8):
            raise ValueError(f"{name}.low: {low.numel()} bytes for {rows * padded} values of {low_bits} bits")
        if total % 8 and int(low[-1]) >> (total % 8):
            raise CorruptStreamError(f"{name}.low: padding bits of the last byte are not zero")
    g = meta.get("group_rows")
    g = rows if g is None else _int(g, "meta.group_rows", name, 1, 1 << 40)
    seed = _int(entry.get("seed"), "seed", name, 0, (1 << 64) - 1)
    transposed = entry.get("transposed", False)
    if not isinstance(transposed, bool):
        raise ValueError(f"{name}: transposed must be true or false, got {transposed!r}")

    steps = _side(name, "steps", parts["steps"], -(-rows // g))
    if steps.dtype != torch.float32:
        return None  # the reference would scale in the steps' dtype
    bad = ~torch.isfinite(steps) | (steps <= 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}.steps: value {float(steps[i])} at index {i} is not finite and positive")
    awq = parts.get("awq_scales")
    if awq is not None:
        awq = _side(name, "awq_scales", awq, cols)
        if not awq.is_floating_point():
            return None
        awq = awq.float()  # what the reference divides by
        bad = ~torch.isfinite(awq) | (awq == 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{name}.awq_scales: value {float(awq[i])} at index {i} is not finite and non-zero")
    recon = parts.get("recon")
    if (recon is not None) != bool(meta.get("recon")):
        raise ValueError(f"{name}: the part recon must be stored exactly when meta.recon is set")
    biggest = max(abs(offset), abs(offset + top))
    if recon is not None:
        recon = _side(name, "recon", recon, _int(meta.get("recon"), "meta.recon", name, 1, 8))
        if recon.dtype != torch.float32 or low_bits:
            return None
        if not bool(torch.isfinite(recon).all()):
            raise ValueError(f"{name}.recon: values must be finite")
        biggest = max(biggest, float(recon.abs().max()))
    if biggest * float(steps.max()) * block >= FINITE_BOUND:
        return None

    final_shape = [cols, rows] if transposed else [rows, cols]
    if out is not None:
        if not (isinstance(out, torch.Tensor) and out.dtype == dtype and list(out.shape) == final_shape
                and out.is_contiguous() and out.device.type == "cpu"):
            raise ValueError(f"{name}: out must be a contiguous CPU {dtype} tensor of shape {final_shape}")
    stream = parts["codes"]
    if not (isinstance(stream, torch.Tensor) and stream.dtype == torch.uint8 and stream.dim() == 1):
        raise ValueError(f"{name}.codes: expected a 1-D uint8 tensor")
    try:
        if entry["codec"] == "rans":
            codes, codec = stream, "rans"
        else:
            bits = _int(entry.get("code_bits"), "code_bits", name, 1, 8)
            codes, codec = ops.unpack_bits(stream, bits, rows * padded), "codes"
        w = ops.ecsq_dequantize(codes, rows, cols, padded, block, seed, offset, steps, g, awq, dtype, codec,
                                out=None if transposed else out, low=low, low_bits=low_bits, recon=recon)
    except CorruptStreamError as e:
        raise CorruptStreamError(f"{name}.codes: {e}") from e
    if not transposed:
        return w
    if out is not None:
        return out.copy_(w.t())
    return w.t().contiguous()
