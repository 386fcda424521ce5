"""The quantization methods through the one interface, eoq.quantize_tensor."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import eoq
from eoq import ops
from eoq.methods.quantized import weighted_error

METHODS = ["absmax", "polar", "turbo", "ecsq"]
GAUSSIAN_LLOYD_MAX = {2: 0.1175, 3: 0.03454, 4: 0.009497, 5: 0.002499}


def gaussian(rows=256, cols=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g)


def mse(qt, w):
    return float((qt.dequantize(torch.float32) - w).pow(2).mean())


@pytest.mark.parametrize("method", ["polar", "turbo"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_rotated_lloyd_max_matches_theory_on_gaussian_weights(method, bits):
    w = gaussian()
    # With the paper's scale (the block norm) the error is the codebook's MSE: N(0, 1)'s for
    # polar, within 3 % (the block norm is itself estimated from 128 values); the sphere law
    # in 128 dimensions (times 128) for turbo, within 2 %. The least-squares scale is better.
    theory = GAUSSIAN_LLOYD_MAX[bits] if method == "polar" else ops.lloyd_max(bits, "sphere", 128).mse * 128
    norm = mse(eoq.quantize_tensor(w, method, bits, scale="norm"), w)
    assert norm == pytest.approx(theory, rel=0.03 if method == "polar" else 0.02)
    assert mse(eoq.quantize_tensor(w, method, bits), w) <= norm


def test_ecsq_needs_fewer_bits_than_lloyd_max_at_equal_mse():
    """4-bit Lloyd-Max (fixed rate: 4 bits of codes) vs a uniform quantizer with an entropy
    coder tuned to the same MSE: theory says ~0.39 bit less (3.61 bits); require >= 0.3."""
    w = gaussian(512, 1024)
    lm = eoq.quantize_tensor(w, "polar", 4)
    target = mse(lm, w)
    lo, hi = 0.2, 0.5  # find the ECSQ step whose MSE equals Lloyd-Max's
    for _ in range(16):
        mid = (lo + hi) / 2
        if mse(eoq.quantize_tensor(w, "ecsq", 4, step=mid), w) > target:
            hi = mid
        else:
            lo = mid
    ecsq = eoq.quantize_tensor(w, "ecsq", 4, step=lo)
    assert mse(ecsq, w) <= target
    lm_code_bits = 4.0
    ecsq_code_bits = 8 * ops.rans_encode(ecsq.codes.reshape(-1)).numel() / w.numel()
    assert lm_code_bits - ecsq_code_bits >= 0.3, (lm_code_bits, ecsq_code_bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_ecsq_sits_a_quarter_bit_above_the_rate_distortion_bound(bits):
    w = gaussian(512, 1024, seed=bits)
    qt = eoq.quantize_tensor(w, "ecsq", bits)
    rate = qt.bits_per_weight("rans")
    assert rate <= bits  # the target is met with the real stream, side data included
    assert rate > bits - 0.01
    gap = rate - 0.5 * math.log2(1 / mse(qt, w))  # R(D) of a unit Gaussian is 0.5 log2(1/D)
    assert 0.2 < gap < (0.36 if bits > 2 else 0.4), gap


def test_ecsq_step_and_lambda_modes():
    w = gaussian(128, 512)
    qt = eoq.quantize_tensor(w, "ecsq", 4, step=0.25)
    assert float(qt.side["steps"][0]) == 0.25
    rates = [eoq.quantize_tensor(w, "ecsq", 0, lam=lam).bits_per_weight() for lam in (1e-4, 1e-3, 1e-2)]
    assert rates[0] > rates[1] > rates[2]  # a larger slope buys less rate
    grouped = eoq.quantize_tensor(w, "ecsq", 3, group_rows=32)
    assert grouped.side["steps"].numel() == 4 and grouped.bits_per_weight() <= 3


@pytest.mark.parametrize("method", METHODS)
def test_seeded_and_thread_independent(method, threads):
    w = gaussian(192, 576, seed=3)
    imp = torch.rand(576)
    out = []
    for t in threads:
        torch.set_num_threads(t)
        out.append(eoq.quantize_tensor(w, method, 4, importance=imp, seed=11))
    a, b = out
    assert torch.equal(a.codes, b.codes)
    assert a.side.keys() == b.side.keys() and all(torch.equal(a.side[k], b.side[k]) for k in a.side)
    assert torch.equal(a.code_stream("rans"), b.code_stream("rans"))
    if method != "absmax":  # the seed picks the rotation
        assert not torch.equal(eoq.quantize_tensor(w, method, 4, seed=12).codes, a.codes)


@pytest.mark.parametrize("method", METHODS)
def test_dequantized_weights_are_a_fixed_point(method):
    """Quantizing a method's own output gives it back: exact round trips on its grid."""
    w = gaussian(64, 512, seed=4)
    for bits in (2, 4, 6):
        qt = eoq.quantize_tensor(w, method, bits)
        w_hat = qt.dequantize(torch.float32)
        opts = {"step": float(qt.side["steps"][0])} if method == "ecsq" else {}
        again = eoq.quantize_tensor(w_hat, method, bits, **opts)
        assert torch.equal(again.codes, qt.codes)
        assert torch.equal(again.dequantize(torch.float32), w_hat)


