"""``quantize_model``: a Hugging Face model in, a self-describing quantized folder out.

The work happens in ``.<out>.eoq-partial`` next to the output:
  state.json                  the config and source the partial work belongs to
  calib_sampling.pt           sampling under way: the tokens so far, the generator and the
                              key/value cache, every two minutes (eoq.calibrate.sampling_checkpoint)
  calib_samples.safetensors   the text sampled for calibration "self" (a folder's model)
  calib_stats.safetensors     activation statistics, once their pass has run
  fisher/                     the Fisher pass under way: each block's stored inputs and,
                              after each block, the sums so far (eoq.calibrate.fisher_checkpoint), so
                              an interrupted pass goes on from the block it was in
  sensitivity.safetensors     the Fisher pass's sums, once it has run (calib_info.json then)
  parts/<hash>.safetensors    one file per finished parameter: its stored tensors and, in
                              the metadata, its manifest entry (written to a temporary name
                              and renamed, so a file that exists is complete)
  repo/                       the output being assembled
When every parameter has its part file, the shards, manifest, config, tokenizer, loader and
card are written into repo/, which is renamed to the output. A run that dies at any point
leaves the partial folder; running the same conversion again resumes from it, redoing
nothing that was finished, and gives the same bytes as an uninterrupted run (every step is
deterministic: per-tensor seeds derive from the config seed and the tensor's name).

Order of work: (1) plan every parameter from the headers alone and check the budget
(``bits`` per parameter of the whole model, or ``target_size`` bytes) against what the
passthrough tensors take, before anything else; (2) calibration: activation statistics and
the sensitivity pass (eoq.calibrate.sensitivity), both kept in the partial folder; (3) the tensors
whose size is fixed (passthrough, protect rules) are written, so their real bytes come off
the budget; (4) the allocation (eoq.convert.allocate) spreads what is left over the quantized
tensors, kept in allocation.json; (5) those tensors are quantized at their rates, in waves
(CARRY_WAVE): each tensor of a wave gets its rate plus what the earlier waves left unspent,
spread over the wave's weights, so the tensors of one wave do not depend on each other.

Where the work runs: the per-tensor jobs (the allocation's curves, the quantization) are
built here and run on an executor (eoq.convert.executor): in this process, or as Ray tasks on a
cluster, which read a folder's tensors themselves from storage every node sees. This process
alone writes files, each under its tensor's name, so neither the executor nor the order
results arrive in changes a byte; calibration always runs here.

Memory: a folder source is read tensor by tensor (safetensors mmap) and each parameter is
quantized and written before the next is read, so a data-free conversion holds one
parameter (in float32) and its codes at a time, plus one output shard while assembling
(with Ray: a bounded number of jobs in flight, eoq.convert.executor).
Calibration runs a folder's model one decoder block at a time, read from its files
(eoq.calibrate.blockwise): the activation statistics and the sensitivity (Fisher) pass, each equal to
its whole-model version; a model given in memory, or one without a list of repeated
blocks, runs whole. The covariances for error feedback are still all kept until the
conversion ends; quantizing each block as its statistics are done is the rest of the
real-size work (issue 17).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import resource
import shutil
import time
import zlib
from typing import Optional, Union

import torch

from . import allocate
from ..format import repo
from .executor import LocalExecutor, make_executor
from .quant_config import QuantConfig
from ..calibrate.sensitivity import Sensitivity
from ..methods.quantize import quantize_tensor
from ..format.sources import Source, open_source, resolve

FAULT_ENV = "EOQ_FAULT_AFTER_TENSORS"  # tests: die (os._exit) after this many new part files
FAULT_SENSITIVITY_ENV = "EOQ_FAULT_IN_SENSITIVITY"  # tests: die once the Fisher pass ran, before it is kept


def tensor_seed(seed: int, name: str) -> int:
    """A per-parameter rotation seed: distinct signs per tensor, reproducible from the config."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) & 0x7FFFFFFFFFFFFFFF


# ---- what happens to each parameter ---------------------------------------------------------


def plan(source: Source, config: QuantConfig, name: str, t: torch.Tensor) -> dict:
    """{"action": quantize|passthrough|tied, "kind", "reason"/"rule", "method", "bits", ...}."""
    if name in source.tied and source.tied[name] in source.names:
        return {"action": "tied", "kind": "tied", "tied_to": source.tied[name]}
    role = source.roles.get(name, "other")
    if not t.is_floating_point():
        return {"action": "passthrough", "kind": "passthrough", "reason": "integer"}
    if t.dim() != 2:
        return {"action": "passthrough", "kind": "passthrough", "reason": "non-2d"}
    rule = config.rule_for(name)
    if rule is not None and rule.action == "passthrough":
        return {"action": "passthrough", "kind": "protected", "rule": rule.label}
    heads = {k for k, v in source.tied.items() if v == name}  # parameters tied to this one
    wanted = {
        "linear": True, "conv1d": True,
        "lm_head": config.quantize_lm_head,
        "embedding": config.quantize_embeddings or (config.quantize_lm_head and
                                                    any(source.roles.get(h) == "lm_head" for h in heads)),
    }.get(role, False)
    if rule is not None:  # a quantize rule: its own setting, whatever the defaults say
        return {"action": "quantize", "kind": "protected", "rule": rule.label, "role": role,
                "method": rule.method or config.method, "bits": config.bits if rule.bits is None else rule.bits,
                "block_size": rule.block_size if rule.block_size is not None else config.block_size,
                "options": {**config.options, **rule.options} if rule.method in (None, config.method)
                else dict(rule.options)}
    if not wanted:
        reason = role if role in ("embedding", "lm_head") else "not-linear"
        return {"action": "passthrough", "kind": "passthrough", "reason": reason}
    if t.numel() < config.min_numel:
        return {"action": "passthrough", "kind": "passthrough", "reason": "small"}
    return {"action": "quantize", "kind": "quantized", "role": role, "method": config.method, "bits": config.bits,
            "block_size": config.block_size, "options": dict(config.options)}


def stored_dtype(source: Source, config: QuantConfig) -> Optional[torch.dtype]:
    """The dtype floating tensors are stored / dequantized in: the config's, else the source's
    (a GGUF's bfloat16), else None (as they are)."""
    return getattr(torch, config.dtype) if config.dtype else source.out_dtype


