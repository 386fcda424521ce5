#!/usr/bin/env python3
"""Where a quantized model's KL divergence comes from: each tensor class quantized alone.

    python bench/kl_by_class.py --base HF_FOLDER --quantized EOQ_FOLDER --text WIKI.test.raw
        [--classes embed,head,q,k,v,o,gate,up,down] [--max-windows 40] [--n-ctx 512]
        [--base-cache FILE] [--threads N] [--json PATH]

One model is kept (the base, float32). For each class the eoq folder's decoded tensors of
that class replace the base's, the model is evaluated against the base's cached
log-probabilities, and the base's own values are put back (the base is a 16-bit folder, so
they come back exactly). A last row swaps every class in at once: the quantized model as
loaded. Classes interact little at these error levels, so the per-class KL sum is close to
the whole model's; the table states both, and the bits each class was given.

The base's log-probabilities are kept (``--base-cache``, the same file bench/compare.py
writes) so that a diagnosis after an anchors run costs no base passes. Everything is
evaluated with eoq's harness (llama-perplexity's windows, second half scored).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

import torch

CLASSES = {  # class -> regex over parameter names (Llama / Qwen2 / Mistral naming)
    "embed": r"embed_tokens\.weight$", "head": r"^lm_head\.weight$",
    "q": r"q_proj\.weight$", "k": r"k_proj\.weight$", "v": r"v_proj\.weight$", "o": r"o_proj\.weight$",
    "gate": r"gate_proj\.weight$", "up": r"up_proj\.weight$", "down": r"down_proj\.weight$",
}


def class_bits(manifest: dict, pattern: str) -> tuple[int, float]:
    """(parameters, stored bits per weight) of a class in an eoq manifest."""
    from eoq.format.repo import entry_numel

    picked = [e for name, e in manifest["tensors"].items() if re.search(pattern, name) and e.get("kind") != "tied"]
    params = sum(entry_numel(e) for e in picked)
    nbytes = sum(e["stored_bytes"] for e in picked)
    return params, (8 * nbytes / params if params else float("nan"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--quantized", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--classes", default=",".join(CLASSES))
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--base-cache")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from _report import write_json
    from compare import BaseCache, SpentBase, tokens

    import eoq
    from eoq.evaluate.compare import evaluate_tokens, load_model

    folder = pathlib.Path(a.base)
    model, _, _ = load_model(folder)
    ids, bos, _ = tokens(folder, a.text)
    cache = BaseCache(a.base_cache, folder, a) if a.base_cache else {}

    reference = [model]  # the base itself for the first pass, then only its cached log-probabilities

    def evaluate() -> dict:
        return evaluate_tokens(model, ids, reference[0], "llama.cpp", a.n_ctx, bos_id=bos, max_windows=a.max_windows,
                               progress=False, base_cache=cache)

    t0 = time.perf_counter()
    base = evaluate()  # fills the cache where it was empty: the model is still the base here
    if a.base_cache:
        cache.save()
    reference[0] = SpentBase()  # from here on the model is not the base: a cache miss must fail
    manifest = json.loads((pathlib.Path(a.quantized) / "quant_manifest.json").read_text())
    params = dict(model.named_parameters())
    rows = []
    classes = a.classes.split(",") + ["all"]
    for cls in classes:
        pattern = "|".join(CLASSES.values()) if cls == "all" else CLASSES[cls]
        names = [n for n in params if re.search(pattern, n) and n in manifest["tensors"]
                 and manifest["tensors"][n].get("kind") == "quantized"]
        if not names:
            print(f"  {cls}: no quantized tensor matches {pattern}")
            continue
        saved = {n: params[n].detach().to(torch.bfloat16) for n in names}  # the bf16 base, exactly
        for start in range(0, len(names), 16):  # a few tensors decoded at a time: bounded memory
            chunk = names[start:start + 16]
            decoded = eoq.read_state_dict(a.quantized, dtype=torch.float32, names=chunk)
            with torch.no_grad():
                for n in chunk:
                    params[n].copy_(decoded.pop(n))
        t1 = time.perf_counter()
        r = evaluate()
        with torch.no_grad():
            for n in names:
                params[n].copy_(saved.pop(n).float())
        n_params, bpw = class_bits(manifest, pattern)
        rows.append({"class": cls, "tensors": len(names), "params": n_params, "bpw": bpw, "kld": r["kld"]["mean"],
                     "kld_p99": r["kld"]["p99"], "top1": r["same_top1"], "ppl": r["ppl"], "eval_s": time.perf_counter() - t1})
        print(f"  {cls:<6} {len(names):4d} tensors {n_params / 1e6:8.1f} M  {bpw:5.2f} bits/weight  "
              f"KLD {r['kld']['mean']:.5f}  top1 {100 * r['same_top1']:5.1f} %  PPL {r['ppl']:.4f}", flush=True)
        if a.json:
            write_json(a.json, {"args": vars(a), "base_ppl": base["ppl"], "windows": base["windows"], "rows": rows},
                       indent=2)
    parts = [r for r in rows if r["class"] != "all"]
    whole = next((r for r in rows if r["class"] == "all"), None)
    print(f"\n# {pathlib.Path(a.quantized).name} against {folder.name}: {base['windows']} windows of {a.n_ctx}, "
          f"base PPL {base['ppl']:.4f}, {time.perf_counter() - t0:.0f} s\n")
    print("| class | parameters (M) | bits/weight | KLD alone | share of the sum | top-1 % |")
    print("|---|---:|---:|---:|---:|---:|")
    total = sum(r["kld"] for r in parts) or float("nan")
    for r in parts:
        print(f"| {r['class']} | {r['params'] / 1e6:.1f} | {r['bpw']:.2f} | {r['kld']:.5f} | "
              f"{100 * r['kld'] / total:.1f} % | {100 * r['top1']:.1f} |")
    if whole:
        print(f"| sum of the classes | | | {total:.5f} | | |")
        print(f"| all at once | {whole['params'] / 1e6:.1f} | {whole['bpw']:.2f} | {whole['kld']:.5f} | | "
              f"{100 * whole['top1']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
