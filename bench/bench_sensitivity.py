#!/usr/bin/env python3
"""How well the linear sensitivity model predicts the KL divergence of a quantized model.

    python bench/bench_sensitivity.py --calib CALIB.txt [--model dithered|HF_FOLDER] [--noise-every 1]
        [--allocations 4] [--rel-mse 0.004] [--json PATH]

On SmolLM2-135M-dithered (or any HF folder), with the calibration text's first
``--fisher-sequences`` windows of 512 tokens for the Fisher pass and the *next*
``--eval-sequences`` windows for every measured KL (so no measurement sees the Fisher pass's
tokens):

1. Fisher against noise injection: every ``--noise-every``-th 2-D tensor gets seeded Gaussian
   noise of relative mean square ``--rel-mse``, one at a time; the measured KL against the
   Fisher prediction c_t * eps (ratio quantiles, Spearman rank correlation), and the time of
   each way (noise injection costs one forward pass over the evaluation windows per tensor,
   the Fisher pass one forward and one backward pass per Fisher window for all tensors).
2. Additivity: noise in all of those tensors at once against the sum of their single KLs.
3. Allocations: the KL that eoq's rate-distortion curves and coefficients predict
   (sum_t c_t D_t(R_t), what the allocator minimises) against the measured KL of the model
   quantized with those rates (ecsq, activation statistics, AWQ off so the rate-distortion
   curve is exactly what is quantized): the sensitivity allocation, the uniform rate and
   ``--allocations`` random allocations, all at ``--bits`` bits/weight over the quantized
   tensors.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import random
import time

import torch
from _report import write_json  # bench/ is on sys.path (the scripts run as files)


def spearman(a: list[float], b: list[float]) -> float:
    ra = {i: r for r, i in enumerate(sorted(range(len(a)), key=lambda i: a[i]))}
    rb = {i: r for r, i in enumerate(sorted(range(len(b)), key=lambda i: b[i]))}
    n = len(a)
    d2 = sum((ra[i] - rb[i]) ** 2 for i in range(n))
    return 1 - 6 * d2 / (n * (n * n - 1))


@torch.no_grad()
def kl_to(base_logp: list[torch.Tensor], model, seqs) -> float:
    total = n = 0.0
    for s, lb in zip(seqs, base_logp):
        lq = torch.log_softmax(model(input_ids=s.reshape(1, -1)).logits[0].float(), -1)
        total += float((lb.exp() * (lb - lq)).sum())
        n += s.numel()
    return total / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dithered")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--fisher-sequences", type=int, default=8)
    ap.add_argument("--eval-sequences", type=int, default=4)
    ap.add_argument("--noise-every", type=int, default=1)
    ap.add_argument("--rel-mse", type=float, default=0.004)
    ap.add_argument("--allocations", type=int, default=4)
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    import eoq
    from eoq.convert import allocate
    from eoq.calibrate import statistics as cal
    from eoq.calibrate import sensitivity as sens
    from eoq.convert.plan import importance_for, row_importance_for, tensor_seed
    from eoq.format.sources import open_source
    from eoq.testing import models as testmodels

    folder = testmodels.smollm2_dithered() if a.model == "dithered" else pathlib.Path(a.model)
    source = open_source(folder)
    model = source.load_model()
    seqs = cal.token_sequences(cal.load_text(a.calib), source.tokenizer, a.fisher_sequences + a.eval_sequences, 512)
    fisher_seqs, eval_seqs = seqs[:a.fisher_sequences], seqs[a.fisher_sequences:]
    report: dict = {"model": folder.name, "rel_mse": a.rel_mse, "params": sum(p.numel() for p in model.parameters())}

    t0 = time.perf_counter()
    s = sens.fisher_pass(model, fisher_seqs, row_params=source.vocab, seed=a.seed)
    report["fisher_s"] = time.perf_counter() - t0
    names = sorted(n for n in source.names if n in s.fisher and n not in source.tied)
    picked = names[::a.noise_every]
    t0 = time.perf_counter()
    measured = sens.noise_kl(model, eval_seqs, picked, a.rel_mse, seed=a.seed)
    report["noise_s"] = time.perf_counter() - t0
    ratios = sorted(measured[n] / (s.noise_coefficient(n) * a.rel_mse) for n in picked)
    q = lambda p: ratios[min(len(ratios) - 1, int(p * len(ratios)))]
    report["noise"] = {"tensors": len(picked), "spearman": spearman([measured[n] for n in picked],
                                                                    [s.noise_coefficient(n) for n in picked]),
                       "ratio_p10": q(0.1), "ratio_median": q(0.5), "ratio_p90": q(0.9)}
    per_weight = sorted(s.noise_coefficient(n) / source.spec(n).numel() for n in picked)
    report["noise"]["per_weight_spread"] = per_weight[-1] / per_weight[0]
    print(f"# Fisher pass {report['fisher_s']:.0f} s ({a.fisher_sequences} x 512 tokens); noise injection "
          f"{report['noise_s']:.0f} s for {len(picked)} tensors ({a.eval_sequences} x 512 tokens each)")
    print(f"# measured / predicted KL: p10 {q(0.1):.2f}, median {q(0.5):.2f}, p90 {q(0.9):.2f}; "
          f"Spearman {report['noise']['spearman']:.3f}")

    # additivity: all picked tensors at once
    base_logp = [torch.log_softmax(model(input_ids=x.reshape(1, -1)).logits[0].float(), -1).detach()
                 for x in eval_seqs]
    params = dict(model.named_parameters(remove_duplicate=False))
    saved = {n: params[n].detach().clone() for n in picked}
    with torch.no_grad():
        for k, n in enumerate(picked):
            g = torch.Generator().manual_seed(a.seed * 1000003 + k)
            params[n].add_(torch.randn(params[n].shape, generator=g) * (a.rel_mse * float(saved[n].double().pow(2).mean())) ** 0.5)
    together = kl_to(base_logp, model, eval_seqs)
    with torch.no_grad():
        for n in picked:
            params[n].copy_(saved[n])
    report["additivity"] = {"together": together, "sum_of_single": sum(measured.values())}
    print(f"# noise in all {len(picked)} at once: KL {together:.4g}, sum of single KLs {sum(measured.values()):.4g} "
          f"(x{together / sum(measured.values()):.2f})")

    # allocations
    stats = cal.collect_stats(model, fisher_seqs, progress=False)
    alloc_names = [n for n in names if source.roles.get(n) in ("linear", "embedding", "lm_head")]
    curves = {}
    t0 = time.perf_counter()
    for n in alloc_names:
        w = source.get(n).float()
        rows_w, tokens = row_importance_for(source, s, n)
        r, d = allocate.rd_curve(w, importance_for(source, stats, n), None, tensor_seed(0, n), 1.5, 8.0, rows_w, tokens)
        curves[n] = (w.numel(), r, d)
    report["curves_s"] = time.perf_counter() - t0
    weights = sum(c[0] for c in curves.values())
    budget = a.bits * weights
    scaled = {n: (c[0], c[1], [d * s.coefficient(n) for d in c[2]]) for n, c in curves.items()}
    plans = {"sensitivity": allocate.solve(scaled, budget), "uniform": {n: a.bits for n in curves}}
    rng = random.Random(a.seed)
    for k in range(a.allocations):
        raw = {n: rng.uniform(-1.0, 1.0) for n in curves}
        shift = sum(curves[n][0] * raw[n] for n in curves) / weights
        plans[f"random {k + 1}"] = {n: min(7.5, max(2.0, a.bits + raw[n] - shift)) for n in curves}
    original = {n: source.get(n) for n in curves}
    rows = []
    for label, rates in plans.items():
        predicted = sum(allocate.hull_value(scaled[n][1], scaled[n][2], r) for n, r in rates.items())
        stored = 0
        with torch.no_grad():
            for n, r in rates.items():
                rows_w, tokens = row_importance_for(source, s, n)
                qt = eoq.quantize_tensor(original[n], "ecsq", r, importance=importance_for(source, stats, n),
                                         seed=tensor_seed(0, n), name=n, row_importance=rows_w, row_tokens=tokens)
                params[n].copy_(qt.dequantize(torch.float32))
                stored += qt.stored_bytes("rans")
        kl = kl_to(base_logp, model, eval_seqs)
        with torch.no_grad():
            for n in rates:
                params[n].copy_(original[n].float())
        rows.append({"allocation": label, "bits": 8 * stored / weights, "predicted_kl": predicted, "measured_kl": kl})
        print(f"  {label:<12} {8 * stored / weights:.3f} bits/weight  predicted KL {predicted:.4g}  measured {kl:.4g}"
              f"  ratio {kl / predicted:.2f}", flush=True)
    report["allocations"] = rows
    print("\n| allocation | bits/weight (quantized tensors) | predicted KL | measured KL | measured / predicted |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['allocation']} | {r['bits']:.3f} | {r['predicted_kl']:.4g} | {r['measured_kl']:.4g} | "
              f"{r['measured_kl'] / r['predicted_kl']:.2f} |")
    if a.json:
        write_json(a.json, report, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
