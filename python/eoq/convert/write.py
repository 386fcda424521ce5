"""Assembling the output in the partial folder's repo/: the safetensors shards (and index)
from the part files, the manifest's totals, config.json with its quantization_config, the
stand-alone loader and the card (eoq.format.repo.publish then renames the folder into place).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Optional

import torch

from .._version import __version__
from ..format import repo
from ..format.sources import Source
from .partial import Partial, atomic_write
from .quant_config import QuantConfig


def stored_tensors(name: str, entry: dict, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The safetensors names of a parameter's stored tensors."""
    if repo.is_quantized(entry):
        return {f"{name}.{k}": v for k, v in parts.items()}
    return {name: parts["tensor"]}


def write_shards(dest: pathlib.Path, partial: Partial, entries: dict, marker: Optional[str], max_bytes: int) -> int:
    """Write the safetensors shards (and the index when there are several); returns their bytes."""
    from safetensors.torch import save_file

    names = [n for n in sorted(entries) if entries[n]["kind"] != "tied"]
    shards = repo.shard_plan(names, {n: entries[n]["stored_bytes"] for n in names}, max_bytes)
    files = repo.shard_files(len(shards))
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
                               "eoq_version": __version__, **config.to_dict()}
    dtypes = [e["dtype"] for e in entries.values() if repo.is_quantized(e)]
    if dtypes:
        cfg.dtype = max(set(dtypes), key=dtypes.count)
    try:
        cfg.save_pretrained(str(dest))
    finally:
        del cfg.quantization_config


def write_folder_files(dest: pathlib.Path, source: Source, config: QuantConfig, entries: dict) -> None:
    """Everything beside the shards and the manifest: config.json, the source's tokenizer and
    generation files, the stand-alone loader and the model card."""
    from .card import write_card

    write_config(dest, source, config, entries)
    source.save_extras(dest)
    shutil.copy2(pathlib.Path(__file__).parents[1] / "standalone" / "load_quantized.py", dest / "load_quantized.py")
    write_card(dest)
