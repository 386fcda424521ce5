#!/usr/bin/env python3
"""Loading: an eoq folder through from_pretrained against the bf16 folder of the same model.

    python bench/bench_load.py [--models smollm2,llama1b] [--repeat 3] [--threads N] [--cold]
                               [--modes bf16,eoq,eoq-ref] [--no-kernel] [--json PATH]

Models: ``smollm2`` is SmolLM2-135M-dithered (eoq.testing.models; a bf16 HF folder);
``llama1b`` is a Llama-shaped folder with random weights that this script writes once into
$EOQ_CACHE/bench_load/ (hidden 2048, 16 layers, intermediate 8192, 32 heads, 8 KV heads,
vocab 32000, untied head: 1.10 B parameters; N(0, 0.02) Linear and embedding weights,
bf16 safetensors in 1 GiB shards + config.json). Each model is converted data-free once
(``QuantConfig(bits=4, allocation="uniform", calibration=None, awq=False)``) into the same
cache and reused.

Loads (each in a fresh subprocess, the modes alternating within each repeat, best of
--repeat): ``bf16`` is ``AutoModelForCausalLM.from_pretrained(bf16 folder, dtype=bfloat16)``;
``eoq`` is ``import eoq`` and the same call on the eoq folder, decoding with the fused kernel
(eoq.format.fused, which repo.dequantize_entry calls for ecsq);
``eoq-ref`` decodes every entry with the reference path (QuantizedTensor.dequantize). The
time covers from_pretrained *and* touching every parameter (a float32-accumulated sum of
each, the same for all modes): from_pretrained of a bf16 folder may map the file lazily, so
an untouched load would not have read the weights. "CPU s" is the child's user + system
time over the same span (all threads): on a shared machine, at one thread, it is what the
load costs without the waits for a core. Peak RSS is the child's VmHWM (mapped file pages
count). The model class is imported before the clock starts.

Kernel: ``eoq.format.fused.dequantize_fused`` alone over every quantized entry of the eoq folder
(parts already in memory, fresh outputs), best of --repeat, at 1 and 2 threads, in
G weights/s of wall time and per CPU second (process time of all threads). ``--cold`` (root only) drops the page cache before every load
(``sync; echo 3 > /proc/sys/vm/drop_caches``), so the loads read from disk.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import random_models
from _report import write_json  # bench/ is on sys.path (the scripts run as files)

MIB = 1 << 20
CHILD_FLAG = "--_child"
MODES = ("bf16", "eoq", "eoq-ref")


# ---- children ---------------------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    """VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over a fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _use_reference() -> str:
    """Make repo.dequantize_entry decode every quantized entry with the reference path (the
    method's Python dequantizer) instead of the fused kernel it calls."""
    from eoq.format import repo

    orig = repo.dequantize_entry

    def reference(name, entry, parts, dtype=None, verified=False):
        if not verified:
            repo.verify(name, entry, parts)
        if not repo.is_quantized(entry):
            return orig(name, entry, parts, dtype, verified=True)
        w = repo.to_quantized_tensor(name, entry, parts).dequantize(dtype)
        return w.t().contiguous() if entry.get("transposed") else w

    repo.dequantize_entry = reference
    return "reference"


def child_main(spec: dict) -> dict:
    import torch
    import transformers

    if spec["mode"] != "bf16":
        import eoq  # noqa: F401  (registers the quantizer)

        how = _use_reference() if spec["mode"] == "eoq-ref" else "fused"
    else:
        how = "bf16"
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.from_pretrained(spec["folder"])
    for arch in getattr(config, "architectures", None) or []:
        getattr(transformers, arch, None)  # import the modeling module before the clock
    c0 = sum(os.times()[:2])
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.bfloat16)
    t_load = time.perf_counter() - t0
    total = 0.0
    for p in model.parameters():  # touch every weight, the same way in every mode
        total += float(p.detach().sum(dtype=torch.float32))
    seconds = time.perf_counter() - t0
    cpu = sum(os.times()[:2]) - c0  # user + system of all its threads: robust to a busy machine at 1 thread
    return {"mode": spec["mode"], "how": how, "seconds": seconds, "cpu_s": cpu, "from_pretrained_s": t_load,
            "touch_s": seconds - t_load, "checksum": total, "peak_rss": _peak_rss_bytes(),
            "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run_child(spec: dict, threads, cold: bool) -> dict:
    env = dict(os.environ)
    if threads:
        spec = {**spec, "threads": threads}
        env["OMP_NUM_THREADS"] = str(threads)
    if cold:
        drop_caches()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), CHILD_FLAG, json.dumps(spec)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:]) or "(no output)"
        raise RuntimeError(f"{spec['mode']} load of {spec['folder']} exited with {proc.returncode}: {tail}")
    return json.loads(lines[-1])


