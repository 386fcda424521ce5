#!/usr/bin/env python3
"""Every method x bits on every Linear weight of a real model, with and without calibration.

    python bench/bench_methods.py --calib TEXT [--model dithered,gguf,PATH] [--bits 2,3,4,5,6]
                                  [--methods absmax,polar,turbo,ecsq] [--layers N] [--json PATH]

Models: ``dithered`` is SmolLM2-135M-dithered (continuous weights, eoq.testing.models); ``gguf``
is the original SmolLM2 GGUF, whose weights lie on a Q4_1 grid (marked "gridded": it
flatters un-rotated block-32 codes and entropy coding); any other value is a local HF
folder. Calibration statistics (E[a^2] per input channel of every Linear) are collected
from TEXT (a file path, a datasets name, or "self") with the model in question, cached
under $EOQ_CACHE/stats, and used for the calibrated runs: AWQ scales (alpha searched) for
every method, plus the importance-weighted scale search for absmax.

For each (model, method, bits, calibrated) it reports, over all quantized Linears:
bits/weight packed and rANS-coded (everything stored, weighted by tensor size), the
relative weight error sum||dW||^2 / sum||W||^2, the mean over tensors of the relative
activation-weighted output error sum_c E[a_c^2]||dW_c||^2 / sum_c E[a_c^2]||W_c||^2, and
the quantization time, and how far the rANS rate sits above the rate-distortion bound of
a Gaussian source with each tensor's variance at the measured MSE (an upper bound of the
weights' own R(D), so the true gap is at least this). Then, per model and rate, the error of each method interpolated at
2..6 bits/weight (log-linear between measured points), and the winner.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time

import torch

import eoq
from eoq.calibrate import statistics as calibration
from eoq.methods.quantized import weighted_error
from _report import write_json  # bench/ is on sys.path (the scripts run as files)


def load_model(spec: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eoq.testing import models as testmodels

    if spec == "dithered":
        path, kw, label, gridded = testmodels.smollm2_dithered(), {}, "SmolLM2-135M-dithered", False
    elif spec == "gguf":
        g = testmodels.smollm2_gguf()
        path, kw, label, gridded = g.parent, {"gguf_file": g.name}, "SmolLM2-135M Q4_1 GGUF", True
    else:
        path, kw, label, gridded = spec, {}, os.path.basename(os.path.normpath(spec)), False
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    return label, model, tok, gridded


def stats_for(label, model, tok, calib: str, n_seq: int, seq_len: int):
    text = calibration.load_text(calib, model, tok)
    key = hashlib.sha256(f"{label}|{calibration.text_fingerprint(text)}|{n_seq}|{seq_len}".encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("EOQ_CACHE", os.path.expanduser("~/.cache/eoq")), "stats")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"{key}.safetensors")
    if os.path.exists(path):
        return calibration.load_stats(path), path
    seqs = calibration.token_sequences(text, tok, n_seq, seq_len)
    stats = calibration.collect_stats(model, seqs, include=lambda n: "lm_head" not in n)
    calibration.save_stats(stats, path, source=f"{calib} ({len(seqs)} x {seq_len} tokens)")
    return stats, path


def linears(model, layers: int | None):
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
            if layers is not None and ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) >= layers:
                continue
            yield name, m.weight.detach().float()


def run(args):
    rows = []
    for spec in args.model.split(","):
        label, model, tok, gridded = load_model(spec)
        stats, stats_path = stats_for(label, model, tok, args.calib, args.calib_sequences, args.calib_len)
        print(f"# {label}{' (gridded)' if gridded else ''}: statistics {stats_path}", file=sys.stderr)
        acc = {}
        tensors = list(linears(model, args.layers))
        for i, (name, w) in enumerate(tensors):
            imp = stats[name].mean_sq
            wn = float(w.double().pow(2).sum())
            wa = weighted_error(w, torch.zeros_like(w), imp)
            for method in args.methods.split(","):
                for bits in (float(b) for b in args.bits.split(",")):
                    for calibrated in (False, True):
                        t0 = time.perf_counter()
                        qt = eoq.quantize_tensor(w, method, bits, importance=imp if calibrated else None,
                                                 awq=calibrated, seed=args.seed, name=name)
                        dt = time.perf_counter() - t0
                        w_hat = qt.dequantize(torch.float32)
                        a = acc.setdefault((method, bits, calibrated), dict(n=0, packed=0, rans=0, dw=0.0, wn=0.0,
                                                                             out=[], time=0.0, rd=0.0))
                        a["n"] += w.numel()
                        a["packed"] += qt.stored_bytes("packed")
                        a["rans"] += qt.stored_bytes("rans")
                        a["dw"] += float((w_hat - w).double().pow(2).sum())
                        a["wn"] += wn
                        a["out"].append(weighted_error(w, w_hat, imp) / wa)
                        a["time"] += dt
                        # bits a Gaussian source of the same variance needs for this MSE
                        var = float(w.double().var())
                        mse = float((w_hat - w).double().pow(2).mean())
                        a["rd"] += 0.5 * math.log2(var / mse) * w.numel() if mse > 0 else 0.0
            print(f"  [{i + 1}/{len(tensors)}] {name}", file=sys.stderr, flush=True)
        for (method, bits, calibrated), a in sorted(acc.items()):
            rows.append(dict(model=label, gridded=gridded, method=method, bits=bits, calibrated=calibrated,
                             tensors=len(tensors), weights=a["n"], bpw_packed=8 * a["packed"] / a["n"],
                             bpw_rans=8 * a["rans"] / a["n"], rel_weight_err=a["dw"] / a["wn"],
                             rel_output_err=sum(a["out"]) / len(a["out"]), seconds=a["time"],
                             gap_to_gaussian_rd=8 * a["rans"] / a["n"] - a["rd"] / a["n"]))
        del model
    return rows


def interpolate(points, rate, reach=0.3):
    """log(error) linear in bits/weight between the two measured points around `rate`, or
    from the two nearest points when `rate` lies at most `reach` bits outside them."""
    pts = sorted(p for p in points if p[1] > 0)
    if len(pts) < 2 or not pts[0][0] - reach <= rate <= pts[-1][0] + reach:
        return None
    i = 0
    while i < len(pts) - 2 and pts[i + 1][0] < rate:
        i += 1
    (r0, e0), (r1, e1) = pts[i], pts[i + 1]
    t = (rate - r0) / (r1 - r0) if r1 > r0 else 0.0
    return math.exp(math.log(e0) + t * (math.log(e1) - math.log(e0)))


def winners(rows, rates):
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for calibrated in (False, True):
            curves = {}
            for r in rows:
                if r["model"] == model and r["calibrated"] == calibrated:
                    bpw = min(r["bpw_rans"], r["bpw_packed"])
                    curves.setdefault(r["method"], []).append((bpw, r["rel_output_err"]))
            for rate in rates:
                errs = {m: interpolate(p, rate) for m, p in curves.items()}
                errs = {m: e for m, e in errs.items() if e is not None}
                if len(errs) < 2:
                    continue
                ranked = sorted(errs.items(), key=lambda kv: kv[1])
                out.append(dict(model=model, calibrated=calibrated, rate=rate, errors=errs, winner=ranked[0][0],
                                runner_up=ranked[1][0], ratio=ranked[1][1] / ranked[0][1]))
    return out


def print_tables(rows, wins):
    print("| model | method | bits | calibrated | bpw packed | bpw rANS | rel. weight err | rel. output err | "
          "rANS bpw - Gaussian R(D) | time s |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r["model"] + (" (gridded)" if r["gridded"] else "")
        print(f"| {m} | {r['method']} | {r['bits']:g} | {'AWQ' if r['calibrated'] else 'no'} | {r['bpw_packed']:.3f} | "
              f"{r['bpw_rans']:.3f} | {r['rel_weight_err']:.3e} | {r['rel_output_err']:.3e} | "
              f"{r.get('gap_to_gaussian_rd', float('nan')):+.3f} | {r['seconds']:.1f} |")
    print()
    print("Relative output error at equal bits/weight (each method's best codec; log-linear interpolation,")
    print("extrapolated at most 0.3 bit beyond the measured points):")
    print()
    methods = sorted({m for w in wins for m in w["errors"]})
    print("| model | calibrated | bits/weight | " + " | ".join(methods) + " | winner | margin |")
    print("|---|---|---:|" + "---:|" * len(methods) + "---|---:|")
    for w in wins:
        cells = " | ".join(f"{w['errors'][m]:.3e}" if m in w["errors"] else "—" for m in methods)
        print(f"| {w['model']} | {'AWQ' if w['calibrated'] else 'no'} | {w['rate']:g} | {cells} | {w['winner']} | "
              f"{w['ratio']:.2f}x vs {w['runner_up']} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib", default=None, help="calibration text: a file path, a datasets name, or 'self'")
    p.add_argument("--model", default="dithered,gguf")
    p.add_argument("--methods", default="absmax,polar,turbo,ecsq")
    p.add_argument("--bits", default="2,3,4,5,6")
    p.add_argument("--layers", type=int, default=None, help="only the first N transformer layers")
    p.add_argument("--calib-sequences", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--from-json", default=None, help="reprint the tables of an earlier run's JSON")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)["rows"]
        print_tables(rows, winners(rows, [2, 3, 4, 5, 6]))
        return
    if not args.calib:
        p.error("--calib is required")
    t0 = time.time()
    rows = run(args)
    wins = winners(rows, [2, 3, 4, 5, 6])
    print(f"eoq methods - {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ} - {platform.processor() or platform.machine()}"
          f" - torch {torch.__version__}, {torch.get_num_threads()} threads - calibration {args.calib} - "
          f"{time.time() - t0:.0f} s\n")
    print_tables(rows, wins)
    if args.json:
        write_json(args.json, {"args": vars(args), "rows": rows, "winners": wins}, indent=1)


if __name__ == "__main__":
    main()
