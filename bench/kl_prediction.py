#!/usr/bin/env python3
"""How well the allocator's KL model predicts each tensor class, on a converted folder.

    python bench/kl_prediction.py --base HF_FOLDER --quantized EOQ_FOLDER --calib-dir DIR
        [--measured KL_BY_CLASS.json] [--json PATH]

``DIR`` holds the calibration the folder was made with (``eoq.calibrate_model``: the
activation statistics and the Fisher sums). Every quantized tensor is decoded (a few at a
time) and its error dW = W^ - W predicts the KL it causes, two ways:

  * ``relative`` (the allocator's until 2026-12, ERROR_MODEL "relative"; ``Sensitivity.coefficient``):
    c_t * D_t, c_t = sum F W^2 / 2 per token, D_t = sum rho a dW^2 / sum rho a W^2; it reads
    the Fisher as if F_ij ~ rho_i a_j and the error as if it scaled with W^2 element by element.
  * ``absolute`` (ERROR_MODEL "white", the allocator's now; ``Sensitivity.white_coefficient``):
    (sum F / 2 per token) * sum rho a dW^2 / (sum rho * sum a): the error spread evenly over
    each row, as ecsq's rotation spreads it, not scaling with each weight's W^2.

Both agree when F, a and W^2 are uncorrelated. With ``--measured`` (bench/kl_by_class.py's
json: each class's KL, measured alone) the table gives measured / predicted per class: a
model that allocates well has that ratio equal across classes, whatever its level.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from kl_by_class import CLASSES  # noqa: E402


def predictions(base: str, quantized: str, calib_dir: str) -> dict[str, dict]:
    """Per tensor: (relative prediction, absolute prediction), from the decoded error."""
    import eoq
    from eoq.calibrate.sensitivity import Sensitivity
    from eoq.calibrate.statistics import load_stats
    from eoq.format.sources import open_source
    from eoq.methods.quantized import weighted_error

    src = open_source(base)
    manifest = json.loads((pathlib.Path(quantized) / "quant_manifest.json").read_text())
    sens = Sensitivity.load(pathlib.Path(calib_dir) / "sensitivity.safetensors")
    stats = load_stats(pathlib.Path(calib_dir) / "calib_stats.safetensors")
    names = [n for n, e in manifest["tensors"].items() if e.get("method") and n in sens.fisher_w2]
    out = {}
    for start in range(0, len(names), 8):
        chunk = names[start:start + 8]
        decoded = eoq.read_state_dict(quantized, dtype=torch.float32, names=chunk)
        for n in chunk:
            w = src.get(n).float()
            s = stats.get(n[:-len(".weight")])
            a = s.mean_sq.double() if s is not None and s.mean_sq.numel() == w.shape[1] else None
            rho, _ = sens.row_weights(n)
            err = weighted_error(w, decoded.pop(n), a, rho)
            energy = weighted_error(w, torch.zeros_like(w), a, rho)
            total = (float(rho.double().sum()) if rho is not None else w.shape[0]) * \
                (float(a.sum()) if a is not None else w.shape[1])
            rel = sens.coefficient(n) * err / energy
            ab = sens.white_coefficient(n) * err / total
            out[n] = {"relative": rel, "absolute": ab, "params": w.numel()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--quantized", required=True)
    ap.add_argument("--calib-dir", required=True)
    ap.add_argument("--measured")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    per = predictions(a.base, a.quantized, a.calib_dir)
    measured = {}
    if a.measured:
        measured = {r["class"]: r["kld"] for r in json.loads(pathlib.Path(a.measured).read_text())["rows"]}
    rows = []
    for cls, pattern in CLASSES.items():
        picked = [v for n, v in per.items() if re.search(pattern, n)]
        if not picked:
            continue
        row = {"class": cls, "tensors": len(picked), "relative": sum(v["relative"] for v in picked),
               "absolute": sum(v["absolute"] for v in picked), "measured": measured.get(cls)}
        rows.append(row)
    rows.append({"class": "all", "tensors": len(per), "relative": sum(v["relative"] for v in per.values()),
                 "absolute": sum(v["absolute"] for v in per.values()), "measured": measured.get("all")})
    print(f"{'class':>6} {'tensors':>7} {'relative':>10} {'absolute':>10} {'measured':>10} {'m/rel':>7} {'m/abs':>7}")
    for r in rows:
        m = r["measured"]
        print(f"{r['class']:>6} {r['tensors']:>7} {r['relative']:10.5f} {r['absolute']:10.5f} "
              + (f"{m:10.5f} {m / r['relative']:7.2f} {m / r['absolute']:7.2f}" if m is not None else ""))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows, "tensors": per}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
