#!/usr/bin/env python3
"""Real-size models: calibration's time and peak memory, the whole model against block by block.

    python bench/bench_scale.py [--models llama1b,llama8b] [--sequences 4] [--seq-len 256]
        [--fisher-sequences 2] [--modes whole,blocks] [--threads N] [--json PATH]

Models: random-weight Llama-shaped folders (bench/random_models.py: ``llama1b`` 1.10 B,
``llama8b`` 8.03 B parameters, bf16 in 1 GiB shards), written once into
$EOQ_CACHE/bench_load/. Their quality numbers mean nothing; their times and memory do.

What runs (each mode in a fresh subprocess; peak RSS is the child's VmHWM, mapped file
pages included, and the peaks of its anonymous memory and of its mapped file pages are
sampled every 20 ms: file pages are the page cache's, which the kernel can drop): the two calibration passes of a conversion, on ``--sequences`` random token
sequences of ``--seq-len`` tokens (covariance off: the default's statistics) and the Fisher
pass on the first ``--fisher-sequences``:
  ``whole``:  the model loaded in float32 (``from_pretrained``), ``collect_stats`` and
              ``fisher_pass`` (how every conversion calibrated before eoq.blockwise);
  ``blocks``: ``collect_stats_blockwise`` and ``fisher_pass_blockwise`` (what a conversion
              from a folder does now): one decoder block at a time, read from the files.
A mode that the machine cannot hold is reported as such (the child's exit status), not
hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import random_models

CHILD_FLAG = "--_child"


def child(spec: dict) -> dict:
    import torch

    from eoq import calibration, sensitivity, sources

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    src = sources.open_source(spec["folder"])
    vocab = src.config.vocab_size
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (spec["seq_len"],), generator=g) for _ in range(spec["sequences"])]
    fisher_seqs = seqs[:spec["fisher_sequences"]]
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():  # the peaks of anonymous memory and of mapped file pages, every 20 ms
        while not done.wait(0.02):
            for k, v in _status(("RssAnon", "RssFile")).items():
                peaks[k] = max(peaks[k], v)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    if spec["mode"] == "whole":
        model = src.load_model()
        stats = calibration.collect_stats(model, seqs, progress=False)
        t1 = time.perf_counter()
        sens = sensitivity.fisher_pass(model, fisher_seqs, row_params=src.vocab)
    else:
        from eoq.blockwise import BlockRunner

        stats = calibration.collect_stats_blockwise(BlockRunner(src), seqs, progress=False)
        t1 = time.perf_counter()
        sens = sensitivity.fisher_pass_blockwise(BlockRunner(src), fisher_seqs, row_params=src.vocab)
    t2 = time.perf_counter()
    done.set()
    return {"stats_s": t1 - t0, "fisher_s": t2 - t1, "peak_rss": _status(("VmHWM",))["VmHWM"],
            "peak_anon": peaks["RssAnon"], "peak_file": peaks["RssFile"], "linears": len(stats),
            "fisher_tensors": len(sens.fisher)}


def _status(keys) -> dict:
    """Fields of /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":")[0]
            if k in keys:
                out[k] = int(line.split()[1]) * 1024
    return out


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), CHILD_FLAG, json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"failed": f"exit status {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode < 0 else ""),
                "stderr": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == CHILD_FLAG:
        print(json.dumps(child(json.loads(argv[1]))), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama1b")
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--fisher-sequences", type=int, default=2)
    ap.add_argument("--modes", default="whole,blocks")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from eoq import testmodels

    cache = testmodels.resolve_cache_dir() / "bench_load"
    rows = []
    for key in a.models.split(","):
        if key not in random_models.SHAPES:
            ap.error(f"--models: unknown {key!r} ({', '.join(random_models.SHAPES)})")
        folder = random_models.make_llama(cache / f"{key}-bf16", random_models.SHAPES[key])
        shard = max(p.stat().st_size for p in folder.glob("*.safetensors"))
        for mode in a.modes.split(","):
            spec = {"folder": str(folder), "mode": mode, "sequences": a.sequences, "seq_len": a.seq_len,
                    "fisher_sequences": a.fisher_sequences, "threads": a.threads}
            r = {"model": key, "mode": mode, "largest_shard": shard, **run_child(spec)}
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "stderr"}), flush=True)
    print(f"\n# calibration: {a.sequences} x {a.seq_len} random tokens for the statistics, the first "
          f"{a.fisher_sequences} for the Fisher pass; peak RSS of a fresh process\n")
    print("| model | mode | statistics s | Fisher s | peak RSS GiB | × whole | peak anonymous GiB | peak file pages GiB "
          "| largest shard GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        whole = next((w for w in rows if w["model"] == r["model"] and w["mode"] == "whole" and "peak_rss" in w), None)
        if "failed" in r:
            print(f"| {r['model']} | {r['mode']} | {r['failed']} | | | | | | {r['largest_shard'] / 2**30:.2f} |")
            continue
        ratio = f"{r['peak_rss'] / whole['peak_rss']:.2f}×" if whole else "—"
        print(f"| {r['model']} | {r['mode']} | {r['stats_s']:.1f} | {r['fisher_s']:.1f} | "
              f"{r['peak_rss'] / 2**30:.2f} | {ratio} | {r['peak_anon'] / 2**30:.2f} | {r['peak_file'] / 2**30:.2f} | "
              f"{r['largest_shard'] / 2**30:.2f} |")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
