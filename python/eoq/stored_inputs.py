"""Each decoder block's input hidden states, kept on disk between the Fisher pass's forward
and backward sweeps (eoq.sensitivity.fisher_pass_blockwise).

Why on disk: the backward sweep recomputes every block from its stored input, in reverse
order, so all of them exist at once: blocks x sequences x tokens x hidden float32, 2.1 GiB
for an 8 B model at the default 8 x 512 tokens and 11 GiB for a 70 B one, more than the
block the pass is otherwise bounded by. In files they cost page cache the kernel can
reclaim, not the process's memory; one block's inputs are read back at a time (64 MiB at
8 B) and each file is deleted as it is read.

The files are torch.save's of the exact tensors (float32 bits, no conversion), so the sums
are those of the in-memory pass bit for bit. They live in a temporary directory under
``where`` (a conversion gives its partial output folder: the disk the output goes to, not
a /tmp that may be memory) and are removed when the pass ends, however it ends.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch


class StoredInputs:
    """put(i, tensors) once per block, then take(i) once per block (any order); a context
    manager that removes whatever is left."""

    def __init__(self, where: Optional[os.PathLike] = None):
        self._dir = tempfile.TemporaryDirectory(prefix="eoq-block-inputs-", dir=where)
        self._count: dict[int, int] = {}

    def _path(self, i: int) -> str:
        return os.path.join(self._dir.name, f"block-{i:05d}.pt")

    def put(self, i: int, tensors: list[torch.Tensor]) -> None:
        torch.save([t.detach().contiguous() for t in tensors], self._path(i))
        self._count[i] = len(tensors)

    def take(self, i: int) -> list[torch.Tensor]:
        """Block i's inputs as put, read back; its file is deleted."""
        if i not in self._count:
            raise KeyError(f"no stored inputs for block {i}")
        path = self._path(i)
        tensors = torch.load(path, weights_only=True)
        os.remove(path)
        if not isinstance(tensors, list) or len(tensors) != self._count.pop(i):
            raise RuntimeError(f"{path}: the stored block inputs were changed while the pass ran")
        return tensors

    def close(self) -> None:
        self._count.clear()
        self._dir.cleanup()

    def __enter__(self) -> "StoredInputs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
