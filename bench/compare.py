#!/usr/bin/env python3
"""eoq against llama.cpp's k- and i-quants, on the same weights, tokens and windows.

    python bench/compare.py --text WIKI.test.raw --calib CALIB.txt [--model dithered|gguf|HF_FOLDER]
        [--parts whole,down] [--eoq-methods ecsq,absmax,polar,turbo] [--eoq-bits 2,3,4,5,6]
        [--llama-types Q8_0,Q6_K,...] [--no-eoq] [--no-llamacpp] [--n-ctx 512] [--max-windows 16]
        [--eoq-allocation sensitivity,proxy,uniform] [--eoq-calibration calib,self,none]
        [--eoq-variants awq,plain,gptq,awq+gptq]
        [--eoq-keep-embeddings] [--eoq-folders DIR,...] [--llama-calibration none,imatrix] [--threads N]
        [--llama-base f16|bf16] [--base-cache FILE] [--workdir DIR] [--json PATH] [--plot DIR]
    python bench/compare.py --from-json RUN1.json,RUN2.json [--json MERGED.json] [--plot DIR]

Models: ``dithered`` is SmolLM2-135M with continuous weights (eoq.testing.models.smollm2_dithered,
the honest case); ``gguf`` is the original Q4_1 GGUF's weights (dequantized, saved as an HF
folder: a grid that flatters block-32 codes); any other value is a local HF folder.

Systems, each with and without calibration on the **same** ``--calib`` text:
  * eoq: every method x bits (ecsq: bits per parameter of the whole model) x allocation;
    "calibrated" (calib) = activation statistics and the sensitivity pass on the calib text
    (importance, AWQ scales, Fisher coefficients), "self" = the same on text the model samples
    itself (eoq's default: no data), "none" = data-free; each measured once and shared by all
    eoq runs, and so are the rate-distortion curves (quantize_model's curve_cache);
  * llama.cpp (built from the sources vendored in llama-cpp-python==0.3.36, bench/llamacpp.py):
    ``llama-quantize`` types from an F16 GGUF that the vendored convert_hf_to_gguf.py makes
    from the same HF folder; "calibrated" = an imatrix from ``llama-imatrix`` on the calib text.

Parts: (a) ``whole``: the model as each tool makes it (llama.cpp falls back to legacy types
where rows are not a multiple of 256: all SmolLM2 tensors but ffn_down); bits/weight = the
bytes of every tensor the GGUF file or the eoq folder's safetensors store, over all
parameters (each file's other contents, tokenizer and metadata, are left out for both).
(b) ``down``: only the down projections (width 1536, where every K/I type applies)
quantized, everything else left in 16 bits (llama.cpp: F16 base type with
``--tensor-type ffn_down=TYPE``; eoq: a protect rule keeping every other tensor as is);
bits/weight over the down projections' weights alone. (b) is the fair per-bit comparison.

Every model is evaluated by eoq's own harness (eoq.evaluate.evaluate_tokens): GGUFs through
transformers' GGUF loader (dequantized to a plain model), eoq folders through
``from_pretrained``; llama-perplexity protocol (windows of --n-ctx, BOS first, second half
scored), the first --max-windows windows; KL divergence against the base model, whose
log-probabilities (the scored rows) are computed once and cached: in memory, and with
``--base-cache FILE`` on disk for later runs, which then never load the base (at 1.5 B
parameters and a 152k vocabulary, 40 windows are 6.2 GB and 6-10 minutes of forward passes).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Optional

import torch
from _report import write_json  # bench/ is on sys.path (the scripts run as files)

DEFAULT_LLAMA_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "IQ4_XS", "Q3_K_M", "IQ3_S", "Q2_K",
                       "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL")
# For part (b), one tensor type each: the type a K-quant mix gives ffn_down at that level.
DOWN_TYPE = {"Q5_K_M": "Q5_K", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q3_K_M": "Q3_K"}
DOWN_REGEX = r"^(?!.*down_proj).*$"  # eoq part (b): every tensor but the down projections kept as is
# eoq's variants with calibration: (awq, feedback) and the suffix of the setting's name
VARIANTS = {"awq": (True, None, ""), "plain": (False, None, " noawq"), "gptq": (False, "gptq", " gptq"),
            "awq+gptq": (True, "gptq", " awq+gptq")}


def base_folder(model: str, work: pathlib.Path) -> pathlib.Path:
    from eoq.testing import models as testmodels

    if model == "dithered":
        return testmodels.smollm2_dithered()
    if model == "gguf":
        out = work / "smollm2-gguf-hf"
        if not (out / "config.json").is_file():
            from eoq.format.sources import open_source
            src = open_source(testmodels.smollm2_gguf())
            src.load_model().save_pretrained(str(out))  # float32: the Q4_1 values exactly
            src.tokenizer.save_pretrained(str(out))
        return out
    return pathlib.Path(model)


def tokens(folder: pathlib.Path, text_path: str):
    from transformers import AutoTokenizer

    from eoq.evaluate.compare import read_text

    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok(read_text(text_path), add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return torch.tensor([bos] + ids), bos, tok


def gguf_tensor_bytes(path: pathlib.Path) -> int:
    """The bytes of a GGUF file's tensors (the file also holds its metadata: tokenizer, settings)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def down_bits_gguf(path: pathlib.Path) -> tuple[int, int]:
    """(bytes, weights) of the ffn_down tensors of a GGUF file."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    nbytes = weights = 0
    for t in r.tensors:
        if "ffn_down" in t.name:
            nbytes += int(t.n_bytes)
            weights += int(t.n_elements)
    return nbytes, weights


def stored_parameters(folder: pathlib.Path) -> int:
    """The parameters an HF folder stores (tied ones once: the folder keeps them once), from
    the safetensors headers alone."""
    from safetensors import safe_open

    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n += math.prod(st.get_slice(k).get_shape())
    return n


def folder_bytes(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class SpentBase:
    """Stands for the base model once all its log-probabilities are cached: a miss is a bug."""

    def __call__(self, *a, **k):
        raise RuntimeError("the base model was released; its log-probabilities should all be cached")

    device = torch.device("cpu")


class BaseCache(dict):
    """The base's log-probabilities per window (scored rows, float32), kept in a safetensors file
    so that later runs on the same model, text and windows skip the base's forward passes (at
    1.5 B parameters, 40 windows take the base 6-10 minutes on two cores). The file records what
    it was made from; a file from another model, text or window size is ignored and replaced."""

    def __init__(self, path: str, folder: pathlib.Path, args):
        super().__init__()
        from safetensors import safe_open

        self.path = pathlib.Path(path)
        self.meta = {"model": str(pathlib.Path(folder).resolve()), "text": str(args.text), "n_ctx": str(args.n_ctx)}
        if self.path.is_file():
            with safe_open(str(self.path), "pt") as f:
                same = f.metadata() == self.meta
                if same:  # only the windows this run evaluates: 40 of them are 6 GB at a 152k vocabulary
                    from eoq.evaluate.compare import Window
                    for k in f.keys():
                        protocol, n_ctx, stride, start, end, first, bos = k.split(":")
                        if args.max_windows is None or int(start) < args.max_windows * args.n_ctx:
                            self[(protocol, int(n_ctx), int(stride), Window(int(start), int(end), int(first),
                                                                            bos == "1"))] = f.get_tensor(k)
        self.loaded = len(self)

    def save(self):
        from safetensors.torch import save_file

        if len(self) == self.loaded:
            return
        tensors = {f"{p}:{n}:{s}:{w.start}:{w.end}:{w.first}:{int(w.bos)}": v for (p, n, s, w), v in self.items()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=self.meta)
        tmp.replace(self.path)


class Runner:
    def __init__(self, args, work: pathlib.Path):
        from eoq.evaluate.compare import load_model

        self.a, self.work = args, work
        self.folder = base_folder(args.model, work)
        self.ids, self.bos, self.tok = tokens(self.folder, args.text)
        self.rows: list[dict] = []
        self.cache = BaseCache(args.base_cache, self.folder, args) if args.base_cache else {}
        base = self.base_from_cache()
        if base is None:  # the base's forward passes, once
            self.base, _, _ = load_model(self.folder)
            base = self.evaluate(self.base)
        self.n_params = stored_parameters(self.folder)
        self.base_ppl = base["ppl"]
        print(f"# base {self.folder}: PPL {self.base_ppl:.4f} over {base['tokens']} tokens ({base['windows']} windows)")
        if args.base_cache:
            self.cache.save()
        # every window's base log-probabilities are cached now: the base model is not needed
        # again, and at 1.5 B parameters its float32 copy is 6 GB that the models under test need
        self.base = SpentBase()

    def base_from_cache(self) -> Optional[dict]:
        """The base's PPL from a complete cache (its log-probabilities hold the targets'), else None."""
        from eoq.evaluate.compare import _ppl, windows

        ws = list(windows(self.ids.numel(), "llama.cpp", self.a.n_ctx))[:self.a.max_windows]
        keys = [("llama.cpp", self.a.n_ctx, 256, w) for w in ws]
        if not ws or any(k not in self.cache for k in keys):
            return None
        nll = []
        for w, k in zip(ws, keys):
            target = self.ids[w.start + w.first + 1:w.end]
            nll.append(-self.cache[k][torch.arange(target.numel()), target].double())
        return {**_ppl(torch.cat(nll)), "windows": len(ws)}

    def evaluate(self, model) -> dict:
        from eoq.evaluate.compare import evaluate_tokens

        return evaluate_tokens(model, self.ids, self.base, "llama.cpp", self.a.n_ctx, bos_id=self.bos,
                               max_windows=self.a.max_windows, progress=False, base_cache=self.cache)

    def record(self, system: str, setting: str, part: str, calibrated: bool, bpw: float, model, extra=None):
        t0 = time.perf_counter()
        r = self.evaluate(model)
        row = {"system": system, "setting": setting, "part": part, "calibrated": calibrated, "bpw": bpw,
               "ppl": r["ppl"], "ppl_stderr": r["ppl_stderr"], "dppl": r["ppl"] - self.base_ppl,
               "kld": r["kld"]["mean"], "kld_p99": r["kld"]["p99"], "top1": r["same_top1"], "eval_s":
               time.perf_counter() - t0, **(extra or {})}
        self.rows.append(row)
        self.save()
        print(f"  {system:<9} {setting:<16} {part:<5} {'cal' if calibrated else '   '} bpw {bpw:6.3f}  "
              f"PPL {row['ppl']:8.4f}  KLD {row['kld']:.5f}  top1 {100 * row['top1']:5.1f} %", flush=True)

    def save(self):
        """Rewrite the JSON after every row: a long run that dies keeps what it measured."""
        if self.a.json:
            write_json(self.a.json, {"args": vars(self.a), "model": str(self.folder),
                                     "base_ppl": getattr(self, "base_ppl", None), "rows": self.rows}, indent=2)

    # ---- eoq ----------------------------------------------------------------------------

    def eoq_calibration(self, source: str) -> tuple:
        """(stats file, sensitivity file) of a calibration source ("calib" text or "self"),
        measured once and shared by every eoq run."""
        import eoq

        feedback = "gptq" if any(VARIANTS[v][1] for v in self.a.eoq_variants) else None
        folder = self.work / (f"eoq-calibration-{source}" + ("-cov" if feedback else ""))
        if not feedback and (self.work / f"eoq-calibration-{source}-cov" / "sensitivity.safetensors").is_file():
            folder = self.work / f"eoq-calibration-{source}-cov"  # the same statistics, and the covariance
        if not (folder / "sensitivity.safetensors").is_file():
            cfg = eoq.QuantConfig(calibration=self.a.calib if source == "calib" else "self",
                                  calib_sequences=self.a.calib_sequences, calib_seq_len=self.a.n_ctx,
                                  feedback=feedback)  # with the inputs' covariance when a variant needs it
            eoq.calibrate_model(self.folder, folder, cfg, progress=False)
        return folder / "calib_stats.safetensors", folder / "sensitivity.safetensors"

    def run_eoq(self):
        import eoq

        for part in self.a.parts:
            for method in self.a.eoq_methods:
                for bits, alloc in ((b, al) for b in self.a.eoq_bits for al in self.a.eoq_allocation):
                    if method != "ecsq" and (bits != int(bits) or alloc != "uniform"):
                        continue
                    for cal, variant in ((c, v) for c in self.a.eoq_calibration for v in self.a.eoq_variants):
                        if alloc == "sensitivity" and cal == "none":
                            continue  # nothing to measure sensitivity on
                        if cal == "none" and variant != self.a.eoq_variants[0]:
                            continue  # data-free: no variants
                        # part (b): the down projections at exactly `bits` (a protect rule: no
                        # whole-model budget), everything else kept in 16 bits
                        protect = [eoq.ProtectRule(DOWN_REGEX, regex=True),
                                   eoq.ProtectRule("down_proj", regex=True, action="quantize", method=method,
                                                   bits=bits)] if part == "down" else []
                        calibration = {"calib": self.a.calib, "self": "self", "none": None}[cal]
                        awq, feedback, suffix = VARIANTS[variant] if calibration else (False, None, "")
                        cfg = eoq.QuantConfig(method=method, bits=bits if part == "whole" else 4.0,
                                              target_size=None if part == "whole" or method != "ecsq" else 1 << 40,
                                              calibration=calibration,
                                              awq=awq, feedback=feedback, protect=protect, allocation=alloc,
                                              calib_sequences=self.a.calib_sequences, calib_seq_len=self.a.n_ctx,
                                              dtype="bfloat16")  # 16-bit passthrough, as the F16 GGUF base
                        if part == "whole" and self.a.eoq_keep_embeddings:
                            cfg.quantize_embeddings = cfg.quantize_lm_head = False
                        stats, sens = self.eoq_calibration(cal) if calibration else (None, None)
                        setting = f"{method} {bits} {alloc}" + suffix + ("" if cal == "calib" else f" {cal}") \
                            + (" -emb" if part == "whole" and self.a.eoq_keep_embeddings else "")
                        out = self.work / ("eoq-" + part + "-" + setting.replace(" ", "-"))
                        t0 = time.perf_counter()
                        m = eoq.quantize_model(self.folder, out, cfg, stats=stats, sensitivity=sens,
                                               curve_cache=self.work / "eoq-curves", overwrite=True,
                                               progress=False, verbose=False)
                        conv = time.perf_counter() - t0
                        if part == "whole":
                            bpw = 8 * m["totals"]["stored_bytes"] / self.n_params
                        else:
                            down = [e for n, e in m["tensors"].items() if "down_proj" in n and "method" in e]
                            bpw = 8 * sum(e["stored_bytes"] for e in down) / sum(e["shape"][0] * e["shape"][1]
                                                                                 for e in down)
                        model, _ = eoq.load_quantized(out, dtype=torch.float32)
                        alloc_rec = m.get("allocation") or {}
                        self.record("eoq", setting, part, cal == "calib", bpw, model,
                                    {"convert_s": conv, "allocation": alloc, "calibration": cal, "variant": variant,
                                     "folder_bpw": 8 * folder_bytes(out) / self.n_params,
                                     "predicted_kl": alloc_rec.get("predicted_kl")})
                        shutil.rmtree(out)  # re-made in seconds; a full grid would fill the disk

    def run_folders(self):
        """eoq folders made elsewhere (``--eoq-folders``): evaluated as they are, bits from their manifests."""
        import eoq

        for folder in self.a.eoq_folders:
            folder = pathlib.Path(folder)
            m = json.loads((folder / "quant_manifest.json").read_text())
            cfg, alloc_rec = m.get("config") or {}, m.get("allocation") or {}
            model, _ = eoq.load_quantized(folder, dtype=torch.float32)
            self.record("eoq", folder.name, "whole", cfg.get("calibration") not in (None, "self"),
                        8 * m["totals"]["stored_bytes"] / self.n_params, model,
                        {"allocation": cfg.get("allocation"), "calibration": cfg.get("calibration"),
                         "folder": str(folder), "predicted_kl": alloc_rec.get("predicted_kl")})
            del model

    # ---- llama.cpp ----------------------------------------------------------------------

    def run_llamacpp(self):
        import llamacpp
        from eoq.evaluate.compare import load_model

        llamacpp.ensure_tools(self.a.cache)
        f16 = self.work / f"llama-{self.a.llama_base}.gguf"  # bf16 keeps a bf16 folder exactly
        if not f16.is_file():
            llamacpp.convert_hf_to_gguf(self.folder, f16, self.a.llama_base)
        imat = self.work / "llama-imatrix.gguf"
        if not imat.is_file():
            llamacpp.imatrix(f16, self.a.calib, imat, n_ctx=self.a.n_ctx, chunks=self.a.calib_sequences,
                             threads=self.a.threads)
        for part in self.a.parts:
            done = set()
            for qtype in self.a.llama_types:
                if part == "down":
                    qtype = DOWN_TYPE.get(qtype, qtype)  # Q4_K_M and Q4_K_S both give ffn_down Q4_K
                if qtype in done:
                    continue
                done.add(qtype)
                for calibrated in self.a.llama_calibration:
                    out = self.work / f"llama-{part}-{qtype}-{'imat' if calibrated else 'noimat'}.gguf"
                    try:
                        if part == "whole":  # the tensors' bytes, as for eoq (the file adds its tokenizer)
                            llamacpp.quantize(f16, out, qtype, imatrix=imat if calibrated else None, threads=self.a.threads)
                            bpw = 8 * gguf_tensor_bytes(out) / self.n_params
                        else:
                            llamacpp.quantize(f16, out, "F16", imatrix=imat if calibrated else None,
                                              tensor_types={"ffn_down": qtype}, threads=self.a.threads)
                            nbytes, weights = down_bits_gguf(out)
                            bpw = 8 * nbytes / weights
                        model, _, _ = load_model(out)
                    except Exception as e:  # a type llama-quantize or transformers' GGUF loader refuses
                        print(f"  llama.cpp {qtype} {part}: skipped ({type(e).__name__}: {str(e)[:200]})")
                        self.rows.append({"system": "llama.cpp", "setting": qtype, "part": part,
                                          "calibrated": calibrated, "error": f"{type(e).__name__}: {e}"})
                        continue
                    self.record("llama.cpp", qtype, part, calibrated, bpw, model)
                    out.unlink()  # GGUFs are re-made in seconds; keep the disk small


def table(rows: list[dict]) -> str:
    lines = ["| system | setting | part | calibration | bits/weight | PPL | ΔPPL | mean KLD | KLD p99 | top-1 % |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted((r for r in rows if "error" not in r), key=lambda r: (r["part"], r["system"], r["bpw"])):
        lines.append(f"| {r['system']} | {r['setting']} | {r['part']} | {'yes' if r['calibrated'] else 'no'} | "
                     f"{r['bpw']:.3f} | {r['ppl']:.4f} | {r['dppl']:+.4f} | {r['kld']:.5f} | {r['kld_p99']:.4f} | "
                     f"{100 * r['top1']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: pathlib.Path, model: str = "dithered") -> list[pathlib.Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for part in sorted({r["part"] for r in rows}):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        groups: dict = {}
        for r in rows:
            if r["part"] == part and "error" not in r:
                label = f"{r['system']} {curve_name(r) if r['system'] == 'eoq' else ''}" \
                        f"{' (calibrated)' if r['calibrated'] else ''}".replace("  ", " ")
                groups.setdefault(label, []).append((r["bpw"], r["kld"]))
        palette = iter(["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:orange", "tab:olive",
                        "tab:cyan", "tab:pink"])
        colors: dict = {}
        for label, pts in sorted(groups.items()):
            pts.sort()
            cal = "calibrated" in label
            if label.startswith("eoq"):  # one colour per eoq curve; calibrated solid, without dotted
                key = label.replace(" (calibrated)", "")
                color = colors.setdefault(key, next(palette, "gray"))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if cal else "o:", color=color, label=label,
                        markersize=3 if cal else 2, linewidth=1.5 if cal else 1)
            else:  # llama.cpp types are separate formats: markers, not a line
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "s" if cal else "x", color="black" if cal else "gray",
                        label=label, markersize=5 if cal else 4)
        for r in rows:
            if r["part"] == part and r["system"] == "llama.cpp" and r["calibrated"] and "error" not in r:
                ax.annotate(r["setting"], (r["bpw"], r["kld"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("bits/weight")
        ax.set_ylabel("mean KL divergence to the base (log)")
        ax.set_title(f"SmolLM2-135M ({model}), part: {part}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        path = out_dir / f"pareto-{model}-{part}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def curve_name(r: dict) -> str:
    """An eoq row's curve: its method, and the allocation when it is not uniform."""
    words = r["setting"].split()
    return " ".join([words[0]] + words[2:])