@pytest.mark.parametrize("method", METHODS)
def test_stored_bytes_count_everything(method):
    w = gaussian(64, 256)
    qt = eoq.quantize_tensor(w, method, 4)
    side = sum(t.numel() * t.element_size() for t in qt.side.values())
    assert qt.stored_bytes("packed") == ops.pack_bits(qt.codes.reshape(-1), qt.code_bits).numel() + side
    assert qt.stored_bytes("rans") == ops.rans_encode(qt.codes.reshape(-1)).numel() + side
    with pytest.raises(ValueError, match="codec"):
        qt.stored_bytes("zip")


def outlier_layer(seed=0):
    """A layer whose inputs have a few channels with 30x larger activations (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 512, generator=g) * 0.02
    act_rms = torch.ones(512)
    act_rms[torch.randperm(512, generator=g)[:8]] = 30.0
    return w, act_rms.pow(2)  # importance = E[a^2]


@pytest.mark.parametrize("method", METHODS)
def test_awq_lowers_activation_weighted_error(method):
    w, imp = outlier_layer()
    bits = 3
    plain = eoq.quantize_tensor(w, method, bits)
    awq = eoq.quantize_tensor(w, method, bits, importance=imp, awq=True)
    assert "awq_scales" in awq.side and awq.side["awq_scales"].dtype == torch.float16
    assert 0 < awq.meta["awq_alpha"] <= 1
    e_plain = weighted_error(w, plain.dequantize(torch.float32), imp)
    e_awq = weighted_error(w, awq.dequantize(torch.float32), imp)
    assert e_awq < 0.8 * e_plain, (e_awq, e_plain)
    if method == "ecsq":
        assert awq.bits_per_weight() <= bits  # the AWQ scales are inside the rate


def test_absmax_importance_search_lowers_weighted_error():
    w, imp = outlier_layer(1)
    plain = eoq.quantize_tensor(w, "absmax", 3)
    searched = eoq.quantize_tensor(w, "absmax", 3, importance=imp)
    assert weighted_error(w, searched.dequantize(torch.float32), imp) < weighted_error(
        w, plain.dequantize(torch.float32), imp)


@pytest.mark.parametrize("method", METHODS)
def test_bad_input_names_the_tensor(method):
    with pytest.raises(ValueError, match=r"layers.0.q_proj: non-finite value nan at \[1, 2\]"):
        w = torch.zeros(4, 64)
        w[1, 2] = float("nan")
        eoq.quantize_tensor(w, method, 4, name="layers.0.q_proj")
    with pytest.raises(ValueError, match="inf"):
        eoq.quantize_tensor(torch.full((4, 64), float("inf")), method, 4, name="x")
    with pytest.raises(ValueError, match="norm.weight: only 2-D"):
        eoq.quantize_tensor(torch.ones(64), method, 4, name="norm.weight")
    with pytest.raises(ValueError, match="unknown method"):
        eoq.quantize_tensor(torch.ones(4, 64), "gptq", 4)
    with pytest.raises(ValueError, match="importance has 3 values"):
        eoq.quantize_tensor(torch.ones(4, 64), method, 4, importance=torch.ones(3))
    with pytest.raises(ValueError, match="needs importance"):
        eoq.quantize_tensor(torch.ones(4, 64), method, 4, awq=True)


@pytest.mark.parametrize("method", METHODS)
def test_zero_rows_and_ragged_widths(method):
    """All-zero rows come back as zeros; widths the block does not divide follow the
    documented rule (absmax: a shorter last block; rotations: a smaller block or padding)."""
    for cols in (576, 100, 40):
        w = gaussian(256, cols, seed=cols)  # enough weights that ecsq's stream header is small
        w[3] = 0
        qt = eoq.quantize_tensor(w, method, 5)
        w_hat = qt.dequantize(torch.float32)
        assert w_hat.shape == w.shape
        assert torch.equal(w_hat[3], torch.zeros(cols))
        assert mse(qt, w) < 0.01
    qt = eoq.quantize_tensor(gaussian(8, 576), "polar", 4)
    if method == "polar":
        assert qt.meta["rotation_block"] == 64 and qt.meta["padded_cols"] == 576
    qt = eoq.quantize_tensor(gaussian(8, 100), "turbo", 4)
    assert qt.meta["padded_cols"] == 112 and qt.meta["rotation_block"] == 16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_is_kept(dtype):
    w = gaussian(16, 128).to(dtype)
    for method in METHODS:
        qt = eoq.quantize_tensor(w, method, 4)
        assert qt.dtype == dtype and qt.dequantize().dtype == dtype


def _within_half_step(qt, w):
    w_hat = qt.dequantize(torch.float32)
    step = float(qt.side["steps"][0])
    # each rotated value is within step/2 and the rotation is orthonormal
    assert float((w_hat - w).double().pow(2).sum()) <= w.numel() * (0.5 * step) ** 2 * 1.001


def test_ecsq_codes_past_8_bits_with_an_outlier():
    """An outlier 1000 sigma out used to force the 256-code step floor (5.9 bits at most);
    codes past 8 bits (low bits stored raw) now meet 8 bits/weight exactly."""
    w = gaussian(64, 256)
    w[5, 7] = 1000.0
    qt = eoq.quantize_tensor(w, "ecsq", 8)
    assert not qt.meta["rate_limited"] and qt.meta["low_bits"] >= 1
    assert 7.9 <= qt.bits_per_weight() <= 8.0
    assert int(qt.codes.max()) <= 255 and qt.side["low"].dtype == torch.uint8
    _within_half_step(qt, w)


def test_ecsq_rate_cap_with_a_huge_outlier():
    """Levels must span < 2^16 values: a 10^6-sigma outlier hits that floor at 12 bits, which
    the metadata says, and nothing wraps."""
    w = gaussian(64, 256)
    w[5, 7] = 1e6
    qt = eoq.quantize_tensor(w, "ecsq", 12)
    assert qt.meta["rate_limited"] and qt.meta["low_bits"] == 8
    assert qt.bits_per_weight() < 12
    _within_half_step(qt, w)


@pytest.mark.parametrize("bits", [6.5, 8, 10])
def test_ecsq_high_rates_within_half_a_percent_of_the_entropy(bits):
    """The stored codes (rANS stream of hi + raw low bits) cost within 0.5 % of the order-0
    entropy of the full levels, and the rate target is met."""
    w = gaussian(512, 2048, seed=3)
    qt = eoq.quantize_tensor(w, "ecsq", bits)
    assert abs(qt.bits_per_weight() - bits) < 0.01 * bits
    k = qt.meta.get("low_bits", 0)
    levels = qt.codes.to(torch.int64)
    if k:
        low = ops.unpack_bits(qt.side["low"], k, levels.numel()).view(levels.shape)
        levels = (levels << k) | low.to(torch.int64)
    _, counts = torch.unique(levels, return_counts=True)
    p = counts.double() / counts.sum()
    entropy = float(-(p * p.log2()).sum()) * levels.numel()
    stored = 8 * (qt.stored_bytes() - qt.side["steps"].numel() * 4)
    assert entropy <= stored <= 1.005 * entropy
    assert (k >= 1) == (bits >= 8)
    _within_half_step(qt, w)


@pytest.mark.parametrize("bits", [1.5, 2, 2.5, 3])
def test_ecsq_fitted_reconstruction_never_increases_the_error(bits):
    """At low rates the fitted reconstruction points (conditional means of the cells) lower the
    error on the weights they were fitted on, at the same codes; the rate target holds."""
    w = gaussian(128, 512, seed=7)
    w[:, :16] *= 4  # not quite Gaussian
    plain = eoq.quantize_tensor(w, "ecsq", bits, recon=False)
    fitted = eoq.quantize_tensor(w, "ecsq", bits)
    assert fitted.bits_per_weight() <= bits
    if "recon" in fitted.meta:
        r = fitted.side["recon"]
        assert r.dtype == torch.float32 and r.numel() == fitted.meta["recon"] <= 4
        # the same codes with the midpoints: the fitted values only lower the error
        mid = dataclasses.replace(fitted, side={k: v for k, v in fitted.side.items() if k != "recon"},
                                  meta={k: v for k, v in fitted.meta.items() if k != "recon"})
        assert mse(fitted, w) <= mse(mid, w) * (1 + 1e-6)
    if bits <= 2.5:
        assert "recon" in fitted.meta and mse(fitted, w) < 0.97 * mse(plain, w)


def test_ecsq_no_reconstruction_points_at_high_rates_or_with_feedback():
    w = gaussian(64, 512)
    assert "recon" not in eoq.quantize_tensor(w, "ecsq", 5).meta
    assert "recon" not in eoq.quantize_tensor(w, "ecsq", 2, hessian=torch.eye(512, dtype=torch.float64)).meta


# ---- ecsq row importance ------------------------------------------------------------------


def _row_weights(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(rows, generator=g).pow(6) * 1000  # Zipf-like: a few rows matter a lot
    w[: rows // 5] = 0  # never seen
    return w


def test_row_multipliers_reference():
    """m_i = (rho'_i / gm)^(-1/2), rho' = rho + prior * sum(rho) / tokens, clipped to 16x its
    geometric mean either way; written out in numpy."""
    from eoq.methods import ecsq

    rho = _row_weights(300, 1)
    m = ecsq.row_multipliers(rho, row_tokens=500).double().numpy()
    r = rho.double().numpy()
    r = r + ecsq.ROW_PRIOR * r.sum() / 500
    gm = np.exp(np.log(r).mean())
    r = np.clip(r, gm / ecsq.ROW_RANGE, gm * ecsq.ROW_RANGE)
    want = r ** -0.5
    want /= np.exp(np.log(want).mean())
    np.testing.assert_allclose(m, want, rtol=1e-6)
    assert m.max() / m.min() <= 4.0 * 1.0001 * 4.0  # the multipliers span at most 16x
    assert ecsq.row_multipliers(torch.zeros(5)).tolist() == [1.0] * 5  # nothing seen: rows alike


def test_row_importance_lowers_the_row_weighted_error_at_equal_rate():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 256, generator=g)
    rho = _row_weights(512)
    plain = eoq.quantize_tensor(w, "ecsq", 4.0)
    rows = eoq.quantize_tensor(w, "ecsq", 4.0, row_importance=rho, row_tokens=1000)
    assert rows.bits_per_weight() <= 4.0 and plain.bits_per_weight() <= 4.0
    assert rows.bits_per_weight() >= 4.0 * 0.999  # the per-row steps (32 bits a row) are counted
    assert rows.side["steps"].shape == (512,) and rows.meta["group_rows"] == 1
    e_rows = weighted_error(w, rows.dequantize(), None, rho)
    e_plain = weighted_error(w, plain.dequantize(), None, rho)
    assert e_rows < 0.7 * e_plain
    # The codes are round(x_i / (step * m_i)) of the rotated rows.
    from eoq.methods import ecsq
    from eoq.methods import rotation
    x = rotation.rotate(w, rows.meta["rotation_block"], rows.meta["padded_cols"], 0)
    q = torch.round(x / rows.side["steps"].reshape(-1, 1).double().float())
    assert (q - rows.meta["offset"] - rows.codes.float()).abs().max() <= 1  # float32 step products: at most one off
    assert torch.equal(rows.dequantize(), eoq.QuantizedTensor(**{**rows.__dict__, "_stored": {}}).dequantize())


def test_row_importance_with_awq_and_bad_input():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 128, generator=g)
    imp = torch.rand(128, generator=g) + 0.1
    qt = eoq.quantize_tensor(w, "ecsq", 3.5, importance=imp, awq=True, row_importance=_row_weights(300))
    assert "awq_scales" in qt.side and qt.side["steps"].shape == (300,) and qt.bits_per_weight() <= 3.5
    with pytest.raises(ValueError, match="row_importance has 7 values for 300 rows"):
        eoq.quantize_tensor(w, "ecsq", 3.5, row_importance=torch.ones(7))
    with pytest.raises(ValueError, match="finite and non-negative"):
        eoq.quantize_tensor(w, "ecsq", 3.5, row_importance=-torch.ones(300))
    with pytest.raises(ValueError, match="at most one of group_rows= and row_importance="):
        eoq.quantize_tensor(w, "ecsq", 3.5, row_importance=torch.ones(300), group_rows=10)
    # A fixed-rate method quantizes rows independently: row weights cannot change its codes.
    a = eoq.quantize_tensor(w, "absmax", 4, row_importance=_row_weights(300))
    assert torch.equal(a.codes, eoq.quantize_tensor(w, "absmax", 4).codes)


@pytest.mark.parametrize("bracket", [0.03, 1e-7])  # the default, and one the answer always falls outside
@pytest.mark.parametrize("bits", [2.5, 4.0, 7.0])
def test_ecsq_step_search_from_a_sample_meets_the_rate_as_the_full_search(monkeypatch, bits, bracket):
    """Large tensors start the step search from a sample of rows (_solve_bracketed): the rate
    is met from below as closely as the full search meets it, also when the answer lies outside
    the sample's bracket (either side)."""
    from eoq.methods import ecsq, ecsq_search

    g = torch.Generator().manual_seed(8)
    w = torch.randn(512, 512, generator=g) * torch.rand(512, 1, generator=g).add(0.3)
    full = ecsq.quantize(w, bits, seed=2, recon=False)
    monkeypatch.setattr(ecsq_search, "SEARCH_SAMPLE", 512 * 16)
    monkeypatch.setattr(ecsq_search, "SEARCH_BRACKET", bracket)
    calls = []
    real = ecsq_search._solve
    monkeypatch.setattr(ecsq_search, "_solve", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    sampled = ecsq.quantize(w, bits, seed=2, recon=False)
    assert len(calls) >= 2  # the sample's search, then the whole tensor's
    assert sampled.meta["rate_limited"] is full.meta["rate_limited"] is False
    # both searches stop within 1e-4 of the target rate: the same step within a few 1e-4
    assert float(sampled.side["steps"][0]) == pytest.approx(float(full.side["steps"][0]), rel=2e-3)
    target = bits * w.numel() / 8
    for qt in (full, sampled):  # met from below, within 0.5 %
        assert 0.995 * target <= qt.stored_bytes() <= target