def importance_for(source: Source, stats: Optional[dict], name: str) -> Optional[torch.Tensor]:
    """E[a^2] of the inputs of the module owning `name` (for a tied embedding: of the head)."""
    s = stats_for(source, stats, name)
    return None if s is None else s.mean_sq


def stats_for(source: Source, stats: Optional[dict], name: str):
    """The ActStats of the module owning `name` (for a tied embedding: of the head), or None."""
    if not stats:
        return None
    owners = [name] + [h for h, target in source.tied.items() if target == name]
    for owner in owners:
        module = owner.removesuffix(".weight")
        if module in stats:
            return stats[module]
    return None


def feedback_options(source: Source, config: QuantConfig, stats: Optional[dict], name: str, cols: int) -> dict:
    """quantize_tensor's error-feedback arguments for `name`: the covariance of its inputs
    when the config asks for feedback and the calibration measured it, else none."""
    s = stats_for(source, stats, name) if config.feedback else None
    if s is None or s.sum_outer is None or s.sum_outer.shape[0] != cols:
        return {}
    return {"hessian": s.hessian, "damp": config.feedback_damp, "hessian_tokens": s.count}


@dataclasses.dataclass
class TensorJob:
    """Everything a worker needs to store one parameter, built on the driver: picklable (a Ray
    task's argument), with the tensor as a Source.ref (a folder's tensors are read by the worker)."""
    name: str
    tensor: object                  # Source.ref: the tensor, or a sources.TensorRef
    plan: dict                      # plan() with the bits to meet (the allocated rate)
    out_dtype: Optional[torch.dtype]
    seed: int
    codec: str
    awq: bool = False
    importance: Optional[torch.Tensor] = None
    row_weights: Optional[torch.Tensor] = None
    row_tokens: int = 0
    feedback: dict = dataclasses.field(default_factory=dict)


def tensor_job(source: Source, config: QuantConfig, name: str, p: dict, stats: Optional[dict],
               sens: Optional[Sensitivity] = None) -> TensorJob:
    """The job of a passthrough or quantized parameter (not a tied one: that has no data)."""
    job = TensorJob(name, source.ref(name), p, stored_dtype(source, config), tensor_seed(config.seed, name),
                    config.codec)
    if p["action"] == "quantize":
        spec = source.spec(name)
        cols = spec.shape[0] if p["role"] == "conv1d" else spec.shape[1]
        job.importance = importance_for(source, stats, name)
        job.awq = bool(config.awq and job.importance is not None)
        job.row_weights, job.row_tokens = row_importance_for(source, sens, name)
        job.feedback = feedback_options(source, config, stats, name, cols)
    return job


def run_tensor_job(job: TensorJob) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest entry, stored tensors) of one parameter: a pure function of the job, run in this
    process or in a worker (eoq.convert.executor)."""
    t, p = resolve(job.tensor), job.plan
    out_dtype = job.out_dtype if job.out_dtype is not None and t.is_floating_point() else t.dtype
    if p["action"] == "passthrough":
        t = t.to(out_dtype).contiguous()
        return repo.plain_entry(t, p["kind"], p.get("reason"), p.get("rule")), {"tensor": t}
    transposed = p["role"] == "conv1d"
    w = t.t() if transposed else t
    qt = quantize_tensor(w, p["method"], p["bits"], p["block_size"], importance=job.importance, seed=job.seed,
                         awq=job.awq, name=job.name, row_importance=job.row_weights, row_tokens=job.row_tokens,
                         **job.feedback, **p["options"])
    qt.dtype = out_dtype  # what the weight is dequantized to
    qt.bits = p["bits"]     # as asked (AWQ takes its scales' bits out of ecsq's rate target)
    return repo.quantized_entry(qt, job.codec, p["kind"], transposed, t.shape, p.get("rule"))


def tied_entry(source: Source, config: QuantConfig, name: str, p: dict) -> dict:
    """A tied parameter's entry: stored under the parameter it is tied to, so from the header alone."""
    spec = source.spec(name)
    want = stored_dtype(source, config)
    dt = want if want is not None and spec.is_floating_point() else spec.dtype
    return {"kind": "tied", "tied_to": p["tied_to"], "shape": list(spec.shape), "dtype": repo.dtype_name(dt),
            "stored_bytes": 0}


def row_importance_for(source: Source, sens: Optional[Sensitivity], name: str) -> tuple[Optional[torch.Tensor], int]:
    """(row weights, tokens) of a vocabulary tensor (token embedding / output head), else (None, 0)."""
    if sens is None or name not in source.vocab:
        return None, 0
    heads_input = source.vocab[name] == "input" or any(source.vocab.get(h) == "input"
                                                       for h, t in source.tied.items() if t == name)
    return sens.row_weights(name, input_embedding=heads_input)


# The allocated tensors are quantized in waves, in their order. ecsq meets a rate from below,
# so each tensor leaves a little of its rate unspent; that is passed on so that the whole model
# lands on its budget. Passing it to the very next tensor would chain every tensor to the one
# before; a wave's tensors depend only on the waves before it, so a wave runs in parallel
# (eoq.convert.executor). Waves hold CARRY_WAVE tensors (32: enough work for a cluster), except the
# last ones, which halve down to a single tensor (..., 32, 16, 8, 4, 2, 1): the last wave's
# shortfall has nowhere to go, so it must be one tensor's, as when every tensor passed its
# shortfall to the next. Equal waves of 32 missed the budget by 0.86 % on a 16-tensor model
# (one wave: nothing carried); the taper costs log2(32) = 5 small waves at the end.
CARRY_WAVE = 32


def waves(names: list[str]) -> list[list[str]]:
    """`names` in consecutive waves: CARRY_WAVE each, then halving to 1 at the end (the first
    wave takes what is left over)."""
    sizes, left, size = [], len(names), 1
    while left > 0:  # from the end: 1, 2, 4, ..., CARRY_WAVE, CARRY_WAVE, ...
        sizes.append(min(size, left))
        left -= sizes[-1]
        size = min(2 * size, CARRY_WAVE)
    out, i = [], 0
    for size in reversed(sizes):
        out.append(names[i:i + size])
        i += size
    return out