# ---- folders ----------------------------------------------------------------------------------


def cache_dir() -> pathlib.Path:
    from eoq.testing import models as testmodels

    d = testmodels.resolve_cache_dir() / "bench_load"
    d.mkdir(parents=True, exist_ok=True)
    return d


def resolve(key: str) -> dict:
    from eoq.testing import models as testmodels

    if key == "smollm2":
        return {"key": key, "label": "SmolLM2-135M-dithered", "bf16": testmodels.smollm2_dithered()}
    if key == "llama1b":
        return {"key": key, "label": "Llama-1.1B-random", "bf16": random_models.make_llama(cache_dir() / "llama1b-bf16",
                                                                                           random_models.LLAMA1B)}
    raise SystemExit(f"--models: unknown {key!r} (smollm2, llama1b)")


def convert(info: dict) -> pathlib.Path:
    dest = cache_dir() / f"{info['key']}-eoq4-uniform"
    if (dest / "quant_manifest.json").is_file():
        return dest
    import eoq

    print(f"# converting {info['label']} -> {dest}", file=sys.stderr, flush=True)
    eoq.quantize_model(str(info["bf16"]), str(dest),
                       eoq.QuantConfig(bits=4, allocation="uniform", calibration=None, awq=False),
                       progress=False, verbose=False, overwrite=True)
    return dest


def weight_bytes(folder) -> int:
    return sum(p.stat().st_size for p in pathlib.Path(folder).glob("*.safetensors"))


# ---- the kernel alone -------------------------------------------------------------------------


