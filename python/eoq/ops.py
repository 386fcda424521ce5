"""Thin Python wrappers over the C++ kernels (eoq._C).

Each wrapper checks and converts its arguments (dtype, contiguity, ranges) and names the
problem in a ValueError; the kernels do the work, in parallel over torch's intra-op
threads (``torch.set_num_threads``), with results that do not depend on the thread count.
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import torch

from . import _C
from .errors import CorruptStreamError

RANS_DEFAULT_SCALE_BITS = _C.RANS_DEFAULT_SCALE_BITS
RANS_DEFAULT_CHUNK = _C.RANS_DEFAULT_CHUNK


def _u8_1d(t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise ValueError(f"{what} must be uint8, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(t.shape)}")
    return t.detach().cpu().contiguous()


def _float(t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {t.dtype}")
    return t.detach().cpu().to(torch.float32).contiguous()


def _int(v, what: str, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """An integer argument (Python or numpy int, never bool or float), in [lo, hi] when they
    are given: the one check for every integer a kernel or a stored entry hands over."""
    ranged = lo is not None or hi is not None
    try:
        if isinstance(v, bool):
            raise TypeError
        n = operator.index(v)
    except TypeError:
        n = None
    if n is None or (lo is not None and n < lo) or (hi is not None and n > hi):
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {v!r}" if ranged else
                         f"{what} must be an int, got {v!r}")
    return n


def _count(v, what: str) -> int:
    """A non-negative integer argument (Python or numpy int, never bool or float)."""
    v = _int(v, what)
    if v < 0:
        raise ValueError(f"{what} must be a non-negative int, got {v}")
    return v


# ---- rANS ------------------------------------------------------------------------------


def rans_encode(symbols: torch.Tensor, scale_bits: int = RANS_DEFAULT_SCALE_BITS,
                chunk_size: int = RANS_DEFAULT_CHUNK) -> torch.Tensor:
    """Entropy-code a 1-D uint8 tensor into a self-describing EOQR stream (uint8 tensor).

    scale_bits (10..15) sets the frequency resolution 2^scale_bits; chunk_size
    (65536..1048576, a multiple of 32) the symbols per independently decodable chunk.
    """
    return _C.rans_encode(_u8_1d(symbols, "symbols"), int(scale_bits), int(chunk_size))


def rans_decode(stream: torch.Tensor, out: Optional[torch.Tensor] = None,
                expected: Optional[int] = None) -> torch.Tensor:
    """Decode an EOQR stream; raises CorruptStreamError if it is corrupt or truncated.

    ``out``: a contiguous 1-D uint8 CPU tensor of exactly the stream's length to decode
    into (reusing a buffer avoids faulting in fresh pages); returned.
    ``expected``: the number of symbols the caller knows the stream must hold; the header's
    count is compared with it right after parsing, before any allocation or decoding, and
    a mismatch raises CorruptStreamError naming both.
    """
    if out is not None and not (isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.dim() == 1
                                and out.is_contiguous() and out.device.type == "cpu"):
        raise ValueError("out must be a contiguous 1-D uint8 CPU tensor")
    if expected is not None:
        expected = _count(expected, "expected")
        if expected >= 1 << 63:
            raise CorruptStreamError(f"expected {expected} symbols: more than any stream can hold")
    return _C.rans_decode(_u8_1d(stream, "stream"), out, expected)


def rans_info(stream: torch.Tensor) -> dict:
    """The validated header of an EOQR stream (length, table, chunk index) without decoding."""
    return _C.rans_info(_u8_1d(stream, "stream"))


def rans_decoder() -> str:
    """Name of the chunk decoder this CPU uses (every one gives the same symbols)."""
    return _C.rans_decoder_name()


def _crc_value(value) -> int:
    try:
        return _int(value, "value", 0, 0xFFFFFFFF)
    except ValueError:
        raise ValueError(f"value must be a previous CRC32C, an int in [0, 2^32), got {value!r}") from None


def crc32c(data: torch.Tensor, value: int = 0) -> int:
    """CRC32C (Castagnoli) of a 1-D uint8 tensor.

    ``value`` is the CRC32C of the bytes that precede ``data`` (0: none), so
    ``crc32c(b, crc32c(a)) == crc32c(a + b)`` and a checksum can be extended piece by piece.
    """
    return _C.crc32c(_u8_1d(data, "data"), False, _crc_value(value))


def crc32c_tensor(t: torch.Tensor, value: int = 0) -> int:
    """CRC32C of a CPU tensor's raw bytes, any dtype and shape, extending ``value``.

    The bytes are the tensor's elements in row-major order, little-endian (the safetensors
    layout). A contiguous tensor is read in place (no copy); a non-contiguous one is made
    contiguous first.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"t must be a CPU tensor, got one on {t.device}")
    if t.layout != torch.strided:
        raise ValueError(f"t must be a dense (strided) tensor, got layout {t.layout}")
    # resolve_conj/resolve_neg: a lazily conjugated/negated view's memory is not its values.
    return _C.crc32c(t.detach().resolve_conj().resolve_neg().contiguous(), False, _crc_value(value))