def wave_bits(wave: list[str], before: list[str], rates: dict, entries: dict, specs: dict, hi: float) -> dict:
    """The bits each tensor of `wave` is quantized at: its allocated rate plus, spread evenly over
    the wave's weights, what the tensors of the earlier waves (`before`, all finished) left
    unspent; at most `hi`. A function of finished entries alone, so a resumed run, and any
    order of execution, gives the same bits."""
    carry = sum(rates[n] * repo.entry_numel(entries[n]) - 8 * entries[n]["stored_bytes"] for n in before)
    weights = sum(specs[n].numel() for n in wave)
    return {n: min(rates[n] + carry / max(weights, 1), hi) for n in wave}


def weights_bar(source: Source, names: list[str], desc: str, progress: bool):
    """A tqdm bar counting the weights of `names` (weights/s and an ETA, whatever the tensors' sizes)."""
    from tqdm.auto import tqdm

    return tqdm(total=sum(source.spec(n).numel() for n in names), desc=desc, unit="w", unit_scale=True,
                disable=not progress or not names)


def budget_bits(source: Source, config: QuantConfig) -> float:
    """The whole model's budget in bits: target_size bytes, else bits x every parameter (tied once)."""
    if config.target_size is not None:
        return 8.0 * config.target_size
    return float(config.bits) * sum(source.spec(n).numel() for n in source.names
                                    if n not in source.tied or source.tied[n] not in source.names)


def check_budget(source: Source, config: QuantConfig, plans: dict, specs: dict) -> None:
    """Before any work: the budget must cover the passthrough tensors (exactly known from the
    headers), the protect rules' tensors (at their bits) and every allocated tensor at the
    lowest rate allowed (allocation_range[0])."""
    if not config.whole_model_budget:
        return
    dtype = stored_dtype(source, config)
    fixed = protected = weights = 0
    for name, p in plans.items():
        t = specs[name]
        if p["action"] == "passthrough":
            fixed += t.numel() * (torch.empty(0, dtype=dtype if dtype is not None and t.is_floating_point()
                                              else t.dtype).element_size())
        elif p["action"] == "quantize" and p["kind"] == "protected":
            protected += float(p["bits"]) * t.numel() / 8
        elif p["action"] == "quantize":
            weights += t.numel()
    budget = budget_bits(source, config)
    what = f"{config.target_size} bytes" if config.target_size is not None else f"{config.bits} bits per parameter"
    if 8 * fixed > budget:
        raise ValueError(f"{source.name}: the budget ({what}: {budget / 8 / 1e6:.3f} MB) is below what the "
                         f"passthrough tensors alone take ({fixed / 1e6:.3f} MB); raise the budget or quantize more "
                         f"tensors")
    floor = 8 * (fixed + protected) + weights * config.allocation_range[0]
    if floor > budget:
        raise ValueError(f"{source.name}: the budget ({what}: {budget / 8 / 1e6:.3f} MB) is below the smallest "
                         f"size the settings allow: passthrough {fixed / 1e6:.3f} MB + protected ~{protected / 1e6:.3f} "
                         f"MB + {weights:,} quantized weights at {config.allocation_range[0]} bits/weight = "
                         f"{floor / 8 / 1e6:.3f} MB; raise the budget or lower allocation_range[0]")


def cached_curve(folder: pathlib.Path, args: tuple) -> tuple[list[float], list[float]]:
    """allocate.rd_curve(*args), kept in `folder` under a hash of every input (the weight, its
    statistics, the settings, eoq's version): a budget sweep over one model measures each
    curve once."""
    h = hashlib.sha256(f"{_version()} {allocate.GRID} {allocate.FEEDBACK_POINTS} {allocate.CURVE_SAMPLE} "
                       f"{args[2:4]} {args[4:6]} {args[7]} "
                       f"{args[9:11]}".encode())
    for t in (args[0], args[1], args[6], args[8]):
        h.update(b"-" if t is None else memoryview(t.detach().float().contiguous().numpy()).cast("B"))
    path = pathlib.Path(folder) / f"curve-{h.hexdigest()[:32]}.json"
    if path.is_file():
        return tuple(json.loads(path.read_text()))
    curve = allocate.rd_curve(*args)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(curve))
    return curve


@dataclasses.dataclass
class CurveJob:
    """One tensor's rate-distortion curve (allocate.rd_curve), built on the driver like a
    TensorJob; ``cache``: the curve_cache folder (shared storage for a Ray cluster), or None."""
    name: str
    tensor: object                  # Source.ref
    transposed: bool
    importance: Optional[torch.Tensor]
    block_size: Optional[int]
    seed: int
    lo: float
    hi: float
    row_weights: Optional[torch.Tensor]
    row_tokens: int
    feedback: dict
    cache: Optional[str] = None


def curve_job(source: Source, config: QuantConfig, plans: dict, name: str, stats: Optional[dict],
              sens: Optional[Sensitivity], curve_cache: Optional[pathlib.Path]) -> CurveJob:
    spec = source.spec(name)
    transposed = plans[name]["role"] == "conv1d"
    rows_w, row_tokens = row_importance_for(source, sens, name)
    # With feedback the curves stay plain rounding's: feedback's own curves, measured on
    # the covariance it was fitted to, overstate its gain (allocate.FEEDBACK_CURVES)
    fb = feedback_options(source, config, stats, name, spec.shape[0] if transposed else spec.shape[1]) \
        if allocate.FEEDBACK_CURVES else {}
    lo, hi = config.allocation_range
    return CurveJob(name, source.ref(name), transposed, importance_for(source, stats, name),
                    plans[name]["block_size"], tensor_seed(config.seed, name), lo, hi, rows_w, row_tokens, fb,
                    str(pathlib.Path(curve_cache).absolute()) if curve_cache else None)


def run_curve_job(job: CurveJob) -> tuple[list[float], list[float]]:
    """(rates, distortions) of one tensor, from the cache folder when it holds them."""
    t = resolve(job.tensor)
    w = t.t() if job.transposed else t
    fb = job.feedback
    args = (w, job.importance, job.block_size, job.seed, job.lo, job.hi, job.row_weights, job.row_tokens,
            fb.get("hessian"), fb.get("damp", 0.0), fb.get("hessian_tokens"), job.name)
    return cached_curve(pathlib.Path(job.cache), args) if job.cache else allocate.rd_curve(*args)


