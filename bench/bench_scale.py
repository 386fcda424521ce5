#!/usr/bin/env python3
"""Real-size models: calibration's time and peak memory, and whole conversions against llama.cpp.

    python bench/bench_scale.py [--models llama1b,llama8b,tiny] [--what calibration,datafree,calibrated]
        [--sequences 4] [--seq-len 256] [--fisher-sequences 2] [--modes whole,blocks]
        [--calib-text PATH] [--threads N] [--repeat R] [--timeout S] [--cache DIR] [--workdir DIR]
        [--executor local|ray] [--json PATH]

    # the whole data-free conversion of the 1 B model against llama-quantize Q4_K_M:
    python bench/bench_scale.py --models llama1b --what datafree --threads 2 --json R.json
    # the calibrated default conversion against llama-imatrix + llama-quantize Q4_K_M:
    python bench/bench_scale.py --models llama1b --what calibrated --sequences 4 --seq-len 256 \\
        --fisher-sequences 2 --threads 2

Models: random-weight Llama-shaped folders (bench/random_models.py: ``llama1b`` 1.10 B,
``llama8b`` 8.03 B parameters, bf16 in 1 GiB shards; ``tiny`` here: 2 layers, hidden 256,
vocabulary 4096, 3.1 M parameters, to check the bench end to end in a minute), written once
into <cache>/bench_load/. Their quality numbers mean nothing; their times and memory do.
<cache> is --cache, else eoq.testing.models.resolve_cache_dir() ($EOQ_CACHE, else ~/.cache/eoq);
the llama.cpp tools must already be built there (``python bench/llamacpp.py build``): this
bench never builds them.

``--what calibration`` (the default): the two calibration passes of a conversion, each of
``--modes`` in a fresh subprocess (peak RSS is the child's VmHWM, mapped file pages included,
and the peaks of its anonymous memory and of its mapped file pages are sampled every 20 ms:
file pages are the page cache's, which the kernel can drop), on ``--sequences`` random token
sequences of ``--seq-len`` tokens (covariance off: the default's statistics) and the Fisher
pass on the first ``--fisher-sequences``:
  ``whole``:  the model loaded in float32 (``from_pretrained``), ``collect_stats`` and
              ``fisher_pass`` (how every conversion calibrated before eoq.calibrate.blockwise);
  ``blocks``: ``collect_stats_blockwise`` and ``fisher_pass_blockwise`` (what a conversion
              from a folder does now): one decoder block at a time, read from the files.
A mode that the machine cannot hold is reported as such (the child's exit status), not
hidden.

Whole conversions, each timed against llama.cpp on the same weights in the same run, one
right after the other (baseline first, then eoq; ``--repeat R`` alternates the pair R times
and reports the median of the R ratios, each pair's ratio from its own two runs):
  ``datafree``:   ``eoq.quantize_model(folder, out, QuantConfig(calibration=None, awq=False))``
                  (every other field the default: ecsq, a 4.0 bits-per-parameter budget over
                  the whole model, proxy allocation) against ``llama-quantize F16.gguf Q4_K_M``
                  without an importance matrix. Figure: quantized weights per second, eoq's
                  ÷ llama-quantize's (goal >= 1.0). Quantized weights: eoq's manifest entries
                  that are stored quantized; the GGUF's tensors whose type is not F32/F16/BF16.
  ``calibrated``: ``QuantConfig(calibration=TEXT, calib_sequences=S, calib_seq_len=L,
                  sensitivity_sequences=F)`` with S, L, F = ``--sequences``, ``--seq-len``,
                  ``--fisher-sequences`` (every other field the default: AWQ, the Fisher
                  sensitivity allocation) against ``llama-imatrix -c L --chunks S`` over the
                  same text (S x L tokens, as eoq's statistics pass) then
                  ``llama-quantize --imatrix`` Q4_K_M, wall times summed. Figure: eoq's time ÷
                  llama.cpp's (goal <= 3).
The F16 GGUF is made once from the folder with the vendored convert_hf_to_gguf.py and cached
next to it (<cache>/bench_load/<model>-bf16.f16.gguf); its conversion is not timed. The eoq
side reads the bf16 safetensors, llama.cpp the F16 GGUF (the two tools' own inputs).

How things are measured. Every timed program runs as a subprocess started with Popen and
reaped with os.wait4: wall time from just before the start to the reaping, peak RSS =
ru_maxrss of that one child's rusage (the same figure as its VmHWM, mapped file pages
included), for llama-quantize, llama-imatrix and the eoq child alike. "eoq s" is the
``quantize_model`` call itself, timed inside the child (the process's wall, which adds
starting Python and importing torch and eoq, 2-5 s, is in the JSON as ``wall_s``); llama.cpp's
time is the whole process's. eoq's phases (JSON ``phases``, second table) come from timing
``eoq.convert``'s own ``calibrate``, ``allocate_rates`` and ``write_shards`` (wrapped in the
child; nothing is changed in the package): "quantize" is the rest of the call (planning,
the fixed tensors and the quantized ones). Before each timed run its input files are read
once (so both sides start with their input in the page cache; at 8 B the two inputs, 16 GB
each, do not both fit in 24 GiB). Outputs go to --workdir (default <cache>/bench_load/
scale-work) and are deleted after each run, eoq's partial folder too (a leftover one would be
resumed). ``--timeout S`` kills an eoq child after S seconds (reported as timed out, with
the baseline's figures).

Tokenizer: the random folders have none, and the GGUF converter, llama-imatrix and eoq's
calibration need one, so the bench makes ``<model>-bf16-tok/`` next to each folder (once):
symbolic links to the folder's files plus a SentencePiece-style BPE tokenizer (byte fallback,
<unk> <s> </s> then <0x00>..<0xFF>, as Llama 2's) trained with ``tokenizers`` on
--calib-text, padded with unused ``<extra_N>`` tokens to the model's vocabulary (the GGUF
needs exactly that many). Both tools convert that folder. The converter takes it as a Llama
HF tokenizer (gguf LlamaHfVocab: every score -1000), so llama.cpp's SPM tokenizer does not
split the text as the HF one does; the token counts are matched (S sequences of L tokens
each side), not the token boundaries. eoq takes S windows evenly spaced over the whole text,
llama-imatrix the first S chunks of L tokens; llama-imatrix also computes its running
perplexity (as it does by default) and starts each chunk with BOS.

Caveats: the machine is shared (2 cores), so every time is noisy; only the ratios, from runs
one right after the other, are meant to be read. The two sides do not make the same thing:
llama.cpp's Q4_K_M is about 4.9 bits per parameter, eoq's default budget 4.0 (both in the
JSON as ``bits_per_param``, the stored tensors' bits over all parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import threading
import time

import random_models
from _report import write_json  # bench/ is on sys.path (the scripts run as files)

CHILD_FLAG = "--_child"
CALIB_TEXT = "/work/shared/data/calibration/python-docs.txt"
QTYPE = "Q4_K_M"
TINY = dict(hidden_size=256, num_hidden_layers=2, intermediate_size=768, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=False,
            rms_norm_eps=1e-5, torch_dtype="bfloat16")
SHAPES = {**random_models.SHAPES, "tiny": TINY}
GOALS = {"datafree": (">=", 1.0), "calibrated": ("<=", 3.0)}


class _Peaks:
    """The peaks of anonymous memory and of mapped file pages, sampled every 20 ms in a thread;
    also the anonymous peak of each phase named by ``phase`` (None: outside any)."""

    def __init__(self):
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self.phase, self.phase_anon = None, {}
        self.done = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self.done.wait(0.02):
            now = _status(("RssAnon", "RssFile"))
            for k, v in now.items():
                self.peaks[k] = max(self.peaks[k], v)
            name = self.phase or "quantize"
            self.phase_anon[name] = max(self.phase_anon.get(name, 0), now.get("RssAnon", 0))

    def stop(self) -> dict:
        self.done.set()
        return {"peak_anon": self.peaks["RssAnon"], "peak_file": self.peaks["RssFile"],
                "phase_peak_anon": dict(self.phase_anon)}


def child(spec: dict) -> dict:
    if spec.get("kind") == "convert":
        return convert_child(spec)
    import torch

    from eoq.calibrate import statistics as calibration
    from eoq.calibrate import sensitivity
    from eoq.format import sources

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    src = sources.open_source(spec["folder"])
    vocab = src.config.vocab_size
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (spec["seq_len"],), generator=g) for _ in range(spec["sequences"])]
    fisher_seqs = seqs[:spec["fisher_sequences"]]
    peaks = _Peaks()
    t0 = time.perf_counter()
    if spec["mode"] == "whole":
        model = src.load_model()
        stats = calibration.collect_stats(model, seqs, progress=False)
        t1 = time.perf_counter()
        sens = sensitivity.fisher_pass(model, fisher_seqs, row_params=src.vocab)
    else:
        from eoq.calibrate import fisher_blockwise
        from eoq.calibrate.blockwise import BlockRunner

        stats = calibration.collect_stats_blockwise(BlockRunner(src), seqs, progress=False)
        t1 = time.perf_counter()
        sens = fisher_blockwise.fisher_pass_blockwise(BlockRunner(src), fisher_seqs, row_params=src.vocab)
    t2 = time.perf_counter()
    p = peaks.stop()
    return {"stats_s": t1 - t0, "fisher_s": t2 - t1, "peak_rss": _status(("VmHWM",))["VmHWM"],
            **p, "linears": len(stats), "fisher_tensors": len(sens.fisher)}


def convert_child(spec: dict) -> dict:
    """One eoq.quantize_model call, timed, with its phases (eoq.convert's own steps, wrapped here)."""
    import torch

    import eoq
    from eoq.convert import pipeline as convert
    from eoq.format import repo

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    phases: dict[str, float] = {}
    peaks = None

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            if peaks is not None:
                peaks.phase = name
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
                if peaks is not None:
                    peaks.phase = None
        return wrapper

    for name in ("calibrate", "allocate_rates", "write_shards"):  # looked up as globals by quantize_model
        if hasattr(convert, name):
            setattr(convert, name, timed(name, getattr(convert, name)))
    config = eoq.QuantConfig(**spec["config"])
    executor = spec.get("executor") or "local"
    if executor == "ray":  # a local cluster of --threads CPUs, started before the clock (as a cluster would be)
        import ray

        ray.init(num_cpus=spec.get("threads") or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    peaks = _Peaks()
    t0 = time.perf_counter()
    manifest = eoq.quantize_model(spec["folder"], spec["out"], config, progress=False, verbose=False,
                                  executor=executor)
    total = time.perf_counter() - t0
    p = peaks.stop()
    entries = manifest["tensors"].values()
    phases["quantize"] = total - sum(phases.values())
    return {"convert_s": total, "phases": phases, "peak_rss_child": _status(("VmHWM",))["VmHWM"], **p,
            "quantized_weights": sum(repo.entry_numel(e) for e in entries if repo.is_quantized(e)),
            "quantized_tensors": sum(1 for e in entries if repo.is_quantized(e)),
            "params": manifest["totals"]["all_params"], "stored_bytes": manifest["totals"]["stored_bytes"],
            "bits_per_param": manifest["totals"]["bits_per_weight_all"],
            "allocation": (manifest.get("allocation") or {}).get("mode"), "torch_threads": torch.get_num_threads()}


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


# ---- whole conversions against llama.cpp -----------------------------------------------------

def run_timed(cmd: list, log: pathlib.Path, env=None, timeout=None) -> dict:
    """Run cmd (output to log); wall seconds and the child's own peak RSS (os.wait4's ru_maxrss).
    timeout: seconds after which the child is killed (SIGKILL) and reported as timed out."""
    cmd = [str(c) for c in cmd]
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        timer = threading.Timer(timeout, p.kill) if timeout else None
        if timer:
            timer.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        if timer:
            timer.cancel()
    rc = os.waitstatus_to_exitcode(status)
    p.returncode = rc  # reaped here: Popen must not wait for it again
    r = {"wall_s": wall, "peak_rss": ru.ru_maxrss * 1024, "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "rc": rc}
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-25:]
        if timeout and rc == -9 and wall >= timeout:
            r["failed"] = f"timed out (> {timeout:g} s, killed)"
        elif rc < 0:
            r["failed"] = f"killed by signal {-rc}" + (" (out of memory?)" if rc == -9 else "")
        else:
            r["failed"] = f"exit status {rc}"
        r["log_tail"] = "\n".join(tail)
    return r


def warm(paths) -> None:
    """Read files once, so that a timed run starts with its input in the page cache."""
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def train_tokenizer(text: pathlib.Path, vocab_size: int, dest: pathlib.Path) -> None:
    """A SentencePiece-style BPE tokenizer (byte fallback, Llama 2's layout: <unk> <s> </s>, then
    <0x00>..<0xFF>) trained on text, padded with unused tokens to exactly vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    # LlamaHfVocab (the converter) wants a BPE model with byte fallback and a Sequence decoder
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train([str(text)], trainers.BpeTrainer(vocab_size=min(vocab_size, 32000), show_progress=False,
                                               special_tokens=["<unk>", "<s>", "</s>", *byte_tokens]))
    j = json.loads(tok.to_str())
    bytes_set = set(byte_tokens)
    j["added_tokens"] = [t for t in j["added_tokens"] if t["content"] not in bytes_set]  # plain tokens, as in Llama 2
    vocab = j["model"]["vocab"]
    if sorted(vocab.values()) != list(range(len(vocab))) or len(vocab) > vocab_size:
        raise RuntimeError(f"trained tokenizer: {len(vocab)} ids, not 0..n-1 within {vocab_size}")
    for i in range(len(vocab), vocab_size):
        vocab[f"<extra_{i}>"] = i
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(j)), bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(dest))


def with_tokenizer(folder: pathlib.Path, text) -> pathlib.Path:
    """<folder>-tok: links to folder's files and a tokenizer (made once, see train_tokenizer)."""
    dest = folder.with_name(folder.name + "-tok")
    if (dest / "tokenizer.json").is_file():
        return dest
    if not text or not pathlib.Path(text).is_file():
        raise SystemExit(f"{dest} needs a tokenizer, trained on --calib-text (none given or not found)")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in folder.iterdir():
        (tmp / p.name).symlink_to(p.resolve())
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    train_tokenizer(pathlib.Path(text), vocab_size, tmp)
    tmp.rename(dest)
    return dest


def f16_gguf(tok_folder: pathlib.Path, folder: pathlib.Path, cache) -> tuple[pathlib.Path, float | None]:
    """<folder>.f16.gguf, converted once (the seconds it took, None when it was there already)."""
    import llamacpp

    out = folder.with_name(folder.name + ".f16.gguf")
    if out.is_file():
        return out, None
    tmp = out.with_name(out.name + ".partial")
    t0 = time.perf_counter()
    llamacpp.convert_hf_to_gguf(tok_folder, tmp, outtype="f16", cache_dir=cache)
    tmp.rename(out)
    return out, time.perf_counter() - t0


def llama_tools(cache) -> dict:
    """The already built llama.cpp binaries (never builds: a missing one is an error)."""
    import llamacpp

    paths = llamacpp._tool_paths(cache)
    missing = [t for t in ("llama-quantize", "llama-imatrix") if not os.access(paths[t], os.X_OK)]
    if missing:
        raise SystemExit(f"{missing} not built under {llamacpp.build_dir(cache)}: run "
                         f"python bench/llamacpp.py --cache-dir {cache} build")
    return paths


def gguf_counts(path: pathlib.Path) -> dict:
    from gguf import GGUFReader

    n_all = n_q = nbytes = tensors_q = 0
    for t in GGUFReader(str(path)).tensors:
        n_all += int(t.n_elements)
        nbytes += int(t.n_bytes)
        if t.tensor_type.name not in ("F32", "F16", "BF16"):
            n_q += int(t.n_elements)
            tensors_q += 1
    return {"quantized_weights": n_q, "quantized_tensors": tensors_q, "params": n_all, "stored_bytes": nbytes,
            "bits_per_param": 8 * nbytes / max(n_all, 1)}


def safetensors_files(folder: pathlib.Path) -> list:
    return sorted(p.resolve() for p in folder.glob("*.safetensors"))


def run_eoq(what: str, folder: pathlib.Path, work: pathlib.Path, a) -> dict:
    out = work / f"eoq-{what}"
    partial = work / f".{out.name}.eoq-partial"  # eoq.convert's partial folder: a leftover would be resumed
    for d in (out, partial):
        shutil.rmtree(d, ignore_errors=True)
    config = ({"calibration": None, "awq": False} if what == "datafree" else
              {"calibration": str(a.calib_text), "calib_sequences": a.sequences, "calib_seq_len": a.seq_len,
               "sensitivity_sequences": a.fisher_sequences})
    spec = {"kind": "convert", "folder": str(folder), "out": str(out), "config": config, "threads": a.threads,
            "executor": a.executor}
    warm(safetensors_files(folder))
    log = work / f"eoq-{what}.log"
    r = run_timed([sys.executable, os.path.abspath(__file__), CHILD_FLAG, json.dumps(spec)], log, timeout=a.timeout)
    if "failed" not in r:
        r.update(json.loads(log.read_text().strip().splitlines()[-1]))
    for d in (out, partial):
        shutil.rmtree(d, ignore_errors=True)
    return {"config": config, "executor": a.executor, **r}


def run_llama(what: str, f16: pathlib.Path, tools: dict, work: pathlib.Path, a) -> dict:
    """llama-quantize Q4_K_M (datafree), or llama-imatrix then llama-quantize --imatrix (calibrated)."""
    threads = [] if a.threads is None else [str(a.threads)]
    out = work / f"llama-{what}-{QTYPE}.gguf"
    steps = {}
    warm([f16])
    qcmd = [tools["llama-quantize"]]
    if what == "calibrated":
        imat = work / "llama-imatrix.gguf"
        icmd = [tools["llama-imatrix"], "-m", f16, "-f", a.calib_text, "-o", imat, "-c", str(a.seq_len),
                "--chunks", str(a.sequences)] + (["-t", *threads] if threads else [])
        steps["imatrix"] = run_timed(icmd, work / "llama-imatrix.log")
        if "failed" in steps["imatrix"]:
            return {"steps": steps, "failed": "llama-imatrix " + steps["imatrix"]["failed"]}
        log_text = (work / "llama-imatrix.log").read_text(errors="replace")
        steps["imatrix"]["log_chunks_line"] = next((ln.strip() for ln in log_text.splitlines()
                                                    if "computing over" in ln), None)  # "4 chunks, n_ctx=128"
        qcmd += ["--imatrix", imat]
    qcmd += [f16, out, QTYPE, *threads]
    steps["quantize"] = run_timed(qcmd, work / f"llama-quantize-{what}.log")
    if "failed" in steps["quantize"]:
        return {"steps": steps, "failed": "llama-quantize " + steps["quantize"]["failed"]}
    r = {"steps": steps, "wall_s": sum(s["wall_s"] for s in steps.values()),
         "peak_rss": max(s["peak_rss"] for s in steps.values()), **gguf_counts(out)}
    out.unlink(missing_ok=True)
    (work / "llama-imatrix.gguf").unlink(missing_ok=True)
    return r


def ratio(what: str, e: dict, b: dict):
    if "failed" in e or "failed" in b:
        return None
    if what == "datafree":  # weights per second, eoq's over llama-quantize's
        return (e["quantized_weights"] / e["convert_s"]) / (b["quantized_weights"] / b["wall_s"])
    return e["convert_s"] / b["wall_s"]


def conversion_rows(key: str, folder: pathlib.Path, whats: list, a) -> list:
    tok = with_tokenizer(folder, a.calib_text)
    tools = llama_tools(a.cache)
    f16, f16_s = f16_gguf(tok, folder, a.cache)
    work = pathlib.Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for what in whats:
        if what == "calibrated" and not (a.calib_text and pathlib.Path(a.calib_text).is_file()):
            raise SystemExit("--what calibrated needs --calib-text")
        pairs = []
        for rep in range(a.repeat):
            b = run_llama(what, f16, tools, work, a)  # the baseline, then eoq right after it
            e = run_eoq(what, tok, work, a)
            pairs.append({"baseline": b, "eoq": e, "ratio": ratio(what, e, b)})
            print(json.dumps({"model": key, "what": what, "repeat": rep, "ratio": pairs[-1]["ratio"],
                              "eoq_s": e.get("convert_s"), "baseline_s": b.get("wall_s"),
                              "failed": e.get("failed") or b.get("failed")}), flush=True)
        good = [p["ratio"] for p in pairs if p["ratio"] is not None]
        rows.append({"model": key, "what": what, "f16_gguf": str(f16), "f16_convert_s": f16_s,
                     "threads": a.threads, "pairs": pairs, "ratio": statistics.median(good) if good else None})
    return rows


def _median(pairs, side, key):
    vals = [p[side][key] for p in pairs if p["ratio"] is not None]
    return statistics.median(vals) if vals else None


def print_conversion_tables(rows: list, a) -> None:
    gib = 2 ** 30
    print(f"\n# whole conversions against llama.cpp ({QTYPE}), same weights, timed one right after the other; "
          f"threads {a.threads or 'default'}; calibrated: {a.sequences} x {a.seq_len} tokens, Fisher on "
          f"{a.fisher_sequences}; eoq executor {a.executor}; median of {a.repeat} pair(s)\n")
    print("| model | what | eoq s | eoq peak RSS GiB | baseline | baseline s | baseline peak RSS GiB | ratio | goal |")
    print("|---|---|---:|---:|---|---:|---:|---:|---|")
    for r in rows:
        p = r["pairs"]
        base = f"llama-quantize {QTYPE}" if r["what"] == "datafree" else f"llama-imatrix + llama-quantize {QTYPE}"
        if r["ratio"] is None:  # what there is: the first pair's
            e, b = p[0]["eoq"], p[0]["baseline"]
            es = f"failed: {e['failed']} after {e['wall_s']:.0f} s" if e.get("failed") else f"{e['convert_s']:.1f}"
            bs = f"failed: {b['failed']}" if b.get("failed") else f"{b['wall_s']:.1f}"
            brss = f"{b['peak_rss'] / gib:.2f}" if "peak_rss" in b else ""
            print(f"| {r['model']} | {r['what']} | {es} | {e.get('peak_rss', 0) / gib:.2f} | {base} | {bs} | {brss} "
                  f"| — | {' '.join(map(str, GOALS[r['what']]))} |")
            continue
        cmp_, goal = GOALS[r["what"]]
        label = "weights/s eoq ÷ llama" if r["what"] == "datafree" else "time eoq ÷ llama"
        ok = r["ratio"] >= goal if cmp_ == ">=" else r["ratio"] <= goal
        print(f"| {r['model']} | {r['what']} | {_median(p, 'eoq', 'convert_s'):.1f} | "
              f"{_median(p, 'eoq', 'peak_rss') / gib:.2f} | {base} | {_median(p, 'baseline', 'wall_s'):.1f} | "
              f"{_median(p, 'baseline', 'peak_rss') / gib:.2f} | {r['ratio']:.2f} ({label}) | "
              f"{cmp_} {goal:g} {'met' if ok else 'NOT met'} |")
    print("\n| model | what | eoq phases s (median; peak anonymous memory) | eoq bits/param | llama bits/param | eoq weights/s | "
          "llama weights/s | llama steps s |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        p = [x for x in r["pairs"] if x["ratio"] is not None]
        if not p:
            continue
        names = list(p[0]["eoq"]["phases"])
        anon = p[0]["eoq"].get("phase_peak_anon", {})  # (the first pair's)
        ph = ", ".join(f"{n} {statistics.median(x['eoq']['phases'][n] for x in p):.1f}"
                       + (f" ({anon[n] / gib:.2f} GiB anon)" if n in anon else "") for n in names)
        steps = ", ".join(f"{n} {statistics.median(x['baseline']['steps'][n]['wall_s'] for x in p):.1f}"
                          for n in p[0]["baseline"]["steps"])
        ew = statistics.median(x["eoq"]["quantized_weights"] / x["eoq"]["convert_s"] for x in p)
        lw = statistics.median(x["baseline"]["quantized_weights"] / x["baseline"]["wall_s"] for x in p)
        print(f"| {r['model']} | {r['what']} | {ph} | {p[0]['eoq']['bits_per_param']:.3f} | "
              f"{p[0]['baseline']['bits_per_param']:.3f} | {ew / 1e6:.1f} M | {lw / 1e6:.1f} M | {steps} |")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == CHILD_FLAG:
        print(json.dumps(child(json.loads(argv[1]))), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama1b")
    ap.add_argument("--what", default="calibration",
                    help="comma-separated: calibration (the passes alone, --modes), datafree, calibrated")
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--fisher-sequences", type=int, default=2)
    ap.add_argument("--modes", default="whole,blocks")
    ap.add_argument("--calib-text", default=CALIB_TEXT if os.path.isfile(CALIB_TEXT) else None)
    ap.add_argument("--threads", type=int, help="torch threads in the eoq children; -t / nthreads for llama.cpp")
    ap.add_argument("--repeat", type=int, default=1, help="baseline/eoq pairs per conversion (median ratio)")
    ap.add_argument("--cache", help="cache folder (default: $EOQ_CACHE, else ~/.cache/eoq)")
    ap.add_argument("--workdir", help="outputs, deleted after each run (default <cache>/bench_load/scale-work)")
    ap.add_argument("--timeout", type=float, help="seconds after which an eoq conversion child is killed")
    ap.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="where eoq's per-tensor work runs: this process, or a local Ray cluster of --threads CPUs "
                         "(one torch thread per task; peak RSS is then the driver's alone)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from eoq.testing import models as testmodels

    a.cache = str(testmodels.resolve_cache_dir(a.cache))
    cache = pathlib.Path(a.cache) / "bench_load"
    a.workdir = a.workdir or str(cache / "scale-work")
    whats = a.what.split(",")
    unknown = [w for w in whats if w not in ("calibration", "datafree", "calibrated")]
    if unknown:
        ap.error(f"--what: unknown {unknown}")
    rows, conv_rows = [], []
    for key in a.models.split(","):
        if key not in SHAPES:
            ap.error(f"--models: unknown {key!r} ({', '.join(SHAPES)})")
        folder = random_models.make_llama(cache / f"{key}-bf16", SHAPES[key])
        shard = max(p.stat().st_size for p in folder.glob("*.safetensors"))
        if "calibration" in whats:
            for mode in a.modes.split(","):
                spec = {"folder": str(folder), "mode": mode, "sequences": a.sequences, "seq_len": a.seq_len,
                        "fisher_sequences": a.fisher_sequences, "threads": a.threads}
                r = {"model": key, "what": "calibration", "mode": mode, "largest_shard": shard, **run_child(spec)}
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "stderr"}), flush=True)
        conv = [w for w in whats if w != "calibration"]
        if conv:
            conv_rows += conversion_rows(key, folder, conv, a)
    if rows:
        print_calibration_table(rows, a)
    if conv_rows:
        print_conversion_tables(conv_rows, a)
    if a.json:
        write_json(a.json, {"args": vars(a), "rows": rows + conv_rows}, indent=1)
    return 0


def print_calibration_table(rows: list, a) -> None:
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


if __name__ == "__main__":
    raise SystemExit(main())
