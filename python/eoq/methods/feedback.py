"""GPTQ-style error feedback over the activation covariance.

A Linear layer's output error over calibration inputs a_t is
    D = sum_t |(W - W^) a_t|^2 = trace((W - W^) H (W - W^)^T),    H = sum_t a_t a_t^T,
a sum of one quadratic form per row. Rounding every weight to its nearest code ignores H;
GPTQ (Frantar et al., 2022) quantizes each row column by column and feeds each column's
error forward onto the columns not yet quantized, through the upper Cholesky factor U of
H^-1, which re-solves the least-squares problem for the rest of the row. The kernel and its
traps are described in cpp/gptq.h; this module is its Python side:

- ``gptq(w, u, scale, ...)``: the C++ kernel (float32, parallel over tiles of rows,
  byte-identical for any thread count, block or instruction set).
- ``gptq_reference(...)``: the same computation as a plain torch loop over columns. The
  kernel performs exactly the reference's float32 operations in the same order (each
  update a rounded product then a rounded subtraction, j ascending), so the two agree bit
  for bit: codes equal and xhat equal as bytes. That is what tests/test_feedback.py checks.
- ``inverse_cholesky(h, damp, name, tokens)``: U from a covariance, robustly.
- ``rotate_hessian`` / ``scale_hessian``: H in the domain a method quantizes (eoq's
  randomised Hadamard rotation, AWQ's column scales).
- ``output_error(w, w_hat, h)``: the quantity feedback minimises.

The quantizer (the same for every method): s = scale[r, j // group] (finite, non-zero, either
sign: a negative s, as absmax's signed scales, works as the formulas say);
  uniform grid (levels None): code = clamp(round_half_even(x / s), qmin, qmax), xhat = code * s;
  codebook (levels sorted): code = index of the level nearest to x / s (ties to the lower
  index), xhat = levels[code] * s.
x is the *updated* weight, so xhat is the reconstruction W^ (code * s exactly) but differs
from rounding the original weight; the codes are what a method stores, with its scales.

Rules of inverse_cholesky (each event warns, naming the tensor):
- H is symmetrised, and scaled to a unit mean diagonal over the live columns: U then has
  entries near 1 in float32, and the feedback does not depend on H's scale (sum or mean
  over tokens give the same U up to rounding).
- Dead input columns (H[j, j] = 0: the column never saw a non-zero input) get a unit
  diagonal and no coupling, as GPTQ does: they are quantized by plain rounding and feed
  nothing back (they have no effect on the output, whatever their value).
- Damping: H + lambda I with lambda = damp * mean(diag H) (relative, as GPTQ's percdamp).
  If the Cholesky factorization fails (H not numerically positive definite), lambda is
  multiplied by 10, up to DAMP_RETRIES times; after that U is the identity, which is plain
  rounding. A warning is given at each step.
- With ``tokens`` (calibration tokens H was summed over) below n, H has rank < n and the
  damping decides the feedback along the missing directions: a warning says so.
- All-zero H: identity (plain rounding), with a warning. A negative diagonal or a non-finite
  entry is not a covariance: ValueError.

Speed (one thread of a 2-core AVX-512 VM whose other core ran another job; rows * n^2
flops): 576 x 1536 (SmolLM2's down projection) 0.03-0.05 s; 4096 x 4096 1.9 s (36 Gflop/s);
4096 x 14336 (0.84 Tflop) 28 s (30 Gflop/s; 47 Gflop/s was measured on 256 x 14336 when the
machine was quiet, i.e. ~18 s). Tiles of 16 rows are independent and share each block's
packed panel of U through the caches, so the work divides among free cores; two threads could
not be timed meaningfully here (with the second core busy, the two OpenMP barriers per block
wait for a descheduled thread: 576 x 1536 took 0.26 s). inverse_cholesky costs 2 n^3 / 3
float64 flops in LAPACK: 0.23 s at n = 1536, 2.2 s at 4096 (one thread), so ~1.5 min at
14336; once per H, shared by every weight that reads the same input. Memory: U is n^2
float32 (0.8 GiB at n = 14336); inverse_cholesky peaks at three n^2 float64 matrices.

Rotation (polar, turbo, ecsq): ``rotate(w)`` maps each row to x = M w_pad (M orthogonal,
block diagonal, the same for every row), so y = W a = X (M a_pad) and the covariance of the
rotated input is M H_pad M^T, H zero-padded to ``padded`` columns. The padded columns are
dead in H_pad but not after the rotation, which mixes them into every coordinate of a block:
the rotated H is singular (rank <= cols < padded) when there is padding, and the damping
makes it factorizable. Quantize the rotated rows with U from ``rotate_hessian(H)``; the
error that lands in the padding directions is cropped away by ``unrotate`` and costs nothing,
which H_pad (zero there) already tells the feedback.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .. import _C
from .. import ops

DEFAULT_DAMP = 0.01      # lambda = 1 % of the mean diagonal: GPTQ's percdamp default
DAMP_RETRIES = 4         # 0.01 -> 0.1 -> 1 -> 10 -> 100 x mean(diag); past 100 U is the identity's within 1 %
FIRST_RETRY_DAMP = 1e-4  # the retry after damp = 0 fails
DEFAULT_BLOCK = 128      # GPTQ's lazy-update width: speed only, never the result
TRSM_PANEL = 512         # columns of L^-1 per triangular solve: skips the zeros above each panel
                         # (n^3 / 3 flops, not n^3), and 512 columns keep the solve at BLAS-3 speed
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# ---- argument checks ------------------------------------------------------------------------


def _tensor(t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {t.dtype}")
    return t.detach()


def _int(v, what: str, lo: int, hi: int) -> int:
    v = ops._int(v, what)
    if not lo <= v <= hi:
        raise ValueError(f"{what} must be in [{lo}, {hi}], got {v}")
    return v


def _finite(t: torch.Tensor, what: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} must be finite")


def _prepare(w, u, scale, group, levels, qmin, qmax, block):
    """Checked float32 contiguous CPU arguments for the kernel and the reference."""
    w = _tensor(w, "w").to("cpu", torch.float32).contiguous()
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (rows x in_features), got shape {tuple(w.shape)}")
    rows, n = w.shape
    _finite(w, "w")
    u = _tensor(u, "u").to("cpu", torch.float32).contiguous()
    if tuple(u.shape) != (n, n):
        raise ValueError(f"u must be [{n}, {n}] (w has {n} columns), got shape {tuple(u.shape)}")
    ud = u.diagonal()
    if n and not bool((torch.isfinite(ud) & (ud > 0)).all()):
        raise ValueError("u's diagonal must be finite and > 0 (factor H with eoq.methods.feedback.inverse_cholesky, "
                         "which fixes dead columns)")
    _finite(torch.triu(u), "u's upper triangle")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        scale = torch.tensor(float(scale))
    scale = _tensor(scale, "scale").to("cpu", torch.float32)
    if scale.dim() == 0:
        scale = scale.expand(rows, 1)
    elif scale.dim() == 1:
        if scale.numel() != rows:
            raise ValueError(f"scale has {scale.numel()} values, w has {rows} rows")
        scale = scale.unsqueeze(1)
    elif scale.dim() != 2:
        raise ValueError(f"scale must be a number, [rows] or [rows, groups], got shape {tuple(scale.shape)}")
    if n == 0:
        scale = scale[:, :0]  # no columns, no groups: any per-row scale is accepted
    scale = scale.contiguous()
    if group is None:
        if scale.shape[1] > 1:
            raise ValueError(f"scale has {scale.shape[1]} columns: say how many weight columns each covers (group=)")
        group = max(n, 1)
    group = _int(group, "group", 1, 2**62)
    groups = -(-n // group)
    if tuple(scale.shape) != (rows, groups):
        raise ValueError(f"scale must be [rows, ceil(n / group)] = [{rows}, {groups}] for n = {n}, group = {group}; "
                         f"got shape {tuple(scale.shape)}")
    if scale.numel() and not bool((torch.isfinite(scale) & (scale != 0)).all()):
        raise ValueError("scale must be finite and non-zero")
    if levels is not None:
        levels = _tensor(levels, "levels").to("cpu", torch.float32).reshape(-1).contiguous()
        if levels.numel() == 0:
            raise ValueError("levels must hold at least one value")
        _finite(levels, "levels")
        if levels.numel() > 1 and not bool((levels[1:] > levels[:-1]).all()):
            raise ValueError("levels must be sorted (strictly increasing)")
    qmin = _int(qmin, "qmin", INT32_MIN, INT32_MAX)
    qmax = _int(qmax, "qmax", INT32_MIN, INT32_MAX)
    if qmin > qmax:
        raise ValueError(f"qmin ({qmin}) must not exceed qmax ({qmax})")
    block = _int(block, "block", 1, 2**62)
    return w, u, scale, group, levels, qmin, qmax, block


# ---- the kernel and its reference -------------------------------------------------------------


def gptq(w: torch.Tensor, u: torch.Tensor, scale, group: Optional[int] = None,
         levels: Optional[torch.Tensor] = None, qmin: int = INT32_MIN, qmax: int = INT32_MAX,
         block: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the rows of ``w`` [rows, n] with error feedback through ``u`` [n, n].

    u: the upper Cholesky factor of the damped inverse covariance (``inverse_cholesky``);
    only its upper triangle is read. scale: per-element scales, [rows, ceil(n / group)]
    (``group`` columns share one; group None: one scale per row, scale a number, [rows] or
    [rows, 1]). levels: None for the integer grid clamped to [qmin, qmax], or a sorted
    codebook (codes are level indices; qmin/qmax unused). block: the lazy-update width
    (speed only). Returns (codes int32 [rows, n], xhat float32 [rows, n]), xhat = the
    reconstruction (code * s, or levels[code] * s). Raises ValueError on invalid input or if
    the feedback diverges to non-finite values.
    """
    w, u, scale, group, levels, qmin, qmax, block = _prepare(w, u, scale, group, levels, qmin, qmax, block)
    return _C.gptq_quantize(w, u, scale, group, levels, qmin, qmax, block)


