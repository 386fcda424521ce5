#!/usr/bin/env python3
"""End to end: converting a model with eoq.quantize_model, loading the result, decoding it.

    python bench/bench_convert.py [--models smollm2,minilm,PATH] [--methods ecsq,absmax,polar,turbo]
                                  [--bits 4 | --bits ecsq=4,absmax=4,...] [--calibrated] [--repeat 3]
                                  [--threads N] [--workdir DIR] [--keep] [--json PATH]

Models: ``smollm2`` is SmolLM2-135M-dithered (eoq.testing.models.smollm2_dithered: a bfloat16
HF folder with continuous weights, so the conversion takes the streaming folder path, not
the GGUF one); ``minilm`` is all-MiniLM-L6-v2 (BERT encoder, float32 safetensors, loaded
with transformers.AutoModel); any other value is a local HF folder (AutoModelForCausalLM
when its architecture ends in ForCausalLM, else AutoModel). Each conversion is data-free
(``QuantConfig(method, bits, calibration=None, awq=False)``); ``--calibrated`` adds the
default config (``QuantConfig()``: ecsq 4 bits, calibration "self", AWQ) when ecsq is
among the methods.

For each model x method it reports:
  * conversion: wall time of the quantize_model call and the converting process's peak RSS
    (VmHWM; see _peak_rss_bytes for why not ru_maxrss), each conversion in a fresh
    subprocess, next to that process's RSS right after ``import eoq, transformers`` (the
    baseline every conversion pays) and the input's largest safetensors shard. A data-free
    conversion streams the folder tensor by tensor, so its peak RSS must stay within the
    largest input shard (mmap'd pages count as RSS) + 1 GiB: the "RSS <= shard+1GiB" column
    checks peak RSS (absolute, baseline included) against that;
  * size: the output folder's total bytes (weights, manifest, config, tokenizer, card,
    loader), also as a fraction of the bf16 copy's folder (config and weights only), and
    from the manifest's totals bits/weight over the quantized weights and over all
    parameters and the original/stored ratio;
  * load: wall time of ``eoq.load_quantized(folder, dtype=bfloat16)`` against
    ``<Auto class>.from_pretrained`` of the same model saved as bfloat16 safetensors (saved
    once per model in this run), both timed around the load call only, each repeat in a
    fresh subprocess (the model class is resolved before the clock starts, so transformers'
    lazy import of the modeling module is in neither figure), best of --repeat, the ratio
    quantized / bf16, and both loading processes' peak RSS. The loaded model's first
    quantized weight is compared with eoq.read_state_dict's decode of it (outside the
    timing), as a check the load is real;
  * decode: ``eoq.read_state_dict(folder)`` in this process (decode and checksums only, no
    model), best of --repeat after one untimed warm-up, as quantized weights per second.

Threads: on a shared or loaded machine pass --threads 1; torch's thread pools degrade badly
when their threads do not get a core each (2 threads on a busy 2-core box decoded 7-10x
slower than 1).

Needs the eoq package installed (the script imports the installed package: sys.path[0]
is bench/); the models are fetched on first use into $EOQ_CACHE (default ~/.cache/eoq).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from _report import write_json  # bench/ is on sys.path (the scripts run as files)

DEFAULT_BITS = {"ecsq": 4.0, "absmax": 4.0, "polar": 4.0, "turbo": 4.0}
GIB = 1 << 30
MIB = 1 << 20
CHILD_FLAG = "--_child"


# ---- what runs in the child processes ---------------------------------------------------------


def _peak_rss_bytes() -> int:
    """This process's peak RSS. Linux: VmHWM, the high-water mark of this address space.
    Not ru_maxrss: Linux carries the parent's RSS into a child's ru_maxrss across fork/exec
    (a child of a 500 MiB parent reports at least 500 MiB however little it uses)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # Linux: KiB


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _peak_rss_bytes()


