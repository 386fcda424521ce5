"""eoq.convert.allocate: rate-distortion curves, lower hulls, the equal-slope solution, and a global
allocation inside a conversion (budget met, resumable, deterministic)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

import eoq
from eoq.convert import allocate
from eoq.methods import ecsq

from tinymodels import correlated_layer, save


def test_lower_hull_by_hand():
    rates = [1, 2, 3, 4, 5, 6]
    dists = [10, 4, 3.5, 1, 0.9, 0.9]   # (3, 3.5) lies above the chord from 2 to 4; (6, 0.9) buys nothing
    assert allocate.lower_hull(rates, dists) == [(1, 10), (2, 4), (4, 1), (5, 0.9)]


def test_solve_spends_the_budget_exactly_and_equalises_slopes():
    """Gaussian-like curves D = s^2 n 2^(-2R): the optimum gives every tensor the same
    distortion per weight (reverse water-filling), R_i - R_j = log2(s_i / s_j)."""
    grid = [2 + 0.05 * i for i in range(121)]
    curves = {name: (n, grid, [s * s * n * 2 ** (-2 * r) for r in grid])
              for name, n, s in (("a", 1000, 1.0), ("b", 3000, 2.0), ("c", 500, 0.5))}
    budget = 4.0 * 4500
    rates = allocate.solve(curves, budget)
    assert sum(curves[k][0] * r for k, r in rates.items()) == pytest.approx(budget, rel=1e-12)
    assert rates["b"] - rates["a"] == pytest.approx(1.0, abs=0.06)
    assert rates["a"] - rates["c"] == pytest.approx(1.0, abs=0.06)


def test_solve_beats_every_vertex_combination():
    """On small random convex-ish curves, no combination of measured points within the same
    budget has a lower total distortion than the allocation (interpolated on its hull)."""
    g = torch.Generator().manual_seed(3)
    curves = {}
    for k in range(3):
        rates = sorted(set(round(2 + 4 * float(v), 2) for v in torch.rand(5, generator=g)))
        d0 = float(torch.rand(1, generator=g)) * 10 + 1
        dists = [d0 * 2 ** (-2 * r) * (1 + 0.2 * float(torch.rand(1, generator=g))) for r in rates]
        curves[f"t{k}"] = (100 * (k + 1), rates, dists)
    budget = 0.5 * (sum(n * r[0] for n, r, _ in curves.values()) + sum(n * r[-1] for n, r, _ in curves.values()))
    rates = allocate.solve(curves, budget)

    def dist_at(name, r):
        h = allocate.lower_hull(curves[name][1], curves[name][2])
        for (r0, d0), (r1, d1) in zip(h, h[1:]):
            if r0 <= r <= r1 + 1e-12:
                return d0 + (d1 - d0) * (r - r0) / (r1 - r0)
        return h[0][1] if r <= h[0][0] else h[-1][1]

    best = sum(dist_at(k, r) for k, r in rates.items())
    names = sorted(curves)
    for combo in itertools.product(*(range(len(curves[k][1])) for k in names)):
        spent = sum(curves[k][0] * curves[k][1][i] for k, i in zip(names, combo))
        if spent <= budget:
            assert best <= sum(curves[k][2][i] for k, i in zip(names, combo)) * (1 + 1e-9)


def test_solve_rejects_a_budget_below_the_floor():
    curves = {"a": (100, [2.0, 4.0], [1.0, 0.1])}
    with pytest.raises(ValueError, match="below what the lowest allowed rate gives"):
        allocate.solve(curves, 100 * 1.5)
    assert allocate.solve(curves, 100 * 9.0) == {"a": 4.0}  # more than the top: everything at the top


def test_rd_curve_matches_ecsq_at_its_rates():
    """The curve's rate at a step is what ecsq stores at that rate: quantizing at a curve
    point's rate gives a relative error within a few % of the curve's."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    rates, dists = allocate.rd_curve(w, None, None, seed=5, min_bits=2.0, max_bits=6.0)
    assert rates[0] == 2.0 and rates[-1] == 6.0 and rates == sorted(rates)
    assert all(d1 <= d0 for d0, d1 in zip(dists, dists[1:]))
    r, d = rates[len(rates) // 2], dists[len(rates) // 2]
    qt = ecsq.quantize(w, r, seed=5)
    err = float((ecsq.dequantize(qt) - w).double().pow(2).sum() / w.double().pow(2).sum())  # relative
    assert err == pytest.approx(d, rel=0.05)


@pytest.mark.parametrize("rows_weighted", [False, True])
def test_absolute_curve_is_the_weighted_mean_square_error(rows_weighted):
    """ERROR_MODEL "white": the same points, the distortion over sum rho * sum a instead of the
    weighted energy; quantized at a point's rate, the decoded error's weighted mean square is
    the curve's within a few %."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(96, 256, generator=g) * 0.05
    imp = torch.rand(256, generator=g).add(0.1)
    rows_w = torch.rand(96, generator=g).add(0.5) if rows_weighted else None
    args = dict(importance=imp, seed=2, min_bits=2.0, max_bits=6.0, row_importance=rows_w,
                row_tokens=500 if rows_weighted else None)
    rates, rel = allocate.rd_curve(w, **args)
    rates_abs, ab = allocate.rd_curve(w, **args, absolute=True)
    assert rates_abs == rates
    rho = rows_w.double() if rows_weighted else torch.ones(96, dtype=torch.float64)
    energy = float((rho[:, None] * imp.double() * w.double().pow(2)).sum())
    total = float(rho.sum() * imp.double().sum())
    for r, a in zip(rel, ab):
        assert a * total == pytest.approx(r * energy, rel=1e-7)
    i = len(rates) // 2
    qt = ecsq.quantize(w, rates[i], seed=2, importance=imp, row_importance=rows_w,
                       row_tokens=500 if rows_weighted else None)
    err = float((rho[:, None] * imp.double() * (ecsq.dequantize(qt) - w).double().pow(2)).sum()) / total
    assert err == pytest.approx(ab[i], rel=0.08)


@pytest.mark.parametrize("rows_weighted", [False, True])
def test_rd_curve_of_a_sample_of_rows_is_the_whole_tensors(monkeypatch, rows_weighted):
    """Above CURVE_SAMPLE weights the curve is measured on evenly spaced rows: its rates and
    relative distortions stay those of the whole tensor (rows of different scales, input
    channels of different importance). A tensor with row weights (an embedding's) is
    measured whole: the same curve, bit for bit."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1024, 256, generator=g) * torch.rand(1024, 1, generator=g).add(0.2)
    imp = torch.rand(256, generator=g).pow(3).add(1e-3)
    rows_w = torch.rand(1024, generator=g).pow(4) * 50 if rows_weighted else None
    args = dict(importance=imp, seed=1, min_bits=2.0, max_bits=8.0, row_importance=rows_w,
                row_tokens=2000 if rows_weighted else None)
    full = allocate.rd_curve(w, **args)
    monkeypatch.setattr(allocate, "CURVE_SAMPLE", 256 * 128)  # an eighth of the rows
    sample = allocate.rd_curve(w, **args)
    if rows_weighted:
        assert sample == full
    for r in (2.5, 4.0, 6.0):  # the distortion at equal rate, read off both curves
        d_full = allocate.hull_value(*full, r)
        d_sample = allocate.hull_value(*sample, r)
        assert d_sample == pytest.approx(d_full, rel=0.04), r  # measured within 2 %


def test_rd_curve_with_feedback_is_the_feedback_quantizers():
    """With the inputs' covariance the curve is error feedback's: its relative output error at
    a rate is what ecsq with feedback reaches there (within the interpolation between points),
    and on correlated inputs well below plain rounding's curve."""
    from eoq.methods import feedback
    from eoq.methods.quantized import weighted_error

    w, h, _ = correlated_layer()
    imp = torch.diagonal(h).float()
    plain = allocate.rd_curve(w, imp, None, 3, 1.5, 8.0)
    fb = allocate.rd_curve(w, imp, None, 3, 1.5, 8.0, hessian=h, hessian_tokens=4096)
    assert fb[0][0] == 1.5 and fb[0][-1] == 8.0 and len(fb[0]) <= allocate.FEEDBACK_POINTS + 2
    energy = weighted_error(w, torch.zeros_like(w), imp)
    for bits in (2.5, 4.0):
        qt = ecsq.quantize(w, bits, importance=imp, seed=3, hessian=h, hessian_tokens=4096)
        real = feedback.output_error(w, ecsq.dequantize(qt), h) / energy
        assert allocate.hull_value(*fb, bits) == pytest.approx(real, rel=0.2)
        assert allocate.hull_value(*fb, bits) < 0.6 * allocate.hull_value(*plain, bits)


def test_allocation_sees_feedbacks_gain():
    """Feedback removes much of the error of a layer with correlated inputs and none of one
    with white inputs; an allocation by feedback's curves moves bits from the first to the
    second, which one by plain rounding's curves cannot know."""
    wa, ha, _ = correlated_layer(seed=1)
    wb = torch.randn(wa.shape, generator=torch.Generator().manual_seed(2)) * 0.02
    hb = torch.eye(wa.shape[1], dtype=torch.float64) * float(torch.diagonal(ha).mean())
    n = wa.numel()

    def rates(with_feedback):
        curves = {}
        for name, w, h in (("a", wa, ha), ("b", wb, hb)):
            extra = {"hessian": h, "hessian_tokens": 4096} if with_feedback else {}
            r, d = allocate.rd_curve(w, torch.diagonal(h).float(), None, 0, 1.5, 8.0, **extra)
            curves[name] = (n, r, d)
        return allocate.solve(curves, 2 * n * 3.0)

    plain, fb = rates(False), rates(True)
    assert abs(plain["a"] - plain["b"]) < 0.2
    assert fb["a"] < plain["a"] - 0.25 and fb["b"] > plain["b"] + 0.25
    assert fb["a"] + fb["b"] == pytest.approx(6.0)


def _manifest(out):
    return json.loads((out / "quant_manifest.json").read_text())


def test_proxy_allocation_meets_the_whole_model_budget(tmp_path):
    src = save("llama", tmp_path / "src")
    cfg = eoq.QuantConfig(bits=3.0, calibration=None, awq=False, allocation="global", allocation_range=[1.5, 6.0])
    assert cfg.allocation == "proxy"  # the old name
    m = eoq.quantize_model(src, tmp_path / "q", cfg, progress=False, verbose=False)
    q = {n: e for n, e in m["tensors"].items() if e["kind"] == "quantized"}
    # Everything stored (codes, side data, the 16-bit norms, the marker) over every parameter.
    params = m["totals"]["all_params"]
    assert m["allocation"]["budget_bits"] == pytest.approx(3.0 * params)
    assert 3.0 * params * 0.995 <= 8 * m["totals"]["stored_bytes"] <= 3.0 * params
    assert m["totals"]["bits_per_weight_all"] <= 3.0
    bits = sorted(e["bits"] for e in q.values())
    assert bits[0] >= 1.5 and bits[-1] <= 6.0 and bits[-1] - bits[0] > 0.1  # rates do differ
    assert "| allocation | proxy: by equal slope" in (tmp_path / "q" / "README.md").read_text()
    model, _ = eoq.load_quantized(tmp_path / "q", dtype=torch.float32)
    assert model(torch.tensor([[1, 5, 9]])).logits.isfinite().all()


def test_global_allocation_uses_the_activation_statistics(tmp_path):
    """A layer whose most active inputs meet its smallest weights loses relatively more of its
    output to the same weight error (the rotation spreads the error over all inputs), so
    with those statistics it gets more bits than without them."""
    from eoq.calibrate.statistics import ActStats

    from tinymodels import build

    key = "model.layers.0.mlp.down_proj.weight"
    model = build("llama", dtype=torch.float32)
    with torch.no_grad():
        model.get_parameter(key)[:, :4] *= 0.01
    model.save_pretrained(str(tmp_path / "src"))
    cfg = eoq.QuantConfig(bits=3.0, calibration=None, awq=False, allocation="global")
    plain = eoq.quantize_model(tmp_path / "src", tmp_path / "a", cfg, progress=False, verbose=False)
    stats = {}
    for n, e in plain["tensors"].items():
        if e["kind"] == "quantized":
            v = torch.ones(e["shape"][1], dtype=torch.float64)
            if n == key:
                v[:4] = 1000.0
            stats[n.removesuffix(".weight")] = ActStats(v, torch.zeros_like(v), 1)
    weighted = eoq.quantize_model(tmp_path / "src", tmp_path / "b", cfg, stats=stats, progress=False, verbose=False)
    assert weighted["tensors"][key]["bits"] > plain["tensors"][key]["bits"] + 0.5


def test_global_allocation_resumes_to_the_same_bytes(tmp_path):
    src = save("llama", tmp_path / "src")
    cfg = eoq.QuantConfig(bits=3.5, calibration=None, awq=False, allocation="global")
    eoq.quantize_model(src, tmp_path / "ref", cfg, progress=False, verbose=False)
    code = ("import eoq, sys; eoq.quantize_model(sys.argv[1], sys.argv[2], eoq.QuantConfig.from_json(sys.argv[3]), "
            "progress=False, verbose=False)")
    args = [sys.executable, "-c", code, str(src), str(tmp_path / "out"), cfg.to_json()]
    # 6 fixed tensors (5 norms, the tie) are written before the allocation, then 3 quantized ones
    env = {**os.environ, "EOQ_FAULT_AFTER_TENSORS": "9", "OMP_NUM_THREADS": "1"}
    assert subprocess.run(args, env=env).returncode == 75
    assert (tmp_path / ".out.eoq-partial" / "allocation.json").is_file()
    env.pop("EOQ_FAULT_AFTER_TENSORS")
    env["OMP_NUM_THREADS"] = "2"
    assert subprocess.run(args, env=env).returncode == 0
    for f in ("model.safetensors", "quant_manifest.json"):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


def test_allocation_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="needs a method with a continuous rate"):
        eoq.QuantConfig(method="polar", allocation="proxy")
    with pytest.raises(ValueError, match="allocation must be one of"):
        eoq.QuantConfig(allocation="greedy")
    assert eoq.QuantConfig(method="polar", bits=3).allocation == "uniform"
    assert eoq.QuantConfig().allocation == "sensitivity"
    assert eoq.QuantConfig(calibration=None, awq=False).allocation == "proxy"
    src = save("llama", tmp_path / "src")
    with pytest.raises(ValueError, match=r"below the smallest size the settings allow.*at 1.5 bits/weight"):
        eoq.quantize_model(src, tmp_path / "q", eoq.QuantConfig(bits=1.0, calibration=None, awq=False),
                           progress=False, verbose=False)
    assert not (tmp_path / ".q.eoq-partial").exists()  # refused before any work


def test_cli_global_allocation(tmp_path):
    from eoq.cli import main

    src = save("llama", tmp_path / "src")
    out = tmp_path / "q"
    assert main(["quantize", str(src), "-o", str(out), "--data-free", "--bits", "3.5", "--allocation", "global",
                 "--allocation-range", "2.5", "5", "--no-progress"]) == 0
    m = _manifest(out)
    assert m["config"]["allocation"] == "proxy" and m["config"]["allocation_range"] == [2.5, 5.0]
    assert 2.5 <= m["allocation"]["min_bits"] <= m["allocation"]["max_bits"] <= 5.0
