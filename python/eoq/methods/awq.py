"""AWQ-style per-input-channel scaling, as an option of every method.

Activation-aware weight quantization (Lin et al., 2023) scales input channel c of a
weight by s_c before quantizing and by 1/s_c after, so channels that see large activations
are quantized more finely. Here s_c = E[a_c^2]^(alpha/2) (the RMS activation to the power
alpha, from calibration statistics), normalised to geometric mean 1 and stored in fp16;
alpha is grid-searched over 21 values in [0, 1] (6 with error feedback), and against no scales at all (their 16 bits a
column spent on the codes, for a rate target; ``awq_none=False`` leaves that out), to minimise the activation-weighted output
error sum_c E[a_c^2] ||W[:, c] - W_hat[:, c]||^2 of the method actually used (alpha = 0 is
the method without AWQ). Inside the search the method sees importance E[a_c^2] / s_c^2: the
same error, expressed on the scaled weight. With error feedback (a ``hessian`` option) the
covariance is scaled the same way (H / s s^T) and alpha is chosen by the full output error
trace(E H E^T) of the feedback quantizer itself: AWQ's scaling and feedback then work
together instead of AWQ's alpha being tuned for plain rounding.

The error is a sum over rows, so the search measures it on at most ``awq_rows`` (256)
evenly spaced rows and quantizes the whole weight once with the alpha found: the same
choice on any realistic layer, for a fraction of the time (``awq_rows=None``: all rows).
"""

from __future__ import annotations

import torch

from .quantized import QuantizedTensor, evenly_spaced_rows, exact_sum, weighted_error

ALPHAS = tuple(i / 20 for i in range(21))
# With error feedback every candidate costs a factorization of its scaled covariance and a
# rate search with feedback: a coarser grid (the error is flat near its minimum in alpha).
FEEDBACK_ALPHAS = tuple(i / 5 for i in range(6))


def awq_scales(importance: torch.Tensor, alpha: float) -> torch.Tensor:
    """fp16 scales E[a^2]^(alpha/2), geometric mean 1; dead channels get the smallest live scale."""
    imp = importance.double()
    live = imp[imp > 0]
    floor = float(live.min()) if live.numel() else 1.0
    s = imp.clamp_min(floor).pow(alpha / 2)
    s = s / s.log().mean().exp()
    return s.clamp(2.0**-14, 2.0**15).to(torch.float16)


def awq_quantize(impl, w: torch.Tensor, bits, block_size, importance: torch.Tensor, seed: int, name: str,
                 alphas=ALPHAS, awq_rows=256, awq_none: bool = True, **options) -> QuantizedTensor:
    full_bits = bits
    if getattr(impl, "RATE_TARGET", False) and "step" not in options and "lam" not in options:
        bits = float(bits) - 16.0 / w.shape[0]  # the fp16 AWQ scales come out of the same budget
    sample, sample_options = w, options
    rows_w = options.get("row_importance")
    if awq_rows is not None and w.shape[0] > awq_rows:
        idx = evenly_spaced_rows(w.shape[0], awq_rows)
        sample = w[idx].float()  # (w may be bf16: a tensor ecsq streams)
        if rows_w is not None:  # the sample's own rows keep their weights
            rows_w = torch.as_tensor(rows_w).reshape(-1)[idx]
            sample_options = {**options, "row_importance": rows_w}
    hessian = options.get("hessian")
    if hessian is not None and alphas is ALPHAS:
        alphas = FEEDBACK_ALPHAS

    def error(w_hat):
        if hessian is not None:  # feedback in the loop: the error it minimises, on the full covariance
            return _output_error(sample, w_hat, hessian, rows_w)
        return weighted_error(sample, w_hat, importance, None if rows_w is None else torch.as_tensor(rows_w))

    best_alpha, best_err = None, None
    for alpha in alphas:
        err = error(_quantize_scaled(impl, sample, bits, block_size, importance, seed, name, alpha,
                                     sample_options).dequantize(torch.float32))
        if best_err is None or err < best_err:
            best_alpha, best_err = alpha, err
    # No scales at all, their bits spent on the codes instead: where AWQ does not pay for its
    # side data (a small layer, or feedback already doing the work), this wins.
    none_err = error(impl.quantize(sample, full_bits, block_size=block_size, importance=importance, seed=seed,
                                   name=name, **sample_options).dequantize(torch.float32)) if awq_none else None
    if none_err is not None and none_err <= best_err:
        qt = impl.quantize(w, full_bits, block_size=block_size, importance=importance, seed=seed, name=name, **options)
        qt.meta["awq_alpha"] = None  # searched, and no scales won
        return qt
    qt = _quantize_scaled(impl, w, bits, block_size, importance, seed, name, best_alpha, options)
    qt.meta["awq_alpha"] = best_alpha
    return qt


def _output_error(w, w_hat, hessian, rows_w=None) -> float:
    """sum_r rows_w_r * e_r H e_r^T, e = w - w_hat (float64): the output error E||(W - W_hat) a||^2."""
    e = (w - w_hat).double()
    per_row = ((e @ hessian) * e).sum(1)
    if rows_w is not None:
        per_row = per_row * torch.as_tensor(rows_w).double().reshape(-1)
    return exact_sum(per_row)


def _quantize_scaled(impl, w, bits, block_size, importance, seed, name, alpha, options) -> QuantizedTensor:
    s16 = awq_scales(importance, alpha)
    s = s16.float()
    if options.get("hessian") is not None:  # the scaled weight's inputs are a / s
        s64 = s.double()
        options = {**options, "hessian": options["hessian"] / torch.outer(s64, s64)}
    if getattr(impl, "COL_SCALE", False):  # scaled as it is read: no scaled copy of w
        options = {**options, "col_scale": s}
    else:
        w = w * s
    qt = impl.quantize(w, bits, block_size=block_size, importance=importance / s.pow(2), seed=seed, name=name,
                       **options)
    qt.side["awq_scales"] = s16
    qt.dtype = w.dtype
    return qt
