"""Input covariances kept on disk, one file per decoder block, read back one matrix at a time.

Why: error feedback needs every Linear's sum of a a^T (float64, n x n per distinct input).
Held in memory for the whole model that is 18 GB for Qwen2.5-1.5B (its down projections
read 8960-wide inputs: 642 MB each) and ~65 GB for an 8 B model, while a conversion uses one
matrix at a time. So the block pass (eoq.calibrate.statistics.collect_stats_blockwise) writes
each block's matrices here the moment the block has run, and the statistics keep a
``StoredCovariance`` handle in their place; ``ActStats.hessian`` loads it when a tensor is
quantized, and the matrix is freed with the job. Memory: one block's matrices while the
block runs, then one per quantization job in flight. Disk: the same bytes as the memory
they replace (float64, so the sums are the in-memory ones bit for bit); a conversion's
files live in its partial folder and go with it.

Each file is written under a temporary name and renamed, so a file that exists is complete.
A handle is only ever read back as a float64 [n, n] tensor under its key (checked from the
header before any allocation), so a missing, truncated or replaced file is a ValueError
naming it and the module, never a wrong covariance. Saved statistics refer to these files
by a path relative to the statistics file's folder; a reference that leaves that folder is
refused (a hostile statistics file cannot make eoq read elsewhere).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Union

import torch


@dataclasses.dataclass(frozen=True)
class StoredCovariance:
    """One n x n float64 matrix under ``key`` in the safetensors file ``path``."""
    path: str
    key: str
    n: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def check(self, module: str = "") -> None:
        """A ValueError unless the file holds the matrix as this handle says (header only)."""
        from safetensors import safe_open

        what = f"{self.path}: the input covariance of {module or self.key!r}"
        if not os.path.isfile(self.path):
            raise ValueError(f"{what} is missing (no such file)")
        try:
            with safe_open(self.path, framework="pt") as f:
                if self.key not in set(f.keys()):
                    raise ValueError(f"no tensor {self.key!r}")
                s = f.get_slice(self.key)
                shape, dtype = list(s.get_shape()), s.get_dtype()
        except ValueError as e:
            raise ValueError(f"{what} is unreadable ({e})") from e
        except Exception as e:  # a truncated or foreign file: safetensors' own errors
            raise ValueError(f"{what} is unreadable ({type(e).__name__}: {e})") from e
        if shape != [self.n, self.n] or dtype != "F64":
            raise ValueError(f"{what} has shape {shape} and dtype {dtype}, expected [{self.n}, {self.n}] F64")

    def load(self) -> torch.Tensor:
        from safetensors import safe_open

        self.check()
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(self.key)


def outer_of(m) -> torch.Tensor:
    """The matrix an ActStats.sum_outer holds: itself, or read from its file."""
    return m.load() if isinstance(m, StoredCovariance) else m


def _file_name(block: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", block) + ".safetensors"


def spill(stats: dict, folder: Union[str, os.PathLike], block: str) -> None:
    """Write the covariances of ``stats`` (one block's ActStats) to ``folder`` and put handles
    in their place; Linears that share one matrix share one handle, as they shared the tensor."""
    from safetensors.torch import save_file

    folder = pathlib.Path(folder)
    holder = {}  # id of a matrix -> the first module holding it (its key in the file)
    names = [n for n, s in stats.items() if s.sum_outer is not None and not isinstance(s.sum_outer, StoredCovariance)]
    for name in names:
        holder.setdefault(id(stats[name].sum_outer), name)
    mats = {k: stats[k].sum_outer for k in holder.values()}
    if not mats:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / _file_name(block)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: m.contiguous() for k, m in mats.items()}, str(tmp))
    os.replace(tmp, path)
    handles = {k: StoredCovariance(str(path.absolute()), k, m.shape[0]) for k, m in mats.items()}
    for name in names:
        stats[name].sum_outer = handles[holder[id(stats[name].sum_outer)]]


def reference(m: StoredCovariance, stats_path: pathlib.Path) -> list[str]:
    """How a statistics file at ``stats_path`` names ``m``: [path relative to its folder, key].
    A matrix outside that folder is copied into ``<stats file>.covariance/`` first."""
    import shutil

    here = stats_path.parent.absolute()
    src = pathlib.Path(m.path).absolute()
    try:
        rel = src.relative_to(here)
    except ValueError:
        dest_dir = stats_path.with_name(stats_path.name + ".covariance")
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / src.name
        if not dest.exists():
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        rel = dest.absolute().relative_to(here)
    return [rel.as_posix(), m.key]


def from_reference(ref, stats_path: pathlib.Path, n: int, module: str) -> StoredCovariance:
    """The handle a statistics file's reference names, checked: inside the file's folder,
    present, n x n float64."""
    if not (isinstance(ref, list) and len(ref) == 2 and all(isinstance(x, str) for x in ref)):
        raise ValueError(f"{stats_path}: the covariance reference of {module!r} is malformed ({ref!r})")
    rel = pathlib.PurePosixPath(ref[0])
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"{stats_path}: the covariance of {module!r} points outside its folder ({ref[0]!r})")
    m = StoredCovariance(str(stats_path.parent.absolute() / rel), ref[1], n)
    m.check(module)
    return m


__all__ = ["StoredCovariance", "outer_of", "spill", "reference", "from_reference"]