def allocate_rates(source: Source, config: QuantConfig, partial: "Partial", plans: dict, entries: dict,
                   stats: Optional[dict], sens: Optional[Sensitivity], progress: bool,
                   curve_cache: Optional[pathlib.Path] = None, executor=None) -> dict:
    """Per-tensor ecsq rates for the tensors the default setting quantizes, so that the whole
    folder's stored tensors meet the budget. The fixed part (passthrough tensors, protect rules,
    the marker) is already in ``entries`` with its real size. Computed once and kept in the
    partial folder, so that a resumed run uses the same rates. The curves are measured on
    ``executor`` (eoq.convert.executor; default: in this process)."""
    executor = executor or LocalExecutor()
    path = partial.root / "allocation.json"
    if path.is_file():
        return json.loads(path.read_text())
    lo, hi = config.allocation_range
    names = [n for n in source.names if plans[n]["action"] == "quantize" and plans[n]["kind"] == "quantized"]
    fixed = sum(e["stored_bytes"] for n, e in entries.items() if n not in names)
    fixed += len(repo.MARKER_TEXT.encode()) if names or any(repo.is_quantized(e) for e in entries.values()) else 0
    budget = budget_bits(source, config)
    sizes = {n: source.spec(n).numel() for n in names}  # (each header read once)
    weights = sum(sizes.values())
    left = budget - 8 * fixed
    if weights and left < lo * weights * (1 - 1e-9):
        raise ValueError(f"{source.name}: after the fixed tensors ({fixed / 1e6:.3f} MB: passthrough, protect rules) "
                         f"the budget leaves {left / 8 / 1e6:.3f} MB for {weights:,} weights, below "
                         f"allocation_range[0] = {lo} bits/weight; raise the budget")
    mode, note = config.allocation, None
    if mode == "sensitivity" and (sens is None or not sens.tokens):
        mode, note = "proxy", ("no calibration (data-free)" if config.data_free else
                               "the model has no output distribution to differentiate, or no calibration ran")
        import warnings
        warnings.warn(f"{source.name}: sensitivity allocation needs the Fisher pass, which did not run ({note}); "
                      f"allocating by each tensor's own relative error instead", stacklevel=3)
    result = {"mode": mode, "requested": config.allocation, "budget_bits": budget, "fixed_bytes": fixed,
              "weights": weights, "tensors": len(names), "range": [lo, hi]}
    if note:
        result["note"] = note
    if mode == "uniform" or not names:
        rate = min(left / max(weights, 1), hi)
        rates = {n: rate for n in names}
    else:
        with_feedback = [0]  # tensors whose curve is error feedback's

        def jobs():
            for n in names:
                job = curve_job(source, config, plans, n, stats, sens, curve_cache)
                with_feedback[0] += bool(job.feedback)
                yield job

        measured = {}
        with weights_bar(source, names, "allocate", progress) as bar:
            for i, curve in executor.map(run_curve_job, jobs()):
                measured[names[i]] = curve
                bar.update(sizes[names[i]])
        curves = {}
        for name in names:  # in the tensors' order, whatever order the curves came in
            rates_, dists = measured[name]
            c = sens.coefficient(name) if mode == "sensitivity" else 1.0
            curves[name] = (sizes[name], rates_, [allocate.round_sig(d * c) for d in dists])
        rates = allocate.solve(curves, left)
        result["feedback_curves"] = with_feedback[0]
        if mode == "sensitivity":  # what the linear model predicts for this allocation
            result["predicted_kl"] = allocate.round_sig(sum(allocate.hull_value(curves[n][1], curves[n][2], r)
                                                            for n, r in rates.items()))
    result.update({"min_bits": min(rates.values(), default=None), "max_bits": max(rates.values(), default=None),
                   "rates": dict(sorted(rates.items()))})
    atomic_write(path, json.dumps(result, sort_keys=True))
    return result


# ---- the partial folder ---------------------------------------------------------------------


class Partial:
    def __init__(self, out: pathlib.Path, state: dict):
        self.root = out.parent / f".{out.name}.eoq-partial"
        self.parts = self.root / "parts"
        self.state = state
        state_file = self.root / "state.json"
        if state_file.is_file():
            old = json.loads(state_file.read_text())
            if old != state:
                raise ValueError(f"{self.root} holds an interrupted conversion with a different config or source; "
                                 f"run it with the same settings to resume, or delete that folder")
        else:
            if self.root.exists():
                shutil.rmtree(self.root)
            self.parts.mkdir(parents=True)
            atomic_write(state_file, json.dumps(state, indent=2, sort_keys=True))

    def part_path(self, name: str) -> pathlib.Path:
        return self.parts / (hashlib.sha1(name.encode()).hexdigest()[:20] + ".safetensors")

    def load(self, name: str) -> Optional[dict]:
        path = self.part_path(name)
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        if meta.get("name") != name:
            raise ValueError(f"{path}: part file of {meta.get('name')!r}, expected {name!r}")
        return json.loads(meta["entry"])

    def save(self, name: str, entry: dict, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self.part_path(name)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"name": name, "entry": json.dumps(entry, sort_keys=True)})
        os.replace(tmp, path)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.part_path(name)))


def atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- calibration ----------------------------------------------------------------------------


def has_covariance(stats: Optional[dict]) -> bool:
    return bool(stats) and all(s.sum_outer is not None for s in stats.values())


