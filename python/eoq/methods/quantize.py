"""``quantize_tensor``: the one entry point over every method (eoq.methods), with the
checks every method relies on (a finite 2-D weight, importance and covariance of the right
shapes) and AWQ around any of them (eoq.methods.awq)."""

from __future__ import annotations

from typing import Optional

import torch

from . import METHODS, ecsq
from .awq import awq_quantize
from .quantized import QuantizedTensor, check_weight


def quantize_tensor(weight: torch.Tensor, method: str = "ecsq", bits: float = 4, block_size: Optional[int] = None,
                    importance: Optional[torch.Tensor] = None, seed: int = 0, awq: bool = False,
                    name: str = "tensor", row_importance: Optional[torch.Tensor] = None,
                    row_tokens: Optional[float] = None, hessian: Optional[torch.Tensor] = None,
                    **options) -> QuantizedTensor:
    """Quantize a 2-D weight (out_features x in_features) with one of the methods.

    method: ``absmax``, ``polar``, ``turbo`` or ``ecsq`` (see eoq.methods). importance:
    per-input-channel E[a^2] from calibration; it weights the error that scale and step
    searches minimise, and with ``awq=True`` sets AWQ's per-channel scales (alpha searched).
    row_importance: one weight per row (an embedding row: how often its token occurs);
    ecsq gives each row a step ~ weight^(-1/2) (row_tokens: how many tokens the weights sum
    over, for the unseen rows' floor). The fixed-rate methods quantize each row on its own
    with a fixed code width, so a row's weight cannot change its codes there; they ignore it.
    hessian: the input covariance E[a a^T] [in, in] (eoq.calibrate.statistics with covariance=True):
    every method then quantizes with GPTQ-style error feedback (eoq.methods.feedback; options
    ``damp``, the relative damping, default 0.01, and ``hessian_tokens``, the number of
    calibration tokens behind it, for the rank warning); with awq the AWQ scales are folded
    into it and alpha is chosen by the output error trace(E H E^T) with feedback in the loop.
    Deterministic: same inputs and seed give the same codes whatever the thread count.
    """
    if method not in METHODS:
        raise ValueError(f"{name}: unknown method {method!r}; choose from {sorted(METHODS)}")
    streamed = method == "ecsq" and impl_streams(weight, hessian, options)
    w = check_weight(weight, name, keep_dtype=streamed)
    imp = None
    if importance is not None:
        imp = importance.detach().cpu().to(torch.float32).reshape(-1).contiguous()
        if imp.numel() != w.shape[1]:
            raise ValueError(f"{name}: importance has {imp.numel()} values for {w.shape[1]} input features")
        if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
            raise ValueError(f"{name}: importance must be finite and non-negative")
    impl = METHODS[method]
    if hessian is not None:
        options = {**options, "hessian": check_hessian(hessian, w.shape[1], name)}
    if row_importance is not None and getattr(impl, "RATE_TARGET", False):
        options = {**options, "row_importance": row_importance, "row_tokens": row_tokens}
    if awq:
        if imp is None:
            raise ValueError(f"{name}: awq=True needs importance (per-input-channel E[a^2] from calibration)")
        qt = awq_quantize(impl, w, bits, block_size, imp, seed, name=name, **options)
    else:
        qt = impl.quantize(w, bits, block_size=block_size, importance=imp, seed=seed, name=name, **options)
    qt.shape, qt.dtype, qt.name = tuple(w.shape), weight.dtype, name
    return qt


def impl_streams(weight: torch.Tensor, hessian, options: dict) -> bool:
    """Whether ecsq takes this weight chunk by chunk (ecsq.streams), so it may stay bf16."""
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and ecsq.streams(
        weight.numel(), hessian, options.get("lam"), options.get("group_rows"))


def check_hessian(hessian: torch.Tensor, cols: int, name: str) -> torch.Tensor:
    """The covariance as float64 [cols, cols], finite and symmetric (to rounding)."""
    if not isinstance(hessian, torch.Tensor):
        raise TypeError(f"{name}: hessian must be a torch.Tensor, got {type(hessian).__name__}")
    h = hessian.detach().cpu().to(torch.float64)
    if h.shape != (cols, cols):
        raise ValueError(f"{name}: hessian has shape {tuple(h.shape)}, expected [{cols}, {cols}] (in_features squared)")
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"{name}: hessian has non-finite values")
    scale = float(h.abs().max()) or 1.0
    if float((h - h.t()).abs().max()) > 1e-6 * scale:
        raise ValueError(f"{name}: hessian is not symmetric")
    return h
