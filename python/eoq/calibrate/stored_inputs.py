"""Each decoder block's input hidden states, kept on disk between the Fisher pass's forward
and backward sweeps (eoq.calibrate.fisher_blockwise.fisher_pass_blockwise).

Why on disk: the backward sweep recomputes every block from its stored input, in reverse
order, so all of them exist at once: blocks x sequences x tokens x hidden float32, 2.1 GiB
for an 8 B model at the default 8 x 512 tokens and 11 GiB for a 70 B one, more than the
block the pass is otherwise bounded by. In files they cost page cache the kernel can
reclaim, not the process's memory; one block's inputs are read back at a time (64 MiB at
8 B) and each file is deleted once the pass is done with it (``discard``).

The files are torch.save's of the exact tensors (float32 bits, no conversion), so the sums
are those of the in-memory pass bit for bit. Each is written under a temporary name and
renamed, so a file that exists is complete.

Two lifetimes:
  - temporary (``where``): a directory under ``where`` removed when the pass ends, however
    it ends;
  - kept (``keep``, a conversion's partial folder): a fixed directory that outlives an
    interrupted pass, so that a resumed pass reads the inputs already stored instead of
    recomputing them (eoq.calibrate.fisher_checkpoint). Its files are tied to the pass's sequences by
    ``fingerprint``: files of other sequences are deleted on opening. The caller removes
    the directory (``remove``) once the pass has finished.
A stored file is read back only as a list of tensors of the shapes and dtype ``expect``
says (one per sequence), so a truncated, replaced or foreign file is a ValueError naming
it, never a wrong input.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Optional

import torch

FINGERPRINT_FILE = "fingerprint"


class StoredInputs:
    """put(i, tensors) per block, take(i) to read them back (any order, any number of times),
    discard(i) when done with them; a context manager that removes a temporary directory."""

    def __init__(self, where: Optional[os.PathLike] = None, keep: Optional[os.PathLike] = None,
                 fingerprint: str = "", expect: Optional[list[tuple[tuple, torch.dtype]]] = None):
        self._tmp = None
        if keep is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="eoq-block-inputs-", dir=where)
            self.root = pathlib.Path(self._tmp.name)
        else:
            self.root = pathlib.Path(keep)
            mark = self.root / FINGERPRINT_FILE
            if self.root.exists() and (not mark.is_file() or mark.read_text() != fingerprint):
                shutil.rmtree(self.root)  # inputs of other sequences (or of a pass cut off while starting)
            if not self.root.exists():
                self.root.mkdir(parents=True)
                tmp = mark.with_name(mark.name + ".tmp")
                tmp.write_text(fingerprint)
                os.replace(tmp, mark)
        self.expect = expect

    def _path(self, i: int) -> pathlib.Path:
        return self.root / f"block-{i:05d}.pt"

    def put(self, i: int, tensors: list[torch.Tensor]) -> None:
        if self.expect is None:
            self.expect = [(tuple(t.shape), t.dtype) for t in tensors]
        path = self._path(i)
        tmp = path.with_name(path.name + ".tmp")
        torch.save([t.detach().contiguous() for t in tensors], tmp)
        os.replace(tmp, path)

    def has(self, i: int) -> bool:
        return self._path(i).is_file()

    def take(self, i: int) -> list[torch.Tensor]:
        """Block i's inputs as put, read back and checked against ``expect``."""
        path = self._path(i)
        if not path.is_file():
            raise KeyError(f"no stored inputs for block {i} ({path})")
        what = f"{path}: stored inputs of block {i} of the Fisher pass"
        try:
            tensors = torch.load(path, weights_only=True)
        except Exception as e:  # a pickle cut short or not one: whatever torch.load raises
            raise ValueError(f"{what} cannot be read ({type(e).__name__}: {e}); delete the partial folder to "
                             f"start again") from e
        if not isinstance(tensors, list) or self.expect is None or len(tensors) != len(self.expect) or any(
                not isinstance(t, torch.Tensor) or tuple(t.shape) != s or t.dtype != d
                for t, (s, d) in zip(tensors, self.expect)):
            raise ValueError(f"{what} are not the {len(self.expect or [])} tensors the pass stored (changed "
                             f"while it ran); delete the partial folder to start again")
        return tensors

    def discard(self, i: int) -> None:
        self._path(i).unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "StoredInputs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
