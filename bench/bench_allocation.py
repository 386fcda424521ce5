#!/usr/bin/env python3
"""Does the sensitivity allocation hold on text it never saw? The default against uniform.

    python bench/bench_allocation.py --texts WIKI.test.raw,PYTHON_DOCS.txt [--model dithered|HF_FOLDER]
        [--bits 4] [--allocations sensitivity,uniform] [--max-windows 40] [--threads N]
        [--workdir DIR] [--json PATH]

Each conversion is eoq's default (ecsq, AWQ, self calibration: text the model samples itself)
at ``--bits`` bits per parameter over the whole model, with the allocation named; the
calibration and sensitivity pass run once and are shared, so the conversions differ in the
allocation alone. Every model is evaluated on every text (none of which the calibration saw)
by eoq's harness: llama-perplexity's windows of 512, second half scored, KL divergence to the
base. ``dithered`` is SmolLM2-135M-dithered (eoq.testing.models).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dithered")
    ap.add_argument("--texts", required=True, help="evaluation texts (files or datasets names), comma-separated")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--allocations", default="sensitivity,uniform")
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from _report import write_json
    from compare import base_folder, stored_parameters, tokens

    import eoq
    from eoq.evaluate.compare import evaluate_tokens, load_model

    work = pathlib.Path(a.workdir or tempfile.mkdtemp(prefix="eoq-allocation-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = base_folder(a.model, work)
    cal = work / "calibration-self"
    if not (cal / "sensitivity.safetensors").is_file():
        eoq.calibrate_model(folder, cal, eoq.QuantConfig(calibration="self"), progress=False)
    base, _, _ = load_model(folder)
    n_params = stored_parameters(folder)
    texts = [(t, *tokens(folder, t)[:2]) for t in a.texts.split(",")]
    caches = {t: {} for t, _, _ in texts}
    rows = []
    for bits in (float(b) for b in a.bits.split(",")):
        for alloc in a.allocations.split(","):
            out = work / f"eoq-{bits:g}-{alloc}"
            t0 = time.perf_counter()
            m = eoq.quantize_model(folder, out, eoq.QuantConfig(bits=bits, calibration="self", allocation=alloc),
                                   stats=cal / "calib_stats.safetensors", sensitivity=cal / "sensitivity.safetensors",
                                   overwrite=True, progress=False)
            row = {"bits": bits, "allocation": alloc, "convert_s": time.perf_counter() - t0,
                   "bpp": 8 * m["totals"]["stored_bytes"] / n_params,
                   "predicted_kl": (m.get("allocation") or {}).get("predicted_kl")}
            model, _ = eoq.load_quantized(out, dtype=torch.float32)
            for text, ids, bos in texts:
                r = evaluate_tokens(model, ids, base, "llama.cpp", 512, bos_id=bos, max_windows=a.max_windows,
                                    progress=False, base_cache=caches[text])
                row[text] = {"kld": r["kld"]["mean"], "top1": r["same_top1"], "ppl": r["ppl"], "windows": r["windows"]}
            rows.append(row)
            del model
            shutil.rmtree(out)
            print(f"  {bits:g} bits {alloc:<12} " + "  ".join(f"{pathlib.Path(t).name}: KLD {row[t]['kld']:.5f}"
                                                             for t, _, _ in texts), flush=True)
            if a.json:
                write_json(a.json, {"args": vars(a), "model": str(folder), "rows": rows}, indent=2)
    names = [pathlib.Path(t).name for t, _, _ in texts]
    print(f"\n# {pathlib.Path(folder).name}: default conversion (self calibration), KL divergence to the base, "
          f"{a.max_windows} windows of 512 per text\n")
    print("| bits | allocation | " + " | ".join(f"KLD {n} | vs uniform" for n in names) + " | predicted KL |")
    print("|---:|---|" + "---:|---:|" * len(names) + "---:|")
    for r in rows:
        uni = next((u for u in rows if u["bits"] == r["bits"] and u["allocation"] == "uniform"), None)
        cells = []
        for t, _, _ in texts:
            rel = f"{100 * (r[t]['kld'] / uni[t]['kld'] - 1):+.1f} %" if uni else ""
            cells.append(f"{r[t]['kld']:.5f} | {rel}")
        pk = f"{r['predicted_kl']:.4f}" if r["predicted_kl"] is not None else ""
        print(f"| {r['bits']:g} | {r['allocation']} | " + " | ".join(cells) + f" | {pk} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