def calibrate(source: Source, config: QuantConfig, root: pathlib.Path, progress: bool, stats=None,
              sens: Optional[Sensitivity] = None) -> tuple[Optional[dict], Optional[dict], Optional[Sensitivity]]:
    """Activation statistics of every Linear and the sensitivity pass (Fisher sums, token
    counts), whichever is not given; both cached in the folder ``root`` (the partial folder).
    Returns (stats, a summary, sensitivity)."""
    from ..calibrate import statistics as cal

    path, info_path = root / "calib_stats.safetensors", root / "calib_info.json"
    sens_path, samples_path = root / "sensitivity.safetensors", root / "calib_samples.safetensors"
    # the Fisher pass for a sensitivity allocation; token counts for the vocabulary rows either way
    want_sens = sens is None and (config.allocation == "sensitivity" or bool(source.vocab))
    covariance = bool(config.feedback)
    if info_path.is_file() and (stats is not None or path.is_file()) and (not want_sens or sens_path.is_file()):
        info = json.loads(info_path.read_text())
        saved = stats if stats is not None else cal.load_stats(path) if path.is_file() else None
        if not covariance or stats is not None or has_covariance(saved):  # else measure again, with it
            return saved, info, (sens if sens is not None else Sensitivity.load(sens_path) if sens_path.is_file()
                                 else None)
    if stats is None and path.is_file():  # an interrupted run finished the statistics pass
        saved = cal.load_stats(path)
        stats = saved if not covariance or has_covariance(saved) else None
    if source.tokenizer is None:
        raise ValueError(f"{source.name}: calibration needs a tokenizer and none was found; pass tokenizer=, or "
                         f"calibration=None (data-free), or stats= and sensitivity= measured elsewhere")
    if config.calibration != "self":
        text = cal.load_text(config.calibration)
        seqs = cal.token_sequences(text, source.tokenizer, config.calib_sequences, config.calib_seq_len)
        model = None
        # One empty model for both passes (eoq.calibrate.blockwise: each module read when it runs)
        fisher = want_sens and config.allocation == "sensitivity"
        runner = block_runner(source, sum(map(len, seqs)), max(map(len, seqs)),
                              sum(map(len, seqs[:config.sensitivity_sequences])) if fisher else 0,
                              covariance and stats is None, scratch=root) if stats is None or fisher else None
        if stats is None:
            stats, model = activation_stats(source, seqs, covariance, progress, runner)
            cal.save_stats(stats, path, source=config.calibration)  # kept before the Fisher pass
        shape = (len(seqs), config.calib_seq_len)
        if want_sens:
            sens = sensitivity_of(source, config, model, seqs, progress, runner, root / "fisher")
        return _finish_calibration(source, config, stats, sens, want_sens, text, shape, path, info_path, sens_path)
    # A folder's model samples block by block (eoq.calibrate.sampling_blockwise: the same tokens as
    # generate() on the loaded model, one block in memory); a model without blocks, whole.
    n, length = config.calib_sequences, config.calib_self_len
    fisher = want_sens and config.allocation == "sensitivity"
    runner = block_runner(source, n * length, length + 1, min(n, config.sensitivity_sequences) * (length + 1)
                          if fisher else 0, covariance and stats is None, scratch=root, cache_tokens=n * (length + 1))
    model = runner.model if runner is not None else source.load_model()
    if not model.can_generate():
        # An encoder cannot sample its own text: the conversion goes on data-free, and says so.
        import warnings
        warnings.warn(f"{source.name}: calibration 'self' samples text from the model and "
                      f"{type(model).__name__} cannot generate; converting without activation statistics. "
                      f"Give a calibration text (calibration=PATH) for activation weighting.", stacklevel=3)
        source.release_model()
        info = {"source": None, "requested": "self", "reason": f"{type(model).__name__} cannot generate"}
        atomic_write(info_path, json.dumps(info, sort_keys=True))
        return stats, info, sens
    if runner is None:
        new_stats, text, seqs = cal.self_stats(model, source.tokenizer, n, length, seed=config.seed,
                                               progress=progress, covariance=covariance)
    else:
        from ..calibrate.sampling_blockwise import load_samples, sample_ids, save_samples

        # each stage kept as it ends, so an interrupted run resumes after it (20 minutes of
        # sampling and the statistics pass at 8 B)
        if samples_path.is_file():
            seqs = load_samples(samples_path, n, length, int(model.config.vocab_size))
        else:
            sampling = root / "calib_sampling.pt"
            seqs = sample_ids(runner, cal.sampling_bos(source.tokenizer), n, length, seed=config.seed,
                              progress=progress, checkpoint=sampling)
            save_samples(samples_path, seqs)
            sampling.unlink(missing_ok=True)
        text = cal.decode_samples(source.tokenizer, seqs)
        new_stats = None
        if stats is None:  # the tokens generate() ran while sampling: BOS and all but the last sampled one
            new_stats = cal.collect_stats_blockwise(runner, [s[:-1] for s in seqs], progress=progress,
                                                    covariance=covariance)
            cal.save_stats(new_stats, path, source=config.calibration)
        model = None
    stats = new_stats if stats is None else stats
    if want_sens:
        sens = sensitivity_of(source, config, model, seqs, progress, runner, root / "fisher")
    return _finish_calibration(source, config, stats, sens, want_sens, text, (n, length), path, info_path, sens_path)


def block_runner(source: Source, tokens: int = 0, seq_len: int = 0, fisher_tokens: int = 0, covariance: bool = False,
                 scratch: Optional[os.PathLike] = None, cache_tokens: int = 0):
    """A BlockRunner over a folder's model (its Fisher pass keeping block inputs in files under
    ``scratch``), or None (a model in memory, or no repeated blocks). First, a MemoryError if
    calibrating on these token counts (``cache_tokens``: sampled with a key/value cache,
    eoq.calibrate.sampling_blockwise) would not fit the memory there is
    (blockwise.check_calibration_memory)."""
    from ..calibrate.blockwise import BlockRunner, NoBlocks, check_calibration_memory
    from ..format.sources import FolderSource

    if not isinstance(source, FolderSource):
        return None
    try:
        check_calibration_memory(source.name, source.config, tokens, seq_len, fisher_tokens, covariance, cache_tokens)
        return BlockRunner(source, scratch=scratch)
    except NoBlocks:
        return None


def activation_stats(source: Source, seqs: list, covariance: bool, progress: bool,
                     runner=None) -> tuple[dict, Optional[torch.nn.Module]]:
    """(statistics, the loaded model or None): with a BlockRunner (block_runner: a folder's
    model) the model is run one block at a time from its files (eoq.calibrate.blockwise: the same
    statistics bit for bit, one block in memory); without one (a model without a list of
    repeated blocks, or one given in memory) it runs whole."""
    from ..calibrate import statistics as cal

    if runner is not None:
        return cal.collect_stats_blockwise(runner, seqs, progress=progress, covariance=covariance), None
    model = source.load_model()
    return cal.collect_stats(model, seqs, progress=progress, covariance=covariance), model


