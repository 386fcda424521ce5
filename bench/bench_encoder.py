#!/usr/bin/env python3
"""Methods x bits on all-MiniLM-L6-v2 (BERT, full-precision weights): sentence-embedding
fidelity of the quantized encoder against the original.

    python bench/bench_encoder.py --sentences TEXT --calib TEXT [--bits 2,3,4,5,6]
                                  [--methods absmax,polar,turbo,ecsq] [--n 300] [--json PATH]

Every Linear weight of the encoder layers (36 tensors) is quantized in memory with each
method, with and without calibration (AWQ from E[a^2] collected on the --calib text), and
the sentence embeddings (mean pooling over the attention mask) of --n sentences from
--sentences are compared with the original model's: cosine similarity mean, 1st percentile
and minimum. bits/weight is over the quantized tensors (rANS-coded, everything stored).
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

import eoq
from eoq.calibrate import statistics as calibration
from eoq.evaluate.embeddings import sentence_embeddings
from eoq.testing.models import minilm
from _report import write_json  # bench/ is on sys.path (the scripts run as files)


def read_sentences(path: str, n: int) -> list[str]:
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if len(line.split()) >= 6 and not line.startswith("="):
                out.append(line[:400])
            if len(out) == n:
                break
    if len(out) < n:
        raise ValueError(f"{path} has only {len(out)} usable sentences, {n} asked")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--methods", default="absmax,polar,turbo,ecsq")
    p.add_argument("--bits", default="2,3,4,5,6")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from transformers import AutoModel, AutoTokenizer

    path = minilm()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    sentences = read_sentences(args.sentences, args.n)
    base = sentence_embeddings(model, tok, sentences)
    text = calibration.load_text(args.calib)
    stats = calibration.collect_stats(model, calibration.token_sequences(text, tok, 64, 128), progress=False)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n}
    originals = {n: m.weight.detach().clone() for n, m in targets.items()}
    numel = sum(w.numel() for w in originals.values())
    rows = []
    t_start = time.time()
    for method in args.methods.split(","):
        for bits in (float(b) for b in args.bits.split(",")):
            for calibrated in (False, True):
                stored = 0
                for n, m in targets.items():
                    imp = stats[n].mean_sq if calibrated else None
                    qt = eoq.quantize_tensor(originals[n], method, bits, importance=imp, awq=calibrated,
                                             seed=args.seed, name=n)
                    stored += qt.stored_bytes("rans")
                    m.weight.data.copy_(qt.dequantize(torch.float32))
                cos = torch.nn.functional.cosine_similarity(sentence_embeddings(model, tok, sentences), base, dim=-1)
                rows.append(dict(method=method, bits=bits, calibrated=calibrated, bpw=8 * stored / numel,
                                 cos_mean=float(cos.mean()), cos_p1=float(torch.quantile(cos, 0.01)),
                                 cos_min=float(cos.min())))
                for n, m in targets.items():
                    m.weight.data.copy_(originals[n])
    print(f"eoq on all-MiniLM-L6-v2 - {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ} - "
          f"{len(targets)} Linear weights ({numel:,} weights) - {len(sentences)} sentences from {args.sentences} - "
          f"calibration {args.calib} - {time.time() - t_start:.0f} s\n")
    print("| method | bits | calibrated | bpw (rANS) | cos mean | cos p1 | cos min |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['bits']:g} | {'AWQ' if r['calibrated'] else 'no'} | {r['bpw']:.3f} | "
              f"{r['cos_mean']:.5f} | {r['cos_p1']:.5f} | {r['cos_min']:.5f} |")
    if args.json:
        write_json(args.json, {"args": vars(args), "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