def interp_log(xs: list[float], ys: list[float], x: float) -> Optional[float]:
    """y at x on the piecewise-linear curve of log(y) over x (None outside the measured range)."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            t = (x - x0) / (x1 - x0) if x1 > x0 else 0.0
            return math.exp((1 - t) * math.log(y0) + t * math.log(y1))
    return None


def bits_at(curve: list[tuple[float, float]], kld: float) -> Optional[float]:
    """The bits/weight at which a measured (bits, KLD) curve reaches `kld`: KLD falls with bits,
    so bits are interpolated over log(KLD) between the neighbouring settings (None outside)."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if min(y0, y1) <= kld <= max(y0, y1) and y0 != y1:
            t = (math.log(kld) - math.log(y0)) / (math.log(y1) - math.log(y0))
            return x0 + t * (x1 - x0)
    return None


def verdict(rows: list[dict], part: str = "down", method: str = "ecsq") -> str:
    """``method`` names an eoq curve (curve_name): "ecsq", or "ecsq global"."""
    """eoq (calibrated ``method``) against each llama.cpp type (imatrix) at the type's bits/weight.

    eoq's KLD at a llama.cpp type's bits/weight is read off eoq's measured curve (log-linear
    between neighbouring settings), and the bits/weight at which eoq reaches Q4_K's KLD is read
    off the inverse curve; both are interpolations between measured points, said as such."""
    curve = sorted((r["bpw"], r["kld"]) for r in rows if r["part"] == part and r["system"] == "eoq"
                   and r["calibrated"] and curve_name(r) == method and "error" not in r)
    peers = sorted((r for r in rows if r["part"] == part and r["system"] == "llama.cpp" and r["calibrated"]
                    and "error" not in r), key=lambda r: r["bpw"])
    if len(curve) < 2 or not peers:
        return ""
    xs, ys = [c[0] for c in curve], [c[1] for c in curve]
    lines = [f"| llama.cpp type (imatrix) | bits/weight | its mean KLD | eoq {method} (calibrated) KLD at that bits/weight"
             " | ratio (llama.cpp / eoq) | eoq reaches its KLD at bits/weight |", "|---|---:|---:|---:|---:|---:|"]
    seen = set()
    for r in peers:
        key = (round(r["bpw"], 4), round(r["kld"], 6))  # Q4_K_M and Q4_K_S are one type in part (b)
        if key in seen:
            continue
        seen.add(key)
        e = interp_log(xs, ys, r["bpw"])
        b = bits_at(curve, r["kld"])
        lines.append(f"| {r['setting']} | {r['bpw']:.3f} | {r['kld']:.5f} | "
                     + (f"{e:.5f} | {r['kld'] / e:.2f}x |" if e else "outside eoq's range | |")
                     + (f" {b:.2f} ({b / r['bpw']:.2f}x) |" if b else " outside eoq's range |"))
    # Q4_K: in part (b) the one type; in part (a) the Q4_K_M mix, llama.cpp's usual 4-bit choice
    q4k = sorted((r for r in peers if r["setting"] in ("Q4_K_M", "Q4_K", "Q4_K_S")),
                 key=lambda r: ("Q4_K_M", "Q4_K", "Q4_K_S").index(r["setting"]))
    if q4k:
        target = q4k[0]["kld"]
        b = bits_at(curve, target)
        lines.append("")
        lines.append(f"{q4k[0]['setting']} (imatrix) in part ({part}): {q4k[0]['bpw']:.3f} bits/weight, mean KLD {target:.5f}; "
                     + (f"eoq {method} (calibrated) reaches that KLD at {b:.2f} bits/weight." if b else
                        f"eoq {method}'s measured range does not reach it."))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dithered")
    ap.add_argument("--text", help="evaluation text (file or datasets name); required unless --from-json")
    ap.add_argument("--calib", help="calibration text file, shared by eoq and llama-imatrix; required unless --from-json")
    ap.add_argument("--parts", default="whole,down")
    ap.add_argument("--eoq-methods", default="ecsq,absmax,polar,turbo")
    ap.add_argument("--eoq-bits", default="2,3,4,5,6")
    ap.add_argument("--eoq-keep-embeddings", action="store_true",
                    help="part (a): keep the embedding / lm_head in 16 bits (eoq quantizes them by default)")
    ap.add_argument("--eoq-allocation", default="sensitivity",
                    help="sensitivity, proxy and/or uniform (the last for every method; the others ecsq only)")
    ap.add_argument("--eoq-calibration", default="calib,self,none",
                    help="eoq's calibration: calib (the --calib text), self (text the model samples), none")
    ap.add_argument("--eoq-variants", default="awq",
                    help="with calibration: awq (AWQ scales, the default), plain (importance weighting only), "
                         "gptq (error feedback), awq+gptq (both); comma-separated")
    ap.add_argument("--llama-types", default=",".join(DEFAULT_LLAMA_TYPES))
    ap.add_argument("--llama-calibration", default="none,imatrix",
                    help="llama.cpp rows without (none) and/or with an imatrix (imatrix)")
    ap.add_argument("--no-eoq", action="store_true")
    ap.add_argument("--eoq-folders", type=lambda v: [f for f in v.split(",") if f], default=[],
                    help="eoq folders already made (comma-separated): evaluated as they are")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--llama-base", default="f16", choices=("f16", "bf16", "f32"),
                    help="the 16-bit GGUF llama-quantize starts from (bf16 for a bfloat16 folder: exact)")
    ap.add_argument("--base-cache", help="safetensors file keeping the base's log-probabilities across runs")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--calib-sequences", type=int, default=32, help="calibration windows (eoq) = imatrix chunks")
    ap.add_argument("--cache", default=None, help="where llama.cpp is built (default: the eoq cache)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", help="write all rows as JSON")
    ap.add_argument("--plot", help="write Pareto plots (PNG) into this folder")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--from-json", help="earlier runs' JSON files (comma-separated; a later file's row replaces an "
                                        "earlier one of the same system, setting, part and calibration): print "
                                        "their table, verdict and plots, --json writes the merged rows; run nothing")
    a = ap.parse_args(argv)
    if a.from_json:
        run = merge([json.loads(pathlib.Path(f).read_text()) for f in a.from_json.split(",")])
        if a.json:
            write_json(a.json, {**run, "merged_from": a.from_json.split(",")}, indent=2)
        return report(run, a.plot)
    if not a.text or not a.calib:
        ap.error("--text and --calib are required")
    a.parts = a.parts.split(",")
    a.eoq_methods = a.eoq_methods.split(",")
    a.eoq_allocation = a.eoq_allocation.split(",")
    a.eoq_calibration = a.eoq_calibration.split(",")
    a.eoq_variants = a.eoq_variants.split(",")
    if set(a.eoq_variants) - set(VARIANTS):
        ap.error(f"--eoq-variants: choose from {', '.join(VARIANTS)}")
    a.eoq_bits = [float(b) if "." in b else int(b) for b in a.eoq_bits.split(",")]
    a.llama_types = [t for t in a.llama_types.split(",") if t]
    a.llama_calibration = [{"none": False, "imatrix": True}[c] for c in a.llama_calibration.split(",")]
    if a.threads:
        torch.set_num_threads(a.threads)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    work = pathlib.Path(a.workdir or tempfile.mkdtemp(prefix="eoq-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runner = Runner(a, work)
    if a.eoq_folders:
        runner.run_folders()
    if not a.no_eoq:
        runner.run_eoq()
    if not a.no_llamacpp:
        runner.run_llamacpp()
    print(f"\n# compare: model {a.model}, text {a.text}, calib {a.calib}, n_ctx {a.n_ctx}, "
          f"{a.max_windows} windows, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s\n")
    runner.save()
    return report({"args": vars(a), "rows": runner.rows}, a.plot)


def merge(runs: list[dict]) -> dict:
    rows: dict = {}
    for run in runs:
        for r in run["rows"]:
            rows[(r["system"], r["setting"], r["part"], r["calibrated"])] = r
    return {"args": runs[0]["args"], "base_ppl": next((r["base_ppl"] for r in runs if r.get("base_ppl")), None),
            "rows": list(rows.values())}


def report(run: dict, plot_dir: Optional[str]) -> int:
    rows, model = run["rows"], pathlib.Path(run["args"]["model"]).name
    for r in rows:  # older runs named part (b)'s types after the mix (Q4_K_M); it is one type there
        if r["system"] == "llama.cpp" and r["part"] == "down":
            r["setting"] = DOWN_TYPE.get(r["setting"], r["setting"])
    print(table(rows))
    curves = sorted({curve_name(r) for r in rows if r["system"] == "eoq" and r["setting"].startswith("ecsq")})
    for part in ("down", "whole"):
        for method in curves:
            v = verdict(rows, part, method)
            if v:
                print(f"\n## part {part}: eoq {method} against llama.cpp at equal bits/weight\n\n{v}")
    if plot_dir:
        for p in plot(rows, pathlib.Path(plot_dir), model):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
