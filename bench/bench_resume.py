#!/usr/bin/env python3
"""Resume inside a pass: a default conversion killed (SIGKILL) in its sampling or its Fisher
pass, run again; and what one checkpoint costs at the 8 B shape.

    python bench/bench_resume.py [--model llama1b] [--work DIR] [--calib-text PATH]
                                 [--kill sampling,fisher] [--threads 2] [--json OUT]

For each kill point: the uninterrupted conversion's time (once), the time until the kill, the
resumed run's time, what the partial folder held, and whether every .safetensors and .json
of the output equals the uninterrupted run's byte for byte. ``sampling`` kills after the
fifth kept state, with states kept every 30 s instead of 120 (a 1 B model samples its text
in about 6 minutes); ``fisher`` once the Fisher pass has finished half its backward sweep.
The model is bench/random_models' random-weight folder with a tokenizer trained on
--calib-text (bench_scale.with_tokenizer); its quality means nothing.

``--cost`` times one save of each checkpoint at the 8 B shape's sizes, without a model: the
sampling state at the end of the default sampling (16 x 128 cached tokens, 32 layers, 8 key/
value heads of 128) and the Fisher state (8 x 129 x 4096 gradients, 226 sums, two
vocabulary row sums), each followed by os.sync.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from _report import write_json  # bench/ is on sys.path (the scripts run as files)

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = ("import sys, torch, eoq; from eoq import sampling_checkpoint as c; c.CHECKPOINT_SECONDS = float(sys.argv[3]); "
         "torch.set_num_threads(int(sys.argv[4])); eoq.quantize_model(sys.argv[1], sys.argv[2], eoq.QuantConfig(), "
         "progress=False, verbose=False)")


def convert(folder, out, every: float, threads: int, kill_when=None) -> tuple[float, bool]:
    """(seconds, killed): one conversion in a child process, SIGKILLed once kill_when() is true."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(out), str(every), str(threads)])
    while p.poll() is None:
        if kill_when is not None and kill_when():
            p.send_signal(signal.SIGKILL)
            p.wait()
            return time.perf_counter() - t, True
        time.sleep(0.5)
    if p.returncode:
        raise SystemExit(f"conversion into {out} failed ({p.returncode})")
    return time.perf_counter() - t, False


def partial_of(out: pathlib.Path) -> pathlib.Path:
    return out.parent / f".{out.name}.eoq-partial"


def fisher_next_block(out: pathlib.Path):
    from safetensors import safe_open

    state = partial_of(out) / "fisher" / "state.safetensors"
    try:
        with safe_open(str(state), "pt") as f:
            return int(f.metadata()["next_block"])
    except Exception:  # not there yet, or being renamed into place
        return None


def killed_and_resumed(folder, ref: pathlib.Path, out: pathlib.Path, where: str, blocks: int, threads: int) -> dict:
    import torch

    partial = partial_of(out)
    every = 30.0 if where == "sampling" else 120.0
    if where == "sampling":
        seen = set()

        def when():
            f = partial / "calib_sampling.pt"
            if f.is_file():
                seen.add(f.stat().st_mtime_ns)
            return len(seen) >= 5
    else:
        def when():
            n = fisher_next_block(out)
            return n is not None and n < blocks // 2

    row = {"kill": where}
    row["killed_after_s"], killed = convert(folder, out, every, threads, when)
    if not killed:
        raise SystemExit(f"{where}: the conversion ended before the kill point")
    row["partial"] = sorted(p.name for p in partial.iterdir())
    if where == "sampling":
        row["kept"] = f"{torch.load(partial / 'calib_sampling.pt', weights_only=True)['ids'].shape[1] - 1} tokens"
    else:
        row["kept"] = f"blocks {fisher_next_block(out) + 1}..{blocks - 1} done"
    row["resumed_s"], _ = convert(folder, out, every, threads)
    files = sorted(f for f in os.listdir(ref) if f.endswith((".safetensors", ".json")))
    row["compared_files"] = len(files)
    row["differ"] = [f for f in files if (ref / f).read_bytes() != (out / f).read_bytes()]
    return row


