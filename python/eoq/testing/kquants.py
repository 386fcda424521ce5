"""llama.cpp's K-quant blocks read field by field: each weight's integer code, the width of its
quantization cell and its offset, so a continuous-weight copy of a K-quant model can move every
weight inside its own cell (as eoq.testing.dithered does for Q4_1 / Q8_0). A plain reference:
the fields are decoded the way ggml's scalar ``dequantize_row_q4_K`` / ``_q6_K`` read them,
vectorised over blocks only, and tests/test_kquants.py checks step * code - offset against
gguf-py's dequantization bit for bit.

Q4_K, 4.5 bits per weight, super-blocks of 256 weights in 144 bytes:
    d (f16) | dmin (f16) | 12 bytes: eight 6-bit scales and eight 6-bit mins | 128 bytes of
    4-bit codes. Sub-block i (32 weights) has step d * scale_i and offset dmin * min_i:
    w = d * scale_i * q - dmin * min_i, q in 0..15. Bytes 32j..32j+31 of the codes hold
    sub-block 2j in their low nibbles and sub-block 2j + 1 in their high nibbles.
Q6_K, 6.5625 bits per weight, 256 weights in 210 bytes:
    128 bytes of low 4 bits | 64 bytes of high 2 bits | 16 int8 scales | d (f16).
    Sub-block i (16 weights) has step d * scale_i: w = d * scale_i * q, q in -32..31. The
    scales are signed, so a step can be negative: the cell's width is |d * scale_i|. Each
    half of 128 weights takes 64 low-bit bytes and 32 high-bit bytes: weight l (l < 32) of
    its quarter k is low byte l + 32 (k & 1), nibble k >> 1, high bits 2k of byte l.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K_BYTES = 2 + 2 + 12 + QK_K // 2            # 144
Q6_K_BYTES = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2  # 210


def _blocks(raw: np.ndarray, size: int, what: str) -> np.ndarray:
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size % size:
        raise ValueError(f"{what}: {raw.size} bytes is not a whole number of {size}-byte blocks")
    return raw.reshape(-1, size)


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian float16 from two byte columns, as float32."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32).reshape(-1, 1)


def _q4_k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins of each block's 12 bytes (ggml's get_scale_min_k4)."""
    scale = np.empty((s.shape[0], 8), dtype=np.uint8)
    mins = np.empty((s.shape[0], 8), dtype=np.uint8)
    for j in range(8):
        if j < 4:
            scale[:, j] = s[:, j] & 63
            mins[:, j] = s[:, j + 4] & 63
        else:
            scale[:, j] = (s[:, j + 4] & 0x0F) | ((s[:, j - 4] >> 6) << 4)
            mins[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return scale, mins


def q4_k_fields(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 0..15, steps float32, offsets float32), each [blocks, 256], of Q4_K data."""
    b = _blocks(raw, Q4_K_BYTES, "Q4_K")
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    scale, mins = _q4_k_scale_min(b[:, 4:16])
    qs = b[:, 16:]
    codes = np.empty((b.shape[0], QK_K), dtype=np.uint8)
    for j in range(4):  # 64 weights a step: sub-blocks 2j (low nibbles) and 2j + 1 (high nibbles)
        chunk = qs[:, 32 * j:32 * j + 32]
        codes[:, 64 * j:64 * j + 32] = chunk & 0x0F
        codes[:, 64 * j + 32:64 * j + 64] = chunk >> 4
    sub = np.arange(QK_K) // 32
    steps = d * scale.astype(np.float32)[:, sub]
    offsets = dmin * mins.astype(np.float32)[:, sub]
    return codes, steps, offsets


def q6_k_fields(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes int8 -32..31, steps float32, offsets float32 = 0), each [blocks, 256], of Q6_K data."""
    b = _blocks(raw, Q6_K_BYTES, "Q6_K")
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    codes = np.empty((b.shape[0], QK_K), dtype=np.int8)
    for half in range(2):
        low, high = ql[:, 64 * half:64 * half + 64], qh[:, 32 * half:32 * half + 32]
        for k in range(4):  # the half's four quarters of 32 weights
            lo = low[:, 32 * (k & 1):32 * (k & 1) + 32]
            lo = (lo >> 4) if k >> 1 else (lo & 0x0F)
            hi = (high >> (2 * k)) & 0x03
            codes[:, 128 * half + 32 * k:128 * half + 32 * k + 32] = (lo | (hi << 4)).astype(np.int8) - 32
    steps = d * scales[:, np.arange(QK_K) // 16]
    return codes, steps, np.zeros_like(steps)


FIELDS = {"Q4_K": q4_k_fields, "Q6_K": q6_k_fields}


def dequantize(kind: str, raw: np.ndarray) -> np.ndarray:
    """float32 weights, flat: step * code - offset, in ggml's order of operations."""
    codes, steps, offsets = FIELDS[kind](raw)
    return (steps * codes.astype(np.float32) - offsets).reshape(-1)


__all__ = ["q4_k_fields", "q6_k_fields", "dequantize", "FIELDS", "QK_K", "Q4_K_BYTES", "Q6_K_BYTES"]
