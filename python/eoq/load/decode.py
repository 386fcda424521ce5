"""An eoq folder decoded into a plain Hugging Face folder (``eoq decode``), for the runtimes
that do not read eoq (vLLM, SGLang, llama.cpp's ``convert_hf_to_gguf.py``): a model
downloaded small, run anywhere.

``decode_folder`` writes what ``save_pretrained`` writes for the model ``from_pretrained``
loads from the folder after ``import eoq``, tensor for tensor in the same dtype: safetensors
shards (with an index above ``max_shard_size``) holding every stored parameter decoded
(eoq.format.folder: the whole folder verified first), tied parameters left out as transformers
leaves them out (``tie_word_embeddings`` ties them again on load), config.json without its
``quantization_config`` and with the new ``dtype``, and the tokenizer and generation files
(eoq.format.sources.EXTRA_FILES). eoq's own files (the manifest, the stand-alone loader, the
model card and evaluation files, which describe the eoq folder) are not copied.

The folder is built under a temporary name beside the output and renamed into place, so an
output is complete or absent; a shard at a time is decoded, so memory holds one shard. Nothing
is printed. ``model.save_pretrained`` of a model loaded from an eoq folder writes the same kind
of folder through transformers (eoq.load.hf_quantizer: the quantizer lets go of the model).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Union

import torch

from ..errors import FormatError
from ..format import repo
from ..format.sources import EXTRA_DIRS, EXTRA_FILES

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MAX_SHARD_BYTES = 5 * 10 ** 9  # the hub's usual shard; also the most memory a decode holds


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """torch.bfloat16 / float16 / float32, given as a dtype or its name ("torch." optional)."""
    name = dtype if isinstance(dtype, str) else repo.dtype_name(dtype) if isinstance(dtype, torch.dtype) else None
    if name is None or name.removeprefix("torch.") not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name.removeprefix("torch.")]


def plain_config(config: dict, dtype: torch.dtype) -> dict:
    """config.json's content without ``quantization_config``, its dtype (and the older
    ``torch_dtype``, when the file has it) set to ``dtype``."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    out["dtype"] = repo.dtype_name(dtype)
    if "torch_dtype" in out:
        out["torch_dtype"] = out["dtype"]
    return out


def _out_dtype(entry: dict, dtype: torch.dtype) -> torch.dtype:
    stored = repo.dtype_from_name(entry["dtype"], "entry")
    return dtype if stored.is_floating_point else stored  # integer tensors stay as they are


def _check_paths(src: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder (an eoq folder, as `eoq quantize` writes it; a hub model: "
                                f"download it first, e.g. `hf download REPO --local-dir DIR`)")
    for f in (repo.MANIFEST, "config.json"):
        if not (src / f).is_file():
            raise FormatError(f"{src}: no {f}; not an eoq folder")
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise ValueError(f"{out}: the output must lie outside the eoq folder {src} (and not contain it)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; choose another output folder, or overwrite it "
                              "(overwrite=True, --overwrite)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")


def _write_shards(folder, dest: pathlib.Path, dtype: torch.dtype, max_bytes: int) -> None:
    from safetensors.torch import save_file

    entries = folder.manifest["tensors"]
    names = [n for n in sorted(entries) if entries[n]["kind"] != "tied"]  # tied: transformers ties them on load
    shards = repo.shard_plan(names, {n: repo.entry_numel(entries[n]) * torch.empty(
        0, dtype=_out_dtype(entries[n], dtype)).element_size() for n in names}, max_bytes)
    files = repo.shard_files(len(shards))
    weight_map, total_bytes, total_params = {}, 0, 0
    for file, shard in zip(files, shards):
        tensors = {}
        for name in shard:
            t = folder.dequantize(name, dtype)  # integer tensors are not cast
            tensors[name] = t.contiguous()
            total_bytes += t.numel() * t.element_size()
            total_params += t.numel()
        save_file(tensors, str(dest / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in tensors})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": total_params, "total_size": total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (dest / repo.INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_files(src: pathlib.Path, dest: pathlib.Path, config: dict) -> None:
    """config.json, and the tokenizer and generation files copied; the shards made readable
    as these are (safetensors writes them 0600)."""
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    mode = (dest / "config.json").stat().st_mode & 0o777
    for f in dest.glob("*.safetensors"):
        f.chmod(mode)
    for name in EXTRA_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    for name in EXTRA_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name)


def decode_folder(folder: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                  dtype: Union[str, torch.dtype] = torch.bfloat16, max_shard_size: int = MAX_SHARD_BYTES,
                  overwrite: bool = False) -> pathlib.Path:
    """Write the eoq folder ``folder`` as a plain Hugging Face folder ``out_dir`` whose floating
    tensors are in ``dtype`` (bfloat16, float16 or float32; module docstring); returns its path.

    Raises ValueError for an unknown dtype or an output inside the input, FileExistsError when
    ``out_dir`` exists (unless ``overwrite``), FileNotFoundError / eoq.FormatError for a
    missing, incomplete or damaged eoq folder (nothing is written then)."""
    from ..format.folder import Folder

    dtype = resolve_dtype(dtype)
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size < 1:
        raise ValueError(f"max_shard_size {max_shard_size!r}: expected a positive number of bytes")
    src, out = pathlib.Path(folder), pathlib.Path(os.path.abspath(out_dir))
    _check_paths(src, out, overwrite)
    try:
        config = json.loads((src / "config.json").read_text())
    except ValueError as e:
        raise FormatError(f"{src / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{src / 'config.json'}: not a JSON object")

    reader = Folder(src)
    try:
        reader.verify()  # every checksum before anything is decoded or written
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.eoq-decode-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            _write_shards(reader, tmp, dtype, max_shard_size)
            _write_files(src, tmp, plain_config(config, dtype))
            repo.publish(tmp, out)  # overwrite: the old output goes once the new one is in place
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    finally:
        reader.close()
    return out