def _resolve_class(folder: str):
    """Import the modeling module of the folder's architecture now, so no timed load pays it."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    for arch in getattr(config, "architectures", None) or []:
        getattr(transformers, arch, None)
    return config


def child_main(spec: dict) -> dict:
    import eoq  # the baseline RSS is taken after these imports, which every conversion or load pays
    import torch
    import transformers

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    transformers.utils.logging.disable_progress_bar()
    out = {"threads": torch.get_num_threads(), "baseline_rss": _current_rss_bytes(),
           "import_peak_rss": _peak_rss_bytes()}
    task = spec["task"]
    if task == "convert":
        config = eoq.QuantConfig(**spec["config"])
        t0 = time.perf_counter()
        manifest = eoq.quantize_model(spec["src"], spec["out"], config, progress=False, verbose=False,
                                      overwrite=True)
        out["seconds"] = time.perf_counter() - t0
        out["totals"] = manifest["totals"]
    elif task == "load_eoq":
        _resolve_class(spec["folder"])
        t0 = time.perf_counter()
        model, manifest = eoq.load_quantized(spec["folder"], dtype=torch.bfloat16)
        out["seconds"] = time.perf_counter() - t0
        out["params"] = sum(p.numel() for p in model.parameters())
        out["check"] = _load_check(model, manifest, spec["folder"])
    elif task == "load_bf16":
        _resolve_class(spec["folder"])
        cls = getattr(transformers, spec["auto"])
        t0 = time.perf_counter()
        model = cls.from_pretrained(spec["folder"], dtype=torch.bfloat16)
        out["seconds"] = time.perf_counter() - t0
        out["params"] = sum(p.numel() for p in model.parameters())
    else:
        raise ValueError(f"unknown child task {task!r}")
    out["peak_rss"] = _peak_rss_bytes()
    return out


def _load_check(model, manifest: dict, folder: str) -> dict:
    """The loaded model's first quantized weight against read_state_dict's decode of it."""
    import eoq
    from eoq.format import repo

    quantized = sorted(n for n, e in manifest["tensors"].items() if repo.is_quantized(e))
    if not quantized:
        return {"tensor": None}
    name = quantized[0]
    sd = model.state_dict()
    if name not in sd:
        return {"tensor": name, "error": "not a parameter of the loaded model"}
    ref = eoq.read_state_dict(folder, names=[name])[name].float()
    got = sd[name].float()
    if got.shape != ref.shape:
        return {"tensor": name, "error": f"shape {list(got.shape)} != {list(ref.shape)}"}
    rel = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    return {"tensor": name, "rel_diff": rel, "ok": rel < 1e-2}


def run_child(spec: dict, threads) -> dict:
    """Run one task in a fresh interpreter; its result is the JSON on its last stdout line."""
    env = dict(os.environ)
    if threads:
        spec = {**spec, "threads": threads}
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), CHILD_FLAG, json.dumps(spec)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{spec['task']} child exited with {proc.returncode}: {tail}")
    res = json.loads(lines[-1])
    res["process_wall"] = wall
    return res


# ---- the parent -------------------------------------------------------------------------------


def resolve_model(spec: str) -> dict:
    from eoq.testing import models as testmodels

    if spec == "smollm2":
        return {"key": spec, "label": "SmolLM2-135M-dithered", "path": str(testmodels.smollm2_dithered()),
                "auto": "AutoModelForCausalLM"}
    if spec == "minilm":
        return {"key": spec, "label": "all-MiniLM-L6-v2", "path": str(testmodels.minilm()), "auto": "AutoModel"}
    path = pathlib.Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--models: {spec!r} is neither smollm2, minilm nor a local HF folder")
    archs = json.loads((path / "config.json").read_text()).get("architectures") or [""]
    auto = "AutoModelForCausalLM" if archs[0].endswith("ForCausalLM") else "AutoModel"
    return {"key": spec, "label": path.name, "path": str(path), "auto": auto}


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in pathlib.Path(folder).rglob("*") if p.is_file())


def shard_sizes(folder) -> list[int]:
    return sorted(p.stat().st_size for p in pathlib.Path(folder).glob("*.safetensors"))


def parse_bits(text: str | None, methods: list[str]) -> dict[str, float]:
    bits = {m: DEFAULT_BITS.get(m, 4.0) for m in methods}
    if not text:
        return bits
    for item in text.split(","):
        if "=" in item:
            m, b = item.split("=", 1)
            if m.strip() not in bits:
                raise SystemExit(f"--bits: {m.strip()!r} is not among --methods")
            bits[m.strip()] = float(b)
        else:
            bits = {m: float(item) for m in methods}
    return bits


def best_of_children(spec: dict, args) -> dict:
    runs = [run_child(spec, args.threads) for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r["seconds"])
    return {"best": best["seconds"], "times": [r["seconds"] for r in runs],
            "peak_rss": max(r["peak_rss"] for r in runs), "baseline_rss": best["baseline_rss"],
            "params": best.get("params"), "check": best.get("check")}


def decode_rate(folder: str, quantized_params: int, repeat: int) -> dict:
    import eoq

    eoq.read_state_dict(folder)  # warm-up: page cache, first-call costs
    gc.collect()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sd = eoq.read_state_dict(folder)
        times.append(time.perf_counter() - t0)
        del sd
        gc.collect()
    best = min(times)
    return {"best": best, "times": times, "Mweights_per_s": quantized_params / best / 1e6}


def save_bf16(model_info: dict, dest: pathlib.Path) -> None:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cls = getattr(transformers, model_info["auto"])
    model = cls.from_pretrained(model_info["path"])
    model.to(torch.bfloat16).save_pretrained(str(dest))
    del model
    gc.collect()


def bench(args) -> dict:
    import torch
    import transformers

    import eoq

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    from eoq.methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; eoq has {sorted(METHODS)}")
    bits = parse_bits(args.bits, methods)
    created = args.workdir is None or not os.path.exists(args.workdir)
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="eoq-bench-convert-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    res = {"date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}",
           "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
           "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "eoq": eoq.__version__, "threads": torch.get_num_threads(),
           "repeat": args.repeat, "workdir": str(work), "models": {}, "rows": []}
    mine = []  # what this run made under work (folders that were there before stay), removed unless --keep
    try:
        for spec in (s for s in args.models.split(",") if s):
            info = resolve_model(spec)
            mdir = work / spec.replace("/", "_")
            if not mdir.exists():
                mine.append(mdir)
            mdir.mkdir(parents=True, exist_ok=True)
            shards = shard_sizes(info["path"])
            info["largest_shard"] = shards[-1] if shards else 0
            info["input_bytes"] = sum(shards)
            print(f"# {info['label']}: {info['path']} (largest shard {info['largest_shard'] / MIB:.1f} MiB)",
                  file=sys.stderr, flush=True)
            bf16 = mdir / "bf16"
            mine.append(bf16)
            save_bf16(info, bf16)
            info["bf16_bytes"] = folder_bytes(bf16)
            try:
                info["bf16_load"] = best_of_children({"task": "load_bf16", "folder": str(bf16),
                                                      "auto": info["auto"]}, args)
            except Exception as e:
                info["bf16_load"] = {"error": str(e)}
            print(f"#   bf16 from_pretrained: {info['bf16_load'].get('best', float('nan')):.3f} s",
                  file=sys.stderr, flush=True)
            res["models"][spec] = info

            settings = [(m, bits[m], False) for m in methods]
            if args.calibrated and "ecsq" in methods:
                settings.append(("ecsq", eoq.QuantConfig().bits, True))
            for method, b, calibrated in settings:
                row = {"model": info["label"], "model_key": spec, "method": method, "bits": b,
                       "calibrated": calibrated, "largest_shard": info["largest_shard"]}
                res["rows"].append(row)
                config = eoq.QuantConfig() if calibrated else \
                    eoq.QuantConfig(method=method, bits=b, calibration=None, awq=False)
                row["config"] = config.to_dict()
                out = mdir / f"{method}-{b:g}{'-calibrated' if calibrated else ''}"
                mine += [out, out.with_name(f".{out.name}.eoq-partial")]  # the partial one if it fails
                print(f"#   {method} {b:g}{' calibrated' if calibrated else ''}: converting", file=sys.stderr,
                      flush=True)
                try:
                    c = run_child({"task": "convert", "src": info["path"], "out": str(out),
                                   "config": config.to_dict()}, args.threads)
                except Exception as e:
                    row["error"] = str(e)
                    print(f"#     error: {e}", file=sys.stderr, flush=True)
                    continue
                t = c["totals"]
                bound = info["largest_shard"] + GIB
                row.update(convert_s=c["seconds"], convert_process_s=c["process_wall"], peak_rss=c["peak_rss"],
                           baseline_rss=c["baseline_rss"], import_peak_rss=c["import_peak_rss"],
                           rss_bound=bound, rss_ok=c["peak_rss"] <= bound, totals=t,
                           folder_bytes=folder_bytes(out), stored_bytes=t["stored_bytes"],
                           bpw_quantized=t["bits_per_weight_quantized"], bpw_all=t["bits_per_weight_all"],
                           ratio=t["ratio"], quantized_params=t["quantized_params"])
                try:
                    row["load"] = best_of_children({"task": "load_eoq", "folder": str(out)}, args)
                    bl = info["bf16_load"].get("best")
                    row["load_ratio"] = row["load"]["best"] / bl if bl else None
                    chk = row["load"].get("check") or {}
                    if chk.get("ok") is False or chk.get("error"):
                        print(f"#     WARNING: loaded weight differs from read_state_dict: {chk}", file=sys.stderr)
                except Exception as e:
                    row["load"] = {"error": str(e)}
                    print(f"#     load error: {e}", file=sys.stderr, flush=True)
                try:
                    row["decode"] = decode_rate(str(out), t["quantized_params"], args.repeat)
                except Exception as e:
                    row["decode"] = {"error": str(e)}
                    print(f"#     decode error: {e}", file=sys.stderr, flush=True)
                print(f"#     {row['convert_s']:.1f} s, peak RSS {row['peak_rss'] / MIB:.0f} MiB, "
                      f"load {row['load'].get('best', float('nan')):.3f} s, "
                      f"decode {row['decode'].get('Mweights_per_s', float('nan')):.0f} M weights/s",
                      file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            for d in mine:
                shutil.rmtree(d, ignore_errors=True)
            if created:
                shutil.rmtree(work, ignore_errors=True)
    return res


def format_table(res: dict) -> str:
    head = ["model", "method", "bits", "calib", "convert s", "peak RSS MiB", "import RSS MiB", "largest shard MiB",
            "RSS <= shard+1GiB", "folder MiB", "folder/bf16", "bpw quant", "bpw all", "ratio", "load s",
            "bf16 load s", "load eoq/bf16", "load peak RSS MiB eoq/bf16", "decode Mw/s"]
    align = ["---"] * 4 + ["---:"] * 4 + ["---"] + ["---:"] * 10
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    nan = float("nan")
    for r in res["rows"]:
        calib = "AWQ+self" if r["calibrated"] else "no"
        cells = [r["model"], r["method"], f"{r['bits']:g}", calib]
        if "error" in r:
            msg = r["error"].replace("|", "/")
            out.append("| " + " | ".join(cells + [f"error: {msg[:160]}"] + [""] * (len(head) - 5)) + " |")
            continue
        minfo = res["models"][r["model_key"]]
        bl = minfo["bf16_load"].get("best", nan)
        load = r["load"].get("best", nan)
        if r["calibrated"]:
            bound = "n/a"
        else:
            bound = "PASS" if r["rss_ok"] else "FAIL"
        chk = r["load"].get("check") or {}
        flag = " (!)" if chk.get("ok") is False or chk.get("error") else ""
        cells += [f"{r['convert_s']:.1f}", f"{r['peak_rss'] / MIB:.0f}", f"{r['baseline_rss'] / MIB:.0f}",
                  f"{r['largest_shard'] / MIB:.1f}", bound, f"{r['folder_bytes'] / MIB:.1f}",
                  f"{r['folder_bytes'] / minfo['bf16_bytes']:.2f}x",
                  f"{r['bpw_quantized']:.3f}", f"{r['bpw_all']:.3f}", f"{r['ratio']:.2f}x", f"{load:.3f}{flag}",
                  f"{bl:.3f}", f"{(r.get('load_ratio') or nan):.2f}x",
                  f"{r['load'].get('peak_rss', nan) / MIB:.0f}/{minfo['bf16_load'].get('peak_rss', nan) / MIB:.0f}",
                  f"{r['decode'].get('Mweights_per_s', nan):.0f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        print(json.dumps(child_main(json.loads(argv[1]))), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,minilm", help="smollm2, minilm or local HF folders, comma-separated")
    p.add_argument("--methods", default="ecsq,absmax,polar,turbo", help="comma-separated (default: all four)")
    p.add_argument("--bits", default=None,
                   help="one value for every method, or method=bits pairs (default: "
                        + ", ".join(f"{m} {b:g}" for m, b in DEFAULT_BITS.items()) + ")")
    p.add_argument("--calibrated", action="store_true",
                   help="also the default calibrated config (QuantConfig(): ecsq 4, calibration 'self', AWQ)")
    p.add_argument("--repeat", type=int, default=3, help="best of N for load and decode (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads, here and in the children")
    p.add_argument("--workdir", default=None, help="where the folders go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the converted and bf16 folders")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON to PATH")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")

    t0 = time.time()
    res = bench(args)
    res["args"] = vars(args)
    res["seconds"] = time.time() - t0
    print(f"eoq convert - {res['date']} - {res['machine']} - torch {res['torch']}, transformers "
          f"{res['transformers']}, {res['threads']} threads - load and decode best of {res['repeat']} - "
          f"{res['seconds']:.0f} s\n")
    print(format_table(res))
    checks = [(r.get("load") or {}).get("check") or {} for r in res["rows"]]
    bad = [c for c in checks if c.get("ok") is False or c.get("error")]
    if bad:
        print("\n(!) the loaded model's weight differs from read_state_dict's decode; see the JSON (load.check)")
    if args.keep:
        print(f"\nfolders kept under {res['workdir']}")
    if args.json:
        write_json(args.json, res, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