def _finish_calibration(source, config, stats, sens, want_sens, text, shape, path, info_path, sens_path):
    """Save what calibrate measured (statistics, sensitivity, a summary) and drop the model."""
    from ..calibrate import statistics as cal

    if want_sens:
        if os.environ.get(FAULT_SENSITIVITY_ENV):
            os._exit(75)
        sens.save(sens_path)
    info = {"source": config.calibration, "text_sha256_16": cal.text_fingerprint(text), "sequences": shape[0],
            "seq_len": shape[1], "tokens": max((s.count for s in stats.values()), default=0),
            "sensitivity_tokens": sens.tokens if sens is not None else 0}
    cal.save_stats(stats, path, source=config.calibration)
    atomic_write(info_path, json.dumps(info, sort_keys=True))
    source.release_model()
    from ..calibrate.blockwise import release_freed_memory

    release_freed_memory()
    return stats, info, sens


def calibrate_model(model_or_path, folder: Union[str, os.PathLike], config: Optional[QuantConfig] = None, *,
                    gguf_file: Optional[str] = None, tokenizer=None, progress: bool = True) -> tuple[dict, dict, Sensitivity]:
    """Run the calibration of a conversion on its own: activation statistics and the
    sensitivity pass, written into ``folder`` (calib_stats.safetensors, sensitivity.safetensors,
    calib_info.json) for ``quantize_model(..., stats=, sensitivity=)`` to reuse across settings.
    Returns (stats, summary, sensitivity)."""
    config = config or QuantConfig()
    if config.data_free:
        raise ValueError("calibrate_model: the config is data-free (calibration=None); nothing to measure")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = open_source(model_or_path, gguf_file=gguf_file, tokenizer=tokenizer)
    return calibrate(source, config, folder, progress)


def sensitivity_of(source: Source, config: QuantConfig, model, seqs: list, progress: bool,
                   runner=None, checkpoint: Optional[os.PathLike] = None) -> Sensitivity:
    """The Fisher pass over the first sensitivity_sequences calibration sequences (when the
    model has an output distribution and the allocation asks for it), plus the calibration
    tokens' counts (the input embedding's row weights when there is no Fisher pass). With
    ``model`` None, a folder's model is run one block at a time (fisher_pass_blockwise: the
    same sums, one block in memory) by ``runner`` (or a new BlockRunner), else loaded whole;
    that pass keeps its state in the folder ``checkpoint`` to resume from."""
    from ..calibrate import sensitivity as sensmod

    vocab_rows = {name: source.spec(name).shape[0] for name, role in source.vocab.items() if role == "input"}
    rows = next(iter(vocab_rows.values()), 0)
    if model is None and config.allocation == "sensitivity":
        runner = runner if runner is not None else block_runner(source)
        model = runner.model if runner is not None else source.load_model()
    else:
        runner = None
    if config.allocation == "sensitivity" and sensmod.has_logits(model):
        limit = getattr(model.config, "max_position_embeddings", None)  # a sampled sequence has BOS in front
        fisher_seqs = [s[:limit] for s in seqs[:config.sensitivity_sequences]]
        sens = None
        if runner is not None:
            try:
                sens = sensmod.fisher_pass_blockwise(runner, fisher_seqs, row_params=source.vocab, seed=config.seed,
                                                     progress=progress, checkpoint=checkpoint)
            except sensmod.Unsupported:
                sens = None
        if sens is None:
            sens = sensmod.fisher_pass(source.load_model() if runner is not None else model, fisher_seqs,
                                       row_params=source.vocab, seed=config.seed, progress=progress)
    else:
        sens = Sensitivity(0, {}, {}, {}, {})
    if rows:
        sens.token_counts, sens.count_tokens = sensmod.token_counts(seqs, rows)
        if sens.count_tokens == 0:
            import warnings
            warnings.warn(f"{source.name}: no calibration token falls in the embedding's {rows} rows; every row "
                          f"is weighted alike", stacklevel=4)
    return sens


# ---- assembling the output ------------------------------------------------------------------


def stored_tensors(name: str, entry: dict, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The safetensors names of a parameter's stored tensors."""
    if repo.is_quantized(entry):
        return {f"{name}.{k}": v for k, v in parts.items()}
    return {name: parts["tensor"]}


def shard_plan(names: list[str], entries: dict, max_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name in names:
        n = entries[name]["stored_bytes"]
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current or not shards:
        shards.append(current)
    return shards


def write_shards(dest: pathlib.Path, partial: Partial, entries: dict, marker: Optional[str], max_bytes: int) -> int:
    """Write the safetensors shards (and the index when there are several); returns their bytes."""
    from safetensors.torch import save_file

    names = [n for n in sorted(entries) if entries[n]["kind"] != "tied"]
    shards = shard_plan(names, entries, max_bytes)
    files = [repo.WEIGHTS] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        tensors = {}
        for name in shard:
            tensors.update(stored_tensors(name, entries[name], partial.tensors(name)))
            entries[name]["file"] = file
            if name == marker:
                tensors[name] = torch.frombuffer(bytearray(repo.MARKER_TEXT.encode()), dtype=torch.uint8)
        tmp = dest / (file + ".tmp")
        # One metadata key only: safetensors writes metadata in hash order, which varies by run.
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, dest / file)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: file for k in tensors})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write(dest / repo.INDEX, json.dumps(index, indent=2))
    return total


def totals(entries: dict, stored_total: int) -> dict:
    counts: dict[str, int] = {}
    original = quantized_params = quantized_bytes = all_params = 0
    for e in entries.values():
        counts[e["kind"]] = counts.get(e["kind"], 0) + 1
        if e["kind"] == "tied":
            continue
        n = repo.entry_numel(e)
        all_params += n
        original += n * repo.entry_itemsize(e)
        if repo.is_quantized(e):
            quantized_params += n
            quantized_bytes += e["stored_bytes"]
    return {"original_bytes": original, "stored_bytes": stored_total,
            "ratio": round(original / max(stored_total, 1), 4), "quantized_params": quantized_params,
            "quantized_stored_bytes": quantized_bytes, "all_params": all_params,
            "bits_per_weight_quantized": round(8.0 * quantized_bytes / max(quantized_params, 1), 4),
            "bits_per_weight_all": round(8.0 * stored_total / max(all_params, 1), 4), "counts": counts}


