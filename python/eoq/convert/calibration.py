"""A conversion's calibration: the activation statistics and the sensitivity (Fisher) pass
of eoq.calibrate, run on the source (block by block for a folder's model), each stage kept in
the partial folder as it ends so an interrupted run resumes after it; and
``calibrate_model``, the same on its own, for conversions that share one calibration.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional, Union

import torch

from ..calibrate.sensitivity import Sensitivity
from ..format.sources import Source, open_source
from .partial import atomic_write
from .quant_config import QuantConfig


FAULT_SENSITIVITY_ENV = "EOQ_FAULT_IN_SENSITIVITY"  # tests: die once the Fisher pass ran, before it is kept
COVARIANCE_DIR = "calib_covariance"  # each block's input covariances, beside calib_stats (covariance_store)


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
            stats, model = activation_stats(source, seqs, covariance, progress, runner, root / COVARIANCE_DIR)
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
                                                    covariance=covariance, spill_to=root / COVARIANCE_DIR)
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
                     runner=None, spill_to: Optional[os.PathLike] = None) -> tuple[dict, Optional[torch.nn.Module]]:
    """(statistics, the loaded model or None): with a BlockRunner (block_runner: a folder's
    model) the model is run one block at a time from its files (eoq.calibrate.blockwise: the same
    statistics bit for bit, one block in memory; its covariances written to ``spill_to`` as
    each block ends); without one (a model without a list of repeated blocks, or one given in
    memory) it runs whole."""
    from ..calibrate import statistics as cal

    if runner is not None:
        return cal.collect_stats_blockwise(runner, seqs, progress=progress, covariance=covariance,
                                           spill_to=spill_to), None
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
    from ..calibrate import fisher_blockwise
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
                sens = fisher_blockwise.fisher_pass_blockwise(runner, fisher_seqs, row_params=source.vocab, seed=config.seed,
                                                     progress=progress, checkpoint=checkpoint)
            except fisher_blockwise.Unsupported:
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