# ---- fused ecsq dequantization ----------------------------------------------------------------

DEQUANT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def ecsq_dequantize(codes: torch.Tensor, rows: int, cols: int, padded_cols: int, block: int, seed: int,
                    offset: int, steps: torch.Tensor, group_rows: Optional[int] = None,
                    awq_scales: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.bfloat16,
                    codec: str = "rans", out: Optional[torch.Tensor] = None, low: Optional[torch.Tensor] = None,
                    low_bits: int = 0, recon: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ecsq codes -> the [rows, cols] weight in ``dtype``, in one fused pass (cpp/dequant.h).

    ``codes``: the EOQR stream of the rows x padded_cols codes (``codec="rans"``), or the
    codes themselves, uint8, flattened (``codec="codes"``). Computes, bit for bit as the
    reference (eoq.methods.ecsq.dequantize, then ``/ awq_scales`` and ``.to(dtype)``):
    ``(code + offset) * steps[row // group_rows]`` (group_rows None: one step), the inverse
    seeded Hadamard in blocks of ``block``, cropped to ``cols``, divided by the AWQ scales
    (widened to float32), rounded to ``dtype`` (bfloat16, float16 or float32). The stream's
    count is checked before anything is decoded; a corrupt stream raises CorruptStreamError.
    ``out``: a contiguous [rows, cols] CPU tensor of ``dtype`` to write into (returned).
    ``low``, ``low_bits``: codes past 8 bits; the level is ``(code << low_bits) | low`` with
    ``low`` the packed (pack_bits) low bits of every code, given exactly when low_bits > 0.
    ``recon``: fitted reconstruction points (float32, 1..8, never with low bits): the level
    v = code + offset with 1 <= |v| <= len(recon) stands for sign(v) * recon[|v| - 1].
    """
    if codec not in ("rans", "codes"):
        raise ValueError(f"codec must be 'rans' or 'codes', got {codec!r}")
    if dtype not in DEQUANT_DTYPES:
        raise ValueError(f"dtype must be one of {DEQUANT_DTYPES}, got {dtype}")
    rows, cols, padded_cols, block = (_count(v, w) for v, w in
                                      ((rows, "rows"), (cols, "cols"), (padded_cols, "padded_cols"), (block, "block")))
    seed = _count(seed, "seed")
    if seed >= 1 << 64:
        raise ValueError(f"seed must be below 2^64, got {seed}")
    offset = _int(offset, "offset")
    low_bits = _count(low_bits, "low_bits")
    if low_bits > 8 or (low_bits > 0) != (low is not None):
        raise ValueError(f"low_bits must be in [0, 8] and low given exactly when it is > 0, got {low_bits}")
    top = (256 << low_bits) - 1
    if not -(1 << 31) <= offset <= (1 << 31) - 1 - top:
        raise ValueError(f"offset {offset} out of range: offset + {top} must fit in int32")
    g = rows if group_rows is None else _count(group_rows, "group_rows")
    if g == 0 and rows > 0:
        raise ValueError("group_rows must be >= 1")
    steps = _float(steps, "steps").reshape(-1)
    awq = None if awq_scales is None else _float(awq_scales, "awq_scales").reshape(-1)
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    return _C.ecsq_dequantize(_u8_1d(codes, "codes"), codec == "rans", rows, cols, padded_cols, block, seed, offset,
                              steps, max(g, 1), awq, dtype, out,
                              None if low is None else _u8_1d(low, "low"), low_bits,
                              None if recon is None else _float(recon, "recon").reshape(-1).contiguous())


def dequant_kernel() -> str:
    """Name of the row kernel ecsq_dequantize uses on this CPU ("avx2" or "scalar"; the same bits)."""
    return _C.dequant_kernel_name()


# ---- bit packing ------------------------------------------------------------------------


def _check_bits(k: int) -> int:
    if not 1 <= int(k) <= 8:
        raise ValueError(f"bit width must be in 1..8, got {k}")
    return int(k)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack 1-D uint8 codes < 2^bits densely, LSB first: n codes -> ceil(n*bits/8) bytes."""
    return _C.pack_bits(_u8_1d(codes, "codes"), _check_bits(bits))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits; raises CorruptStreamError if the byte count or padding is wrong."""
    if not 0 <= int(n) < 1 << 62:
        raise ValueError(f"n must be in [0, 2^62), got {n}")
    return _C.unpack_bits(_u8_1d(packed, "packed"), _check_bits(bits), int(n))


# ---- block absmax ------------------------------------------------------------------------


def _check_absmax(bits: int, block: int) -> None:
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"absmax: bits must be in 2..8, got {bits}")
    if not 16 <= int(block) <= 256:
        raise ValueError(f"absmax: block must be in 16..256, got {block}")


def absmax_quantize(weight: torch.Tensor, bits: int, block: int = 32,
                    importance: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric block absmax along the input dimension of a 2-D weight.

    Returns (codes uint8 [rows, cols] in [0, 2^bits), scales fp16 [rows, ceil(cols/block)]).
    With ``importance`` (one non-negative value per input column) each block's scale is
    searched to minimise the importance-weighted squared error.
    """
    _check_absmax(bits, block)
    w = _float(weight, "weight")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features x in_features), got shape {tuple(w.shape)}")
    imp = None
    if importance is not None:
        imp = _float(importance, "importance").reshape(-1)
        if imp.numel() != w.shape[1]:
            raise ValueError(f"importance has {imp.numel()} values, weight has {w.shape[1]} input columns")
        if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
            raise ValueError("importance must be finite and non-negative")
    return _C.absmax_quantize(w, int(bits), int(block), imp)


def absmax_dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int = 32,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild weights from absmax codes and fp16 scales."""
    _check_absmax(bits, block)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be 2-D uint8, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 1 << int(bits):
        raise ValueError(f"codes must be < 2^{bits}, found {int(codes.max())}")
    out = _C.absmax_dequantize(codes.cpu().contiguous(), scales.cpu().to(torch.float16).contiguous(), int(bits), int(block))
    return out.to(dtype)


# ---- Walsh-Hadamard ------------------------------------------------------------------------


def hadamard_signs(n: int, seed: int) -> torch.Tensor:
    """The n random +-1 signs (float32) that seed gives (splitmix64, see docs/FORMAT.md)."""
    return _C.hadamard_signs(int(n), int(seed) & 0xFFFFFFFFFFFFFFFF)


def hadamard(x: torch.Tensor, block: Optional[int] = None, seed: Optional[int] = None,
             inverse: bool = False, overwrite: bool = False) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform along the last dimension, in blocks of 2^k.

    block defaults to the whole last dimension (which must then be a power of two). With a
    seed, random signs D are applied: forward H D x, inverse D H y, so
    ``hadamard(hadamard(x, seed=s), seed=s, inverse=True) == x``; without one the transform
    is its own inverse. Computed in float32, returned in x's dtype. ``overwrite``: a contiguous
    float32 x the caller no longer needs is transformed in place (no copy) and returned.
    """
    xf = _float(x, "x")
    if xf.dim() == 0:
        raise ValueError("x must have at least one dimension")
    n = xf.shape[-1]
    block = n if block is None else int(block)
    if block <= 0 or block & (block - 1):
        raise ValueError(f"hadamard: block must be a power of two, got {block}")
    if n % block:
        raise ValueError(f"hadamard: last dimension {n} is not a multiple of the block {block}")
    out = xf.clone() if xf.data_ptr() == x.data_ptr() and not overwrite else xf
    signs = hadamard_signs(block, seed) if seed is not None else None
    if out.numel():
        _C.hadamard_(out, block, signs, bool(inverse))
    return out.to(x.dtype)


# ---- the uniform quantizer's histogram ---------------------------------------------------


class CodeHistogram(NamedTuple):
    qmin: int                          # the code of hist[0]
    hist: torch.Tensor                 # int64 [span]: how many of x round to qmin + j
    row_error: Optional[torch.Tensor]  # float64 [rows]: sum_c (q * step - x)^2, or None


def code_histogram(x: torch.Tensor, step: float, x_range: Optional[tuple[float, float]] = None,
                   row_error: bool = True) -> CodeHistogram:
    """Codes q = round(x / step) of a 2-D float32 x, counted, with each row's squared error,
    in one pass and without materialising q (the rate searches' inner loop). ``x_range``:
    (min, max) of x when the caller knows them (else measured here)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"x must be a 2-D float32 tensor, got {getattr(x, 'dtype', type(x).__name__)} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    x = x.detach().cpu().contiguous()
    if x_range is None:
        if x.numel() == 0:
            raise ValueError("x is empty")
        lo, hi = torch.aminmax(x)
        x_range = (float(lo), float(hi))
    qmin, hist, err = _C.code_histogram(x, float(step), float(x_range[0]), float(x_range[1]), bool(row_error))
    return CodeHistogram(int(qmin), hist, err)


def recon_sums(x: torch.Tensor, q: torch.Tensor, row_step: torch.Tensor, top: int,
               start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float64 [3 top + 1]: per level m = 1..top the sums of w, w t sign(q), w t^2 over the
    values coded +-m (t = x / step of the row, w = step^2), then the midpoints' error
    sum w (t - q)^2 over all values: what ecsq's fitted reconstruction is solved from.
    ``start``: the sums of the rows before these (a tensor taken in row chunks), added onto
    row by row, so the chunks' result is bit for bit the one call's on all rows."""
    x, q = _float(x, "x"), _float(q, "q")
    if x.dim() != 2 or q.shape != x.shape:
        raise ValueError(f"x must be 2-D and q of its shape, got {tuple(x.shape)} and {tuple(q.shape)}")
    if start is not None:
        start = torch.as_tensor(start).detach().cpu().to(torch.float64).reshape(-1).contiguous()
    return _C.recon_sums(x, q, _float(row_step, "row_step").reshape(-1), _count(top, "top"), start)


# ---- Lloyd-Max --------------------------------------------------------------------------


class Codebook(NamedTuple):
    centroids: torch.Tensor   # float64 [2^bits], increasing
    boundaries: torch.Tensor  # float64 [2^bits - 1], midpoints of neighbouring centroids
    mse: float                # expected squared error under the density
    iterations: int


def lloyd_max(bits: int, density: str = "gaussian", dim: Optional[int] = None, grid: int = 8193,
              iters: int = 1000, tol: float = 1e-12) -> Codebook:
    """Lloyd-Max codebook for N(0,1) (``density="gaussian"``) or for one coordinate of a
    uniformly random unit vector in ``dim`` dimensions (``density="sphere"``, Beta-type)."""
    if density == "sphere" and dim is None:
        raise ValueError("lloyd_max: the sphere density needs dim")
    c, b, mse, it = _C.lloyd_max(str(density), int(bits), int(dim or 0), int(grid), int(iters), float(tol))
    return Codebook(c, b, mse, it)


def codebook_quantize(x: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid codes through sorted boundaries: code = #{b <= x} (uint8, x's shape)."""
    b = _float(boundaries, "boundaries").reshape(-1)
    if b.numel() > 1 and not bool((b[1:] > b[:-1]).all()):
        raise ValueError("boundaries must be strictly increasing")
    return _C.codebook_quantize(_float(x, "x"), b)


def codebook_dequantize(codes: torch.Tensor, centroids: torch.Tensor,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centroid of each code."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= centroids.numel():
        raise ValueError(f"code {int(codes.max())} has no centroid (codebook of {centroids.numel()})")
    return centroids.to(dtype)[codes.long()]


__all__ = [
    "CorruptStreamError", "rans_encode", "rans_decode", "rans_info", "rans_decoder", "crc32c", "crc32c_tensor",
    "ecsq_dequantize", "dequant_kernel",
    "pack_bits", "unpack_bits", "absmax_quantize", "absmax_dequantize", "hadamard", "hadamard_signs",
    "lloyd_max", "Codebook", "codebook_quantize", "codebook_dequantize", "code_histogram", "CodeHistogram", "recon_sums",
]