def gptq_reference(w: torch.Tensor, u: torch.Tensor, scale, group: Optional[int] = None,
                   levels: Optional[torch.Tensor] = None, qmin: int = INT32_MIN, qmax: int = INT32_MAX,
                   block: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``gptq`` as a torch loop over columns (vectorised over rows): slow, obvious, the oracle.

    GPTQ's lazy blocks, with the block's errors applied to the later columns one column of
    errors at a time (never as a matmul, whose summation order is the BLAS's): every
    element receives its updates in increasing j as a rounded product and a rounded
    subtraction, the kernel's order, so the results are equal bit for bit.
    """
    w, u, scale, group, levels, qmin, qmax, block = _prepare(w, u, scale, group, levels, qmin, qmax, block)
    rows, n = w.shape
    x = w.clone()
    codes = torch.zeros(rows, n, dtype=torch.int32)
    s_all = scale.repeat_interleave(group, dim=1)[:, :n]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        err = torch.empty(rows, i2 - i1)
        for j in range(i1, i2):
            s = s_all[:, j]
            v = x[:, j] / s
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"gptq_reference: column {j} became non-finite: the feedback diverged")
            if levels is None:
                c = torch.round(v).double().clamp(qmin, qmax).to(torch.int64)
                q = c.to(torch.float32) * s
            else:
                c = (v[:, None] - levels[None, :]).abs().argmin(dim=1)
                q = levels[c] * s
            d = u[j, j].expand(rows).contiguous()   # a full tensor: a 0-d divisor may take another path
            e = (x[:, j] - q) / d
            if not bool(torch.isfinite(e).all()):
                raise ValueError(f"gptq_reference: column {j} became non-finite: the feedback diverged")
            x[:, j] = q
            codes[:, j] = c.to(torch.int32)
            err[:, j - i1] = e
            x[:, j + 1:i2] -= e[:, None] * u[j, j + 1:i2][None, :]
        for jj in range(i2 - i1):
            x[:, i2:] -= err[:, jj:jj + 1] * u[i1 + jj, i2:][None, :]
    return codes, x


# ---- the covariance -------------------------------------------------------------------------


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _upper_inverse_factor(h: torch.Tensor, lam: float) -> Optional[torch.Tensor]:
    """float32 U, upper triangular, U^T U = (h + lam I)^-1; None if h + lam I is not PD.

    With P the reversal permutation and P A P = L L^T (lower Cholesky of the flipped
    matrix), U = P L^-1 P is upper triangular with a positive diagonal and U^T U = A^-1:
    one factorization and one triangular inverse (2 n^3 / 3 flops in all), without forming A^-1.
    """
    n = h.shape[0]
    a = h.flip(0, 1)  # a copy
    a.diagonal().add_(lam)
    lower, info = torch.linalg.cholesky_ex(a)
    del a
    if int(info) != 0:
        return None
    # L^-1 is lower triangular: solved a panel of columns at a time, each written straight to
    # its flipped place in U (peak memory: H, L and U, three n x n float64 matrices).
    u64 = torch.zeros(n, n, dtype=torch.float64)
    for k0 in range(0, n, TRSM_PANEL):
        k1 = min(k0 + TRSM_PANEL, n)
        rhs = torch.zeros(n - k0, k1 - k0, dtype=torch.float64)
        rhs.diagonal().fill_(1.0)
        u64[:n - k0, n - k1:n - k0] = torch.linalg.solve_triangular(lower[k0:, k0:], rhs, upper=False).flip(0, 1)
    del lower
    u = u64.to(torch.float32)
    del u64
    ud = u.diagonal()
    if not bool(torch.isfinite(u).all()) or not bool((ud > 0).all()):
        return None
    return u


def inverse_cholesky(h: torch.Tensor, damp: float = DEFAULT_DAMP, name: str = "tensor",
                     tokens: Optional[int] = None) -> torch.Tensor:
    """The float32 upper Cholesky factor U of (H + lambda I)^-1, lambda = damp * mean(diag H).

    h: the input covariance [n, n] (sum or mean of a a^T over calibration tokens; any
    floating dtype, used in float64). tokens: how many tokens it was summed over, if known.
    Never fails on a singular or all-zero H: see the module docstring for the rules and the
    warnings (each names ``name``). Raises ValueError if h is not square, not finite, or
    has a negative diagonal entry (then it is not a covariance).
    """
    h = _tensor(h, f"{name}: H")
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{name}: H must be square [n, n], got shape {tuple(h.shape)}")
    damp = float(damp)
    if not math.isfinite(damp) or damp < 0:
        raise ValueError(f"{name}: damp must be finite and >= 0, got {damp}")
    n = h.shape[0]
    hd = h.to("cpu", torch.float64)
    hd = (hd + hd.T) / 2  # a new tensor: the caller's H is never modified
    if not bool(torch.isfinite(hd).all()):
        raise ValueError(f"{name}: H must be finite")
    diag = hd.diagonal()
    if bool((diag < 0).any()):
        raise ValueError(f"{name}: H has a negative diagonal entry ({float(diag.min()):g}): not a covariance")
    if n == 0:
        return torch.zeros(0, 0)
    if tokens is not None:
        tokens = _int(tokens, "tokens", 0, 2**62)
        if tokens < n:
            _warn(f"{name}: H comes from {tokens} calibration tokens for {n} input features, so its rank is at "
                  f"most {tokens}: along the missing directions the damping ({damp:g} x mean diagonal), not the "
                  "data, decides the feedback")
    dead = diag == 0
    n_dead = int(dead.sum())
    if n_dead == n:
        _warn(f"{name}: H is zero (no input column ever saw a non-zero input): no feedback, plain rounding")
        return torch.eye(n)
    if n_dead:
        _warn(f"{name}: {n_dead} of {n} input columns never saw a non-zero input (H[j, j] = 0): they are "
              "quantized by plain rounding and feed nothing back")
        hd[dead, :] = 0
        hd[:, dead] = 0
    hd /= float(diag[~dead].mean())
    hd.diagonal()[dead] = 1.0
    lam = damp
    for attempt in range(DAMP_RETRIES + 1):
        u = _upper_inverse_factor(hd, lam)
        if u is not None:
            return u
        if attempt == DAMP_RETRIES:
            break
        nxt = lam * 10 if lam > 0 else FIRST_RETRY_DAMP
        _warn(f"{name}: H + {lam:g} x mean(diag H) I is not positive definite; retrying with damping {nxt:g}")
        lam = nxt
    _warn(f"{name}: H is not positive definite even with damping {lam:g} x mean(diag H): no feedback, "
          "plain rounding")
    return torch.eye(n)


def _rotation_block_matrix(block: int, seed: Optional[int]) -> torch.Tensor:
    """M_b (float64 [block, block]): one block of ops.hadamard's forward transform, x -> M_b x."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if seed is not None:
        h = h * ops.hadamard_signs(block, seed).to(torch.float64)[None, :]  # H diag(s)
    return h / math.sqrt(block)


def rotate_hessian(h: torch.Tensor, block: int, padded: int, seed: Optional[int]) -> torch.Tensor:
    """H in the domain of ``eoq.methods.rotation.rotate(w, block, padded, seed)``: M H_pad M^T.

    rotate maps each weight row to x = M w_pad (M block diagonal, orthogonal, the same for
    every row), so W a = X (M a_pad) and the rotated inputs' covariance is M H_pad M^T, with
    H zero-padded to padded x padded. float64 [padded, padded]. Cost: 4 padded^2 block flops.
    """
    h = _tensor(h, "H").to("cpu", torch.float64)
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"H must be square [n, n], got shape {tuple(h.shape)}")
    n = h.shape[0]
    block = _int(block, "block", 1, 2**24)
    padded = _int(padded, "padded", n, 2**62)
    if block & (block - 1) or padded % block:
        raise ValueError(f"block must be a power of two dividing padded, got block {block}, padded {padded}")
    if padded != n:
        h = torch.nn.functional.pad(h, (0, padded - n, 0, padded - n))
    mt = _rotation_block_matrix(block, seed).T.contiguous()

    def right(x):  # x M^T: every row's blocks through M_b
        return (x.reshape(padded, padded // block, block) @ mt).reshape(padded, padded)

    return right(right(h).T.contiguous()).T.contiguous()


def scale_hessian(h: torch.Tensor, col_scale: torch.Tensor) -> torch.Tensor:
    """H for AWQ-scaled columns: w' = w * s and inputs a / s give H' = H / (s s^T) (float64)."""
    h = _tensor(h, "H").to("cpu", torch.float64)
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"H must be square [n, n], got shape {tuple(h.shape)}")
    s = _tensor(col_scale, "col_scale").to("cpu", torch.float64).reshape(-1)
    if s.numel() != h.shape[0]:
        raise ValueError(f"col_scale has {s.numel()} values, H has {h.shape[0]} columns")
    if s.numel() and not bool((torch.isfinite(s) & (s > 0)).all()):
        raise ValueError("col_scale must be finite and > 0")
    return h / (s[:, None] * s[None, :])


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """trace((W - W^) H (W - W^)^T) in float64: the output error over the calibration inputs."""
    e = (_tensor(w, "w").to("cpu", torch.float64) - _tensor(w_hat, "w_hat").to("cpu", torch.float64))
    h = _tensor(h, "H").to("cpu", torch.float64)
    if e.dim() != 2 or tuple(h.shape) != (e.shape[1], e.shape[1]):
        raise ValueError(f"shapes do not match: w {tuple(w.shape)}, w_hat {tuple(w_hat.shape)}, H {tuple(h.shape)}")
    return float(((e @ h) * e).sum())


__all__ = ["gptq", "gptq_reference", "inverse_cholesky", "rotate_hessian", "scale_hessian", "output_error",
           "DEFAULT_DAMP", "DEFAULT_BLOCK"]
