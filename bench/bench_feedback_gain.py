#!/usr/bin/env python3
"""How much error feedback removes, tensor by tensor, and what the allocator gains by knowing it.

    python bench/bench_feedback_gain.py --calib CALIB.txt [--model dithered|HF_FOLDER]
        [--calib-dir DIR] [--bits 3,4] [--budget 4] [--json PATH]

On SmolLM2-135M-dithered (or any HF folder), with the inputs' covariance and the Fisher
sensitivities from the calibration text (``eoq.calibrate_model`` with feedback="gptq"; kept in
``--calib-dir`` and reused when it is already there):

1. Per Linear weight: the rate-distortion curve of ecsq with plain rounding and with error
   feedback (eoq.convert.allocate.rd_curve, both measuring the output error over the weighted
   energy), and their ratio at each of ``--bits``: feedback's gain, min / median / max per
   kind of weight, and as bits (0.5 log2 of the ratio: at high rate D ~ 2^-2R).
2. The allocation: equal slope at ``--budget`` bits/weight over these weights with the
   sensitivity coefficients (the default allocation's objective), once on the plain curves
   and once on feedback's. Both are scored on feedback's curves (what a conversion with
   feedback then quantizes): the predicted KL sum_t c_t D_t(R_t) of each, and how far the
   rates move.
3. With ``--eval-text``: does the gain hold on other text? For the weights matching
   ``--eval-tensors`` (a regex), the covariance of their inputs on ``--eval-sequences``
   windows of that text is measured too, and each weight quantized at ``--eval-bits`` with
   feedback (damping ``--damps``, the covariance from the calibration) and without; the
   ratio of their output errors on the calibration's covariance and on the other text's.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import torch
from _report import write_json  # bench/ is on sys.path (the scripts run as files)

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def kind_of(name: str) -> str:
    return next((k for k in KINDS if f".{k}." in name), "other")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dithered")
    ap.add_argument("--calib", help="calibration text (needed unless --calib-dir holds a calibration)")
    ap.add_argument("--calib-dir", default="bench-feedback-calibration")
    ap.add_argument("--calib-sequences", type=int, default=32)
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--budget", type=float, default=4.0)
    ap.add_argument("--range", default="1.5,8", help="the curves' rate range, bits/weight")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--eval-text", help="a text of another kind (e.g. WikiText-2's test split) for section 3")
    ap.add_argument("--eval-sequences", type=int, default=8)
    ap.add_argument("--eval-tensors", default=r"layers\.(3|10|20)\.(self_attn\.q_proj|mlp\.down_proj)")
    ap.add_argument("--eval-bits", type=float, default=4.0)
    ap.add_argument("--damps", default="0.01,0.1,0.3")
    ap.add_argument("--held-out-only", action="store_true", help="section 3 alone")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    import eoq
    from eoq.convert import allocate
    from eoq.calibrate import statistics as cal
    from eoq.calibrate import sensitivity as sens_mod
    from eoq.testing import models as testmodels
    from eoq.convert.plan import tensor_seed

    folder = testmodels.smollm2_dithered() if a.model == "dithered" else pathlib.Path(a.model)
    cdir = pathlib.Path(a.calib_dir)
    if not (cdir / "sensitivity.safetensors").is_file():
        if not a.calib:
            ap.error(f"{cdir} holds no calibration: give --calib")
        cfg = eoq.QuantConfig(calibration=a.calib, calib_sequences=a.calib_sequences, feedback="gptq")
        eoq.calibrate_model(folder, cdir, cfg, progress=False)
    stats = cal.load_stats(cdir / "calib_stats.safetensors")
    sens = sens_mod.Sensitivity.load(cdir / "sensitivity.safetensors")
    from eoq.format.sources import open_source

    source = open_source(folder)
    if a.held_out_only:
        if not a.eval_text:
            ap.error("--held-out-only needs --eval-text")
        report = {"model": str(folder), "held_out": held_out(a, source, stats)}
        if a.json:
            write_json(a.json, report, indent=2)
        return 0
    lo, hi = (float(v) for v in a.range.split(","))
    bits = [float(b) for b in a.bits.split(",")]
    rows, curves_plain, curves_fb = [], {}, {}
    t_plain = t_fb = 0.0
    for name in source.names:
        module = name.removesuffix(".weight")
        s = stats.get(module)
        if s is None or s.sum_outer is None or not name.endswith(".weight"):
            continue
        w = source.get(name).float()
        seed = tensor_seed(eoq.QuantConfig().seed, name)
        t0 = time.perf_counter()
        plain = allocate.rd_curve(w, s.mean_sq, None, seed, lo, hi)
        t1 = time.perf_counter()
        fb = allocate.rd_curve(w, s.mean_sq, None, seed, lo, hi, hessian=s.hessian, hessian_tokens=s.count, name=name)
        t2 = time.perf_counter()
        t_plain, t_fb = t_plain + t1 - t0, t_fb + t2 - t1
        c = sens.coefficient(name) or 0.0
        curves_plain[name] = (w.numel(), plain[0], [d * c for d in plain[1]])
        curves_fb[name] = (w.numel(), fb[0], [d * c for d in fb[1]])
        gains = {b: allocate.hull_value(*fb, b) / allocate.hull_value(*plain, b) for b in bits}
        rows.append({"name": name, "kind": kind_of(name), "shape": list(w.shape), "gain": gains,
                     "plain_s": t1 - t0, "feedback_s": t2 - t1})

    total = sum(n for n, _, _ in curves_fb.values())
    r_plain = allocate.solve(curves_plain, a.budget * total)
    r_fb = allocate.solve(curves_fb, a.budget * total)

    def predicted(rates):  # scored on feedback's curves: what a conversion with feedback quantizes
        return sum(allocate.hull_value(curves_fb[n][1], curves_fb[n][2], r) for n, r in rates.items())

    moves = [abs(r_fb[n] - r_plain[n]) for n in r_fb]
    report = {"model": str(folder), "bits": bits, "budget": a.budget, "rows": rows,
              "curve_s": {"plain": t_plain, "feedback": t_fb},
              "allocation": {"predicted_kl_plain_curves": predicted(r_plain), "predicted_kl_feedback_curves":
                             predicted(r_fb), "mean_rate_move": statistics.mean(moves), "max_rate_move": max(moves),
                             "rates_plain_curves": r_plain, "rates_feedback_curves": r_fb}}

    print(f"# {len(rows)} weights of {folder.name}; curves: plain {t_plain:.0f} s, feedback {t_fb:.0f} s\n")
    print("| weights | n | " + " | ".join(f"D_fb / D_plain at {b:g} bits: min / median / max (bits)" for b in bits)
          + " |")
    print("|---|---:|" + "---|" * len(bits))
    for kind in KINDS + ("all",):
        sel = [r for r in rows if kind in ("all", r["kind"])]
        if not sel:
            continue
        cells = []
        for b in bits:
            g = sorted(r["gain"][b] for r in sel)
            med = statistics.median(g)
            cells.append(f"{g[0]:.2f} / {med:.2f} / {g[-1]:.2f} ({0.5 * torch.tensor(1 / med).log2().item():.2f})")
        print(f"| {kind} | {len(sel)} | " + " | ".join(cells) + " |")
    al = report["allocation"]
    print(f"\n# allocation at {a.budget:g} bits/weight (sensitivity coefficients), scored on feedback's curves: "
          f"predicted KL {al['predicted_kl_plain_curves']:.4g} with the plain curves' rates, "
          f"{al['predicted_kl_feedback_curves']:.4g} with feedback's "
          f"({al['predicted_kl_feedback_curves'] / al['predicted_kl_plain_curves']:.3f}x); "
          f"rates move {al['mean_rate_move']:.2f} bit on average, {al['max_rate_move']:.2f} at most")
    if a.eval_text:
        report["held_out"] = held_out(a, source, stats)
    if a.json:
        write_json(a.json, report, indent=2)
    return 0


def held_out(a, source, stats) -> list[dict]:
    """Section 3: feedback's gain on the calibration's covariance and on another text's."""
    import re

    import eoq
    from eoq.calibrate import statistics as cal
    from eoq.methods import feedback
    from eoq.calibrate.blockwise import BlockRunner
    from eoq.convert.plan import tensor_seed

    pick = re.compile(a.eval_tensors)
    names = [n.removesuffix(".weight") for n in source.names if pick.search(n) and n.removesuffix(".weight") in stats]
    text = pathlib.Path(a.eval_text).read_text()  # measured on, never calibrated on: load_text would refuse it
    seqs = cal.token_sequences(text, source.tokenizer, a.eval_sequences, 512)
    other = cal.collect_stats_blockwise(BlockRunner(source), seqs, include=lambda n: n in names, progress=False, covariance=True)
    damps = [float(d) for d in a.damps.split(",")]
    out = []
    print(f"\n# held out: output error with feedback / without at {a.eval_bits:g} bits, on the calibration's "
          f"covariance and on {a.eval_sequences} x 512 tokens of {pathlib.Path(a.eval_text).name}\n")
    print("| weight | " + " | ".join(f"damp {d:g}: calibration / other text" for d in damps) + " |")
    print("|---|" + "---|" * len(damps))
    for n in names:
        w, s, o = source.get(n + ".weight").float(), stats[n], other[n]
        seed = tensor_seed(eoq.QuantConfig().seed, n + ".weight")
        plain = eoq.quantize_tensor(w, "ecsq", a.eval_bits, importance=s.mean_sq, seed=seed,
                                    recon=False).dequantize(torch.float32)
        base = feedback.output_error(w, plain, s.hessian), feedback.output_error(w, plain, o.hessian)
        row = {"name": n, "ratios": {}}
        for d in damps:
            fb = eoq.quantize_tensor(w, "ecsq", a.eval_bits, importance=s.mean_sq, seed=seed, hessian=s.hessian,
                                     damp=d, hessian_tokens=s.count).dequantize(torch.float32)
            row["ratios"][d] = (feedback.output_error(w, fb, s.hessian) / base[0],
                                feedback.output_error(w, fb, o.hessian) / base[1])
        out.append(row)
        print(f"| {n} | " + " | ".join(f"{c:.3f} / {e:.3f}" for c, e in row["ratios"].values()) + " |", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