def checkpoint_cost() -> dict:
    import types

    import torch
    from transformers.cache_utils import DynamicLayer

    from eoq.calibrate import fisher_checkpoint as fc
    from eoq.calibrate import sampling_checkpoint as sc

    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(32):
        layer = DynamicLayer()
        layer.update(torch.randn(16, 8, 128, 128, generator=g), torch.randn(16, 8, 128, 128, generator=g))
        layers.append(layer)
    cache = types.SimpleNamespace(layers=layers)
    out = {}
    with tempfile.TemporaryDirectory(dir=".") as d:
        path = pathlib.Path(d) / "sampling.pt"
        times = []
        for _ in range(3):
            t = time.perf_counter()
            sc.save(path, {}, torch.zeros(16, 129, dtype=torch.long), cache)
            os.sync()
            times.append(time.perf_counter() - t)
        out["sampling"] = {"bytes": path.stat().st_size, "save_s": times}
        names = [f"p{i}" for i in range(226)]
        state = fc.FisherState(0, {n: torch.zeros((), dtype=torch.float64) for n in names},
                               {n: torch.zeros((), dtype=torch.float64) for n in names},
                               {r: torch.zeros(128256, dtype=torch.float64) for r in ("head", "embedding")},
                               {n: 1.0 for n in names}, [torch.randn(1, 129, 4096, generator=g) for _ in range(8)],
                               [{} for _ in range(8)])
        keep = fc.FisherCheckpoint(d, "bench")
        times = []
        for _ in range(3):
            t = time.perf_counter()
            keep.save(state)
            os.sync()
            times.append(time.perf_counter() - t)
        out["fisher"] = {"bytes": keep.path.stat().st_size, "save_s": times}
    return out


def main(argv=None) -> int:
    import random_models
    from bench_scale import with_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama1b", choices=sorted(random_models.SHAPES))
    ap.add_argument("--work", default="bench-resume", help="where the outputs go (removed first)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/eoq/bench_load"))
    ap.add_argument("--calib-text", default=str(HERE.parent.parent / "shared/data/calibration/python-docs.txt"),
                    help="the text the random model's tokenizer is trained on")
    ap.add_argument("--kill", default="sampling,fisher")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cost", action="store_true", help="only time one checkpoint of each kind at the 8 B shape")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.cost:
        result = {"cost": checkpoint_cost()}
        for k, v in result["cost"].items():
            print(f"{k} checkpoint: {v['bytes'] / 2**20:.1f} MiB, save + sync {min(v['save_s']):.3f}-"
                  f"{max(v['save_s']):.3f} s")
    else:
        import shutil

        shape = random_models.SHAPES[a.model]
        folder = random_models.make_llama(pathlib.Path(a.cache) / f"{a.model}-bf16", shape)
        folder = with_tokenizer(folder, a.calib_text)
        work = pathlib.Path(a.work)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        ref_s, _ = convert(folder, work / "ref", 120.0, a.threads)
        rows = [killed_and_resumed(folder, work / "ref", work / k, k, shape["num_hidden_layers"], a.threads)
                for k in a.kill.split(",")]
        result = {"model": a.model, "threads": a.threads, "uninterrupted_s": ref_s, "rows": rows}
        print(f"| killed in | after s | kept | resumed run s | killed + resumed / uninterrupted ({ref_s:.0f} s) "
              f"| output bytes |")
        print("|---|---:|---|---:|---:|---|")
        for r in rows:
            same = "identical" if not r["differ"] else f"differ: {', '.join(r['differ'])}"
            print(f"| {r['kill']} | {r['killed_after_s']:.0f} | {r['kept']} | {r['resumed_s']:.0f} | "
                  f"{(r['killed_after_s'] + r['resumed_s']) / ref_s:.2f}× | {same} ({r['compared_files']} files) |")
    if a.json:
        write_json(a.json, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
