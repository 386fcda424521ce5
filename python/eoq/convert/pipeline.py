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

Order of work, each step in its module: (1) ``plan`` decides every parameter from the headers
alone and checks the budget (``bits`` per parameter of the whole model, or ``target_size``
bytes) against what the passthrough tensors take, before anything else; (2) ``calibration``:
activation statistics and the sensitivity pass (eoq.calibrate), both kept in the partial
folder; (3) the tensors whose size is fixed (passthrough, protect rules) are written, so their
real bytes come off the budget; (4) ``rates`` spreads what is left over the quantized tensors
(eoq.convert.allocate), kept in allocation.json; (5) those tensors are quantized at their
rates as ``jobs``, in waves (rates.CARRY_WAVE): each tensor of a wave gets its rate plus what
the earlier waves left unspent, spread over the wave's weights, so the tensors of one wave do
not depend on each other; (6) ``write`` assembles the folder.

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
blocks, runs whole. The input covariances error feedback needs go to disk block by block
as the statistics pass runs (eoq.calibrate.covariance_store, in the partial folder), and
each quantization job reads its own matrix back: one in memory per job in flight.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Optional, Union

import torch

from .._version import __version__
from ..calibrate.sensitivity import Sensitivity
from ..format import repo
from ..format.sources import open_source
from .calibration import calibrate, has_covariance
from .executor import make_executor
from .jobs import run_tensor_job, tensor_job, weights_bar
from .partial import Partial, atomic_write
from .plan import check_budget, check_settings, plan, tied_entry
from .quant_config import QuantConfig
from .rates import allocate_rates, wave_bits, waves
from .summary import run_line, summary_table
from .write import totals, write_folder_files, write_shards

FAULT_ENV = "EOQ_FAULT_AFTER_TENSORS"  # tests: die (os._exit) after this many new part files
log = logging.getLogger("eoq")


def quantize_model(model_or_path, out_dir: Union[str, os.PathLike], config: Optional[QuantConfig] = None, *,
                   gguf_file: Optional[str] = None, tokenizer=None, dtype: Optional[torch.dtype] = None,
                   stats=None, sensitivity=None, curve_cache=None, overwrite: bool = False,
                   progress: bool = True, verbose: bool = False, executor=None,
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
    ``progress`` shows tqdm bars (weights per second); nothing else is printed unless
    ``verbose`` asks for the summary table, the wall time and the peak memory. Both go to the
    ``eoq`` logger (INFO) either way."""
    start = time.perf_counter()
    config = config or QuantConfig()
    check_settings(config)
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    runner = make_executor(executor, ray_address)
    try:
        with _transformers_bars(progress):
            manifest = _convert(model_or_path, out, config, runner, gguf_file=gguf_file, tokenizer=tokenizer,
                                dtype=dtype, stats=stats, sensitivity=sensitivity, curve_cache=curve_cache,
                                progress=progress)
    finally:
        if runner is not executor:  # ours (a Ray we started is shut down), not one the caller passed
            runner.close()
    summary = f"{summary_table(manifest)}\n{run_line(time.perf_counter() - start)}"
    log.info("%s: converted\n%s", out, summary)
    if verbose:
        print(summary)
    return manifest


@contextlib.contextmanager
def _transformers_bars(progress: bool):
    """With progress=False, transformers' own bars (a GGUF's dequantization, a model's
    loading) are off too for the conversion, and back as they were after it."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not progress and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not progress and was:
            hf_logging.enable_progress_bar()


def _convert(model_or_path, out: pathlib.Path, config: QuantConfig, executor, *, gguf_file, tokenizer, dtype, stats,
             sensitivity, curve_cache, progress: bool) -> dict:
    """quantize_model's work, its per-tensor jobs on `executor`."""
    source = open_source(model_or_path, gguf_file=gguf_file, tokenizer=tokenizer, dtype=dtype)
    specs = {name: source.spec(name) for name in source.names}
    plans = {name: plan(source, config, name, specs[name]) for name in source.names}
    check_budget(source, config, plans, specs)
    state = {"config": config.to_dict(), "source": source.describe(), "location": source.location,
             "eoq_version": __version__, "format_version": repo.FORMAT_VERSION}
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
    manifest = {"format": repo.FORMAT, "format_version": repo.FORMAT_VERSION, "eoq_version": __version__,
                "config": config.to_dict(), "source": source.describe(), "calibration": calib, "marker": marker,
                "allocation": allocation and {k: v for k, v in allocation.items() if k != "rates"},
                "tensors": dict(sorted(entries.items())), "totals": totals(entries, stored_total)}
    repo.seal(manifest)
    atomic_write(dest / repo.MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    write_folder_files(dest, source, config, entries)
    repo.publish(dest, out)
    shutil.rmtree(partial.root)
    return manifest