def kernel_rate(folder: pathlib.Path, repeat: int) -> dict:
    """G weights/s of eoq.format.fused.dequantize_fused over every quantized entry of the folder."""
    import torch
    from safetensors import safe_open

    from eoq.format import fused
    from eoq.format import repo

    manifest = json.loads((folder / repo.MANIFEST).read_text())
    files = {}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = json.loads(index.read_text())["weight_map"]
    entries = {n: e for n, e in manifest["tensors"].items() if repo.is_quantized(e) and fused.handles(e)}
    parts, n_weights = {}, 0
    for name, e in entries.items():
        p = {}
        for part in e["parts"]:
            key = f"{name}.{part}"
            fname = files.get(key, repo.WEIGHTS)
            with safe_open(str(folder / fname), "pt") as f:
                p[part] = f.get_tensor(key).clone()
        parts[name] = p
        n_weights += e["qshape"][0] * e["qshape"][1]
    res = {"tensors": len(entries), "weights": n_weights}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            best = float("inf")
            best_cpu = float("inf")
            for _ in range(repeat + 1):  # the first is a warm-up
                gc.collect()
                c0 = time.process_time()
                t0 = time.perf_counter()
                for name, e in entries.items():
                    w = fused.dequantize_fused(name, e, parts[name], torch.bfloat16)
                    del w
                best = min(best, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
            res[f"gws_{threads}"] = n_weights / best / 1e9
            res[f"seconds_{threads}"] = best
            res[f"cpu_seconds_{threads}"] = best_cpu  # CPU time of all threads
            res[f"gws_cpu_{threads}"] = n_weights / best_cpu / 1e9
    finally:
        torch.set_num_threads(before)
    return res


# ---- the parent -------------------------------------------------------------------------------


def bench(args) -> dict:
    import torch
    import transformers

    import eoq
    from eoq import ops

    if args.cold and os.geteuid() != 0:
        raise SystemExit("--cold needs root (it writes /proc/sys/vm/drop_caches)")
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from {MODES}")
    res = {"date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}",
           "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
           "torch": torch.__version__, "transformers": transformers.__version__, "eoq": eoq.__version__,
           "dequant_kernel": ops.dequant_kernel(), "rans_decoder": ops.rans_decoder(), "threads": args.threads,
           "repeat": args.repeat, "cold": args.cold, "models": []}
    for key in (k for k in args.models.split(",") if k):
        info = resolve(key)
        eoq_dir = convert(info)
        row = {"model": info["label"], "bf16_folder": str(info["bf16"]), "eoq_folder": str(eoq_dir),
               "bf16_bytes": weight_bytes(info["bf16"]), "eoq_bytes": weight_bytes(eoq_dir), "loads": {}}
        runs = {m: [] for m in modes}
        for _ in range(args.repeat):  # alternating, so drifting load on the machine hits every mode alike
            for m in modes:
                folder = info["bf16"] if m == "bf16" else eoq_dir
                r = run_child({"mode": m, "folder": str(folder)}, args.threads, args.cold)
                runs[m].append(r)
                print(f"# {info['label']} {m}: {r['seconds']:.2f} s, peak RSS {r['peak_rss'] / MIB:.0f} MiB",
                      file=sys.stderr, flush=True)
        for m, rs in runs.items():
            best = min(rs, key=lambda r: r["seconds"])
            row["loads"][m] = {**best, "times": [r["seconds"] for r in rs],
                               "peak_rss_min": min(r["peak_rss"] for r in rs)}
        if not args.no_kernel:
            row["kernel"] = kernel_rate(eoq_dir, args.repeat)
        res["models"].append(row)
    return res


def format_table(res: dict) -> str:
    head = ["model", "weights MiB bf16 / eoq", "mode", "load+touch s", "from_pretrained s", "vs bf16", "CPU s",
            "CPU vs bf16", "peak RSS MiB", "RSS vs bf16"]
    out = ["| " + " | ".join(head) + " |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in res["models"]:
        loads = row["loads"]
        base = loads.get("bf16")
        for m, r in loads.items():
            ratio = f"{r['seconds'] / base['seconds']:.2f}x" if base else ""
            cpu_ratio = f"{r['cpu_s'] / base['cpu_s']:.2f}x" if base else ""
            rss = f"{r['peak_rss'] / base['peak_rss']:.2f}x" if base else ""
            size = f"{row['bf16_bytes'] / MIB:.0f} / {row['eoq_bytes'] / MIB:.0f}"
            label = m if m == "bf16" else f"{m} ({r['how']})"
            out.append(f"| {row['model']} | {size} | {label} | {r['seconds']:.2f} | {r['from_pretrained_s']:.2f} | "
                       f"{ratio} | {r['cpu_s']:.2f} | {cpu_ratio} | {r['peak_rss'] / MIB:.0f} | {rss} |")
    kern = [row for row in res["models"] if "kernel" in row]
    if kern:
        out += ["", "| model | quantized tensors | weights | kernel G weights/s, 1 thread (wall / per CPU s) | "
                    "2 threads (wall / per CPU s) |", "|---|---:|---:|---:|---:|"]
        for row in kern:
            k = row["kernel"]
            out.append(f"| {row['model']} | {k['tensors']} | {k['weights'] / 1e6:.0f} M | {k['gws_1']:.2f} / "
                       f"{k['gws_cpu_1']:.2f} | {k['gws_2']:.2f} / {k['gws_cpu_2']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        print(json.dumps(child_main(json.loads(argv[1]))), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,llama1b", help="smollm2, llama1b (comma-separated)")
    p.add_argument("--modes", default="bf16,eoq", help=f"loads to compare, from {','.join(MODES)}")
    p.add_argument("--repeat", type=int, default=3, help="best of N (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the load children")
    p.add_argument("--cold", action="store_true", help="drop the page cache before every load (root)")
    p.add_argument("--no-kernel", action="store_true", help="skip the kernel-alone measurement")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON to PATH")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    t0 = time.time()
    res = bench(args)
    res["args"] = vars(args)
    res["seconds"] = time.time() - t0
    print(f"eoq load - {res['date']} - {res['machine']} - torch {res['torch']}, transformers {res['transformers']} - "
          f"dequant kernel {res['dequant_kernel']}, rANS decoder {res['rans_decoder']} - threads "
          f"{res['threads'] or 'default'} - best of {res['repeat']}{' - cold page cache' if res['cold'] else ''} - "
          f"{res['seconds']:.0f} s\n")
    print(format_table(res))
    if args.json:
        write_json(args.json, res, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
