"""The per-tensor work as picklable jobs (a Ray task's argument): one parameter's stored
tensors (``TensorJob``) and one tensor's rate-distortion curve (``CurveJob``), each built on
the driver and run where the executor puts it (eoq.convert.executor). A job is a pure function
of its fields, so the bytes do not depend on where it ran.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Optional

import torch

from .._version import __version__
from ..calibrate.sensitivity import Sensitivity
from ..format import repo
from ..format.sources import Source, resolve
from ..methods.quantize import quantize_tensor
from . import allocate
from .partial import atomic_write
from .plan import feedback_options, importance_for, row_importance_for, stored_dtype, tensor_seed
from .quant_config import QuantConfig


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


def cached_curve(folder: pathlib.Path, args: tuple) -> tuple[list[float], list[float]]:
    """allocate.rd_curve(*args), kept in `folder` under a hash of every input (the weight, its
    statistics, the settings, eoq's version): a budget sweep over one model measures each
    curve once."""
    h = hashlib.sha256(f"{__version__} {allocate.GRID} {allocate.FEEDBACK_POINTS} {allocate.CURVE_SAMPLE} "
                       f"{args[2:4]} {args[4:6]} {args[7]} "
                       f"{args[9:11]} {args[12:]}".encode())
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
    absolute: bool = False          # distortions as weighted mean squares (allocate.ERROR_MODEL "white")


def curve_job(source: Source, config: QuantConfig, plans: dict, name: str, stats: Optional[dict],
              sens: Optional[Sensitivity], curve_cache: Optional[pathlib.Path], absolute: bool = False) -> CurveJob:
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
                    str(pathlib.Path(curve_cache).absolute()) if curve_cache else None, absolute)


def run_curve_job(job: CurveJob) -> tuple[list[float], list[float]]:
    """(rates, distortions) of one tensor, from the cache folder when it holds them."""
    t = resolve(job.tensor)
    w = t.t() if job.transposed else t
    fb = job.feedback
    args = (w, job.importance, job.block_size, job.seed, job.lo, job.hi, job.row_weights, job.row_tokens,
            fb.get("hessian"), fb.get("damp", 0.0), fb.get("hessian_tokens"), job.name, job.absolute)
    return cached_curve(pathlib.Path(job.cache), args) if job.cache else allocate.rd_curve(*args)


def weights_bar(source: Source, names: list[str], desc: str, progress: bool):
    """A tqdm bar counting the weights of `names` (weights/s and an ETA, whatever the tensors' sizes)."""
    from tqdm.auto import tqdm

    return tqdm(total=sum(source.spec(n).numel() for n in names), desc=desc, unit="w", unit_scale=True,
                disable=not progress or not names)