def write_config(dest: pathlib.Path, source: Source, config: QuantConfig, entries: dict) -> None:
    cfg = source.config
    cfg.quantization_config = {"quant_method": "eoq", "format_version": repo.FORMAT_VERSION,
                               "eoq_version": _version(), **config.to_dict()}
    dtypes = [e["dtype"] for e in entries.values() if repo.is_quantized(e)]
    if dtypes:
        cfg.dtype = max(set(dtypes), key=dtypes.count)
    try:
        cfg.save_pretrained(str(dest))
    finally:
        del cfg.quantization_config


def _version() -> str:
    from .._version import __version__
    return __version__


def check_settings(config: QuantConfig) -> None:
    """Try the method settings (default and every quantize rule) on a small random weight, so
    a bad option fails at once, before any work or partial folder exists."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    settings = [(config.method, config.bits, config.block_size, config.options)]
    for r in config.protect:
        if r.action == "quantize":
            method = r.method or config.method
            options = {**config.options, **r.options} if method == config.method else r.options
            settings.append((method, config.bits if r.bits is None else r.bits,
                             r.block_size if r.block_size is not None else config.block_size, options))
    for method, bits, block, options in settings:
        if block is not None and block > 64:
            block = None  # the block rule needs a wider weight; the setting itself is checked below
        quantize_tensor(w, method, bits, block, name=f"QuantConfig ({method})", **options)


# ---- the entry point ------------------------------------------------------------------------


def quantize_model(model_or_path, out_dir: Union[str, os.PathLike], config: Optional[QuantConfig] = None, *,
                   gguf_file: Optional[str] = None, tokenizer=None, dtype: Optional[torch.dtype] = None,
                   stats=None, sensitivity=None, curve_cache=None, overwrite: bool = False,
                   progress: bool = True, verbose: bool = True, executor=None,
                   ray_address: Optional[str] = None) -> dict:
    """Convert a model (a PreTrainedModel, a local HF folder, a .gguf file or a hub id) into an
    eoq folder at out_dir; returns the manifest. An interrupted run resumes when called again
    with the same arguments. ``stats``: activation statistics already collected (a dict from
    eoq.calibrate.statistics.collect_stats, or a file from save_stats) instead of a calibration pass;
    ``sensitivity``: an eoq.calibrate.sensitivity.Sensitivity (or its file) instead of the Fisher pass;
    ``curve_cache``: a folder that keeps the rate-distortion curves across conversions of the
    same model and calibration (a sweep over budgets).
    ``executor``: where the per-tensor work (the allocation's curves, the quantization) runs:
    None or "local" (this process), "ray" (tasks on the Ray cluster at ``ray_address``, else
    $RAY_ADDRESS, else a local Ray; needs ``pip install eoq[ray]``), or an eoq.convert.executor object.
    Calibration runs here either way, and this process writes every file. The output is the
    same bytes whatever the executor, which is why it is an argument and not a QuantConfig
    field: the config is written into the output and into the partial folder's state.json, so
    there it would make a Ray run's output differ from a local one, and refuse to resume a Ray
    run locally (or the other way round).
    ``progress`` shows tqdm bars (weights per second), ``verbose`` prints the summary, the wall
    time and the peak memory."""
    start = time.perf_counter()
    config = config or QuantConfig()
    check_settings(config)
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    runner = make_executor(executor, ray_address)
    try:
        manifest = _convert(model_or_path, out, config, runner, gguf_file=gguf_file, tokenizer=tokenizer,
                            dtype=dtype, stats=stats, sensitivity=sensitivity, curve_cache=curve_cache,
                            progress=progress)
    finally:
        if runner is not executor:  # ours (a Ray we started is shut down), not one the caller passed
            runner.close()
    if verbose:
        print(summary_table(manifest))
        print(run_line(time.perf_counter() - start))
    return manifest


def run_line(seconds: float) -> str:
    """Wall time and this process's peak memory (ru_maxrss: KiB on Linux; Ray workers' not included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"wall time {seconds:.1f} s, peak memory {peak / 2 ** 20:.2f} GiB (this process)"


def _convert(model_or_path, out: pathlib.Path, config: QuantConfig, executor, *, gguf_file, tokenizer, dtype, stats,
             sensitivity, curve_cache, progress: bool) -> dict:
    """quantize_model's work, its per-tensor jobs on `executor`."""
    source = open_source(model_or_path, gguf_file=gguf_file, tokenizer=tokenizer, dtype=dtype)
    specs = {name: source.spec(name) for name in source.names}
    plans = {name: plan(source, config, name, specs[name]) for name in source.names}
    check_budget(source, config, plans, specs)
    state = {"config": config.to_dict(), "source": source.describe(), "location": source.location,
             "eoq_version": _version(), "format_version": repo.FORMAT_VERSION}
    partial = Partial(out, state)

    entries: dict[str, dict] = {}
    for name in source.names:
        done = partial.load(name)
        if done is not None:
            entries[name] = done
    calib = None
    if stats is not None:
        from ..calibrate.statistics import load_stats
        stats = load_stats(stats) if isinstance(stats, (str, os.PathLike)) else stats
        calib = {"source": "precomputed", "modules": len(stats),
                 "tokens": max((s.count for s in stats.values()), default=0)}
    if config.feedback and stats is not None and not has_covariance(stats):
        raise ValueError(f"feedback={config.feedback!r} needs the inputs' covariance, which the given stats lack: "
                         f"collect them with eoq.calibrate.statistics.collect_stats(..., covariance=True)")
    if isinstance(sensitivity, (str, os.PathLike)):
        sensitivity = Sensitivity.load(sensitivity)
    if not config.data_free and (stats is None or sensitivity is None and config.allocation == "sensitivity"):
        stats, info, sensitivity = calibrate(source, config, partial.root, progress, stats, sensitivity)
        calib = calib or info
    if calib is not None and sensitivity is not None:
        calib["sensitivity_tokens"] = sensitivity.tokens

    allocated = [n for n in source.names if plans[n]["action"] == "quantize" and plans[n]["kind"] == "quantized"]
    first = [n for n in source.names if n not in entries and n not in set(allocated)]
    fault_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    written = [0]

    def store(name: str, entry: dict, tensors: dict) -> None:
        """Keep one finished parameter: its part file, written by the driver alone."""
        partial.save(name, entry, tensors)
        entries[name] = entry
        written[0] += 1
        if fault_after and written[0] >= fault_after:
            os._exit(75)

    def convert(names: list[str], bar, bits: Optional[dict] = None) -> None:
        """Store `names` (their bits from `bits` where given), each saved as its result comes in."""
        for name in [n for n in names if plans[n]["action"] == "tied"]:  # no data: the header says it all
            store(name, tied_entry(source, config, name, plans[name]), {})
        work = [n for n in names if plans[n]["action"] != "tied"]
        jobs = (tensor_job(source, config, n, {**plans[n], **({"bits": bits[n]} if bits and n in bits else {})},
                           stats, sensitivity) for n in work)
        for i, (entry, tensors) in executor.map(run_tensor_job, jobs):
            store(work[i], entry, tensors)
            bar.update(specs[work[i]].numel())

    # the bar counts the weights there is work for (a tied parameter has none)
    with weights_bar(source, [n for n in first if plans[n]["action"] != "tied"], "fixed tensors", progress) as bar:
        convert(first, bar)  # passthrough, protect rules, ties: their real size comes off the budget
    allocation = None
    rates = None
    if config.whole_model_budget:
        allocation = allocate_rates(source, config, partial, plans, entries, stats, sensitivity, progress,
                                    curve_cache, executor)
        rates = allocation["rates"]
    with weights_bar(source, [n for n in allocated if n not in entries], "quantize", progress) as bar:
        done = 0  # tensors in the waves before this one
        for wave in waves(allocated):
            left = [n for n in wave if n not in entries]
            if left:  # every earlier wave is finished (in this run or before it): its carry is known
                convert(left, bar, wave_bits(wave, allocated[:done], rates, entries, specs,
                                             config.allocation_range[1]) if rates is not None else None)
            done += len(wave)

    dest = partial.root / "repo"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    quantized = sorted(n for n, e in entries.items() if repo.is_quantized(e))
    marker = quantized[0] if quantized else None
    stored_total = write_shards(dest, partial, entries, marker, config.max_shard_size)
    manifest = {"format": repo.FORMAT, "format_version": repo.FORMAT_VERSION, "eoq_version": _version(),
                "config": config.to_dict(), "source": source.describe(), "calibration": calib, "marker": marker,
                "allocation": allocation and {k: v for k, v in allocation.items() if k != "rates"},
                "tensors": dict(sorted(entries.items())), "totals": totals(entries, stored_total)}
    repo.seal(manifest)
    atomic_write(dest / repo.MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    write_config(dest, source, config, entries)
    source.save_extras(dest)
    shutil.copy2(pathlib.Path(__file__).parents[1] / "standalone" / "load_quantized.py", dest / "load_quantized.py")
    from .card import write_card
    write_card(dest)
    _publish(dest, out)
    shutil.rmtree(partial.root)
    return manifest


def _publish(dest: pathlib.Path, out: pathlib.Path) -> None:
    """Rename the finished folder into place; an old output is moved aside first and removed
    only once the new one is there."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.eoq-old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(dest, out)
    if old is not None:
        shutil.rmtree(old)


def summary_table(manifest: dict, top: int = 0) -> str:
    """Counts and sizes by kind and method; with top > 0 also the largest stored tensors."""
    rows: dict[tuple, list] = {}
    for e in manifest["tensors"].values():
        if e["kind"] == "tied":
            continue
        bits = e.get("bits", "-")
        key = (e["kind"], e.get("method", "-"), f"{bits:.3g}" if isinstance(bits, float) else str(bits))
        n = repo.entry_numel(e)
        acc = rows.setdefault(key, [0, 0, 0, 0])
        acc[0] += 1
        acc[1] += n
        acc[2] += n * repo.entry_itemsize(e)
        acc[3] += e["stored_bytes"]
    lines = [f"{'kind':<12} {'method':<7} {'bits':>5} {'tensors':>8} {'params':>12} {'original MB':>12} "
             f"{'stored MB':>10} {'bits/w':>7}"]
    for (kind, method, bits), (k, n, orig, stored) in sorted(rows.items()):
        lines.append(f"{kind:<12} {method:<7} {bits:>5} {k:>8} {n:>12,} {orig / 1e6:>12.2f} {stored / 1e6:>10.2f} "
                     f"{8 * stored / max(n, 1):>7.3f}")
    t = manifest["totals"]
    lines.append(f"whole model: {t['bits_per_weight_all']:.3f} bits per parameter ({t['all_params']:,} parameters), "
                 f"{t['original_bytes'] / 1e6:.2f} MB -> {t['stored_bytes'] / 1e6:.2f} MB (x{t['ratio']:.2f}); "
                 f"{t['bits_per_weight_quantized']:.3f} bits/weight over the quantized weights")
    alloc = manifest.get("allocation")
    if alloc and alloc.get("budget_bits"):
        kl = alloc.get("predicted_kl")
        lines.append(f"budget: {alloc['budget_bits'] / 8 / 1e6:.2f} MB "
                     f"({alloc['budget_bits'] / max(t['all_params'], 1):.3f} bits per parameter), "
                     f"{alloc['mode']} allocation" + (f", predicted KL {kl:.4g}" if kl is not None else ""))
    if top:
        big = sorted(((e["stored_bytes"], n) for n, e in manifest["tensors"].items() if repo.is_quantized(e)),
                     reverse=True)[:top]
        lines.append(f"largest quantized tensors:")
        for size, n in big:
            e = manifest["tensors"][n]
            lines.append(f"  {n:<50} {str(e['shape']):>14} {e['method']:<6} {e['bits_per_weight']:.3f} bits/w "
                         f"{size / 1e6:.2f} MB")
    return "\n".join(lines)
