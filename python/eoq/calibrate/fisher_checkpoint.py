"""Where the block-by-block Fisher pass stands, kept after each block so that an interrupted
pass resumes at the block it was in (eoq.calibrate.fisher_blockwise.fisher_pass_blockwise).

Why: the Fisher pass is the longest stage of a calibrated conversion (23 minutes for an
8 B model here); a conversion that dies in it should not start it over.

What the pass holds between blocks of its backward sweep is small and exact:
  - the running sums per parameter (sum g^2, sum g^2 W^2: float64 scalars; the vocabulary
    tensors' row sums: float64 vectors), and the mean squares of the weights already read;
  - the gradient of the log-likelihood at the input of the last block done, one tensor per
    sequence (sequences x tokens x hidden float32: 17 MB for an 8 B model at 8 x 129);
  - for a tied embedding/head, the head's gradient on the rows each sequence's tokens
    select, waiting for the embedding's (eoq.calibrate.sensitivity: the two are added before squaring).
Together with the stored block inputs (eoq.calibrate.stored_inputs, kept in the same folder) that is
everything the rest of the pass reads, so resuming from it gives the uninterrupted pass's
sums bit for bit: the same additions, in the same order, on the same values.

The file (``state.safetensors``) is written under a temporary name and renamed after each
block, and then the block's stored inputs are deleted: a pass killed at any point finds a
state and the inputs it needs. It records the sequences' fingerprint; a state of other
sequences is ignored (the pass starts over). Before anything is trusted, every tensor's
name, dtype and shape is checked against what the pass expects, the block index against
the model's: a damaged state is a ValueError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
from typing import Optional

import torch

FORMAT = "eoq-fisher-checkpoint-1"
STATE_FILE = "state.safetensors"


def fingerprint(sequences: list[torch.Tensor], blocks: int, seed: int) -> str:
    """What a stored state belongs to: the token ids, the block count, the sampling seed."""
    h = hashlib.sha256(f"{blocks}:{seed}:{len(sequences)}".encode())
    for s in sequences:
        h.update(str(tuple(s.shape)).encode())
        h.update(s.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class FisherState:
    """The pass's sums and gradients after a block (module docstring); ``next_block`` is the
    block the backward sweep does next (-1: only the embeddings are left)."""

    def __init__(self, next_block: int, acc: dict, acc_w2: dict, rows: dict, mean_w2: dict[str, float],
                 grads: list[torch.Tensor], pending: list[dict]):
        self.next_block, self.acc, self.acc_w2, self.rows = next_block, acc, acc_w2, rows
        self.mean_w2, self.grads, self.pending = mean_w2, grads, pending


class FisherCheckpoint:
    def __init__(self, root: os.PathLike, fingerprint: str):
        self.root = pathlib.Path(root)
        self.path = self.root / STATE_FILE
        self.fingerprint = fingerprint

    def save(self, s: FisherState) -> None:
        from safetensors.torch import save_file

        t = {}
        for prefix, d in (("acc", s.acc), ("acc_w2", s.acc_w2), ("rows", s.rows)):
            t.update({f"{prefix}.{k}": v.contiguous() for k, v in d.items()})
        t.update({f"grad.{k}": g.contiguous() for k, g in enumerate(s.grads)})
        for k, stash in enumerate(s.pending):
            for f, (sel, g, w) in stash.items():
                t.update({f"pending.{k}.sel.{f}": sel.contiguous(), f"pending.{k}.g.{f}": g.contiguous(),
                          f"pending.{k}.w.{f}": w.contiguous()})
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "next_block": str(s.next_block),
                "mean_w2": json.dumps(s.mean_w2, sort_keys=True)}
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(t, str(tmp), metadata=meta)
        os.replace(tmp, self.path)

    def load(self, blocks: int, firsts: list[str], rows: dict[str, int], shapes: dict[str, tuple],
             grads: list[tuple[tuple, torch.dtype]], tied: set[str]) -> Optional[FisherState]:
        """The kept state, checked against the pass: ``firsts`` the parameters it sums,
        ``rows`` {name: rows} of those with row sums, ``shapes`` {name: shape} of the tied
        matrices, ``grads`` the shape and dtype of each sequence's hidden states; None when
        there is none, or it belongs to other sequences."""
        from safetensors import SafetensorError, safe_open

        if not self.path.is_file():
            return None
        where = f"{self.path}: the state of an interrupted Fisher pass"
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{where} is not an eoq Fisher checkpoint")
                if meta.get("fingerprint") != self.fingerprint:
                    return None
                t = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"{where} cannot be read ({e}); delete the partial folder to start again") from e
        try:
            return _checked(t, meta, blocks, firsts, rows, shapes, grads, tied)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where} is damaged ({e}); delete the partial folder to start again") from e


def _checked(t: dict, meta: dict, blocks: int, firsts: list[str], rows: dict[str, int], shapes: dict[str, tuple],
             grads: list[tuple[tuple, torch.dtype]], tied: set[str]) -> FisherState:
    def take(name: str, shape: tuple, dtype: Optional[torch.dtype]) -> torch.Tensor:
        """(dtype None: any floating type, as a streamed head's rows may be kept in the file's)"""
        x = t.pop(name)
        if tuple(x.shape) != tuple(shape) or (x.dtype != dtype if dtype else not x.is_floating_point()):
            raise ValueError(f"{name} is {x.dtype} {tuple(x.shape)}, expected {dtype or 'floating'} {tuple(shape)}")
        return x

    nxt = int(meta["next_block"])
    if not -1 <= nxt < blocks:
        raise ValueError(f"next block {nxt} outside 0..{blocks - 1}")
    mean_w2 = json.loads(meta["mean_w2"])
    if not isinstance(mean_w2, dict) or any(not isinstance(v, float) or not math.isfinite(v)
                                            for v in mean_w2.values()):
        raise ValueError("mean squares that are not finite numbers")
    acc = {f: take(f"acc.{f}", (), torch.float64) for f in firsts}
    acc_w2 = {f: take(f"acc_w2.{f}", (), torch.float64) for f in firsts}
    row_sums = {f: take(f"rows.{f}", (n,), torch.float64) for f, n in rows.items()}
    g = [take(f"grad.{k}", s, d) for k, (s, d) in enumerate(grads)]
    pending = [{} for _ in grads]
    for name in [n for n in t if n.startswith("pending.") and ".sel." in n]:
        _, k, _, f = name.split(".", 3)
        k = int(k)
        if f not in tied or not 0 <= k < len(grads):
            raise ValueError(f"{name}: not a tied matrix's rows of a sequence")
        sel = t.pop(name)
        if sel.dtype != torch.int64 or sel.dim() != 1 or (sel.numel() and (int(sel.min()) < 0 or
                                                                           int(sel.max()) >= shapes[f][0])):
            raise ValueError(f"{name}: not row indices of {f}")
        shape = (sel.numel(), shapes[f][1])
        pending[k][f] = (sel, take(f"pending.{k}.g.{f}", shape, None), take(f"pending.{k}.w.{f}", shape, None))
    if t:
        raise ValueError(f"tensors the pass does not keep: {sorted(t)[:3]}")
    return FisherState(nxt, acc, acc_w2, row_sums, {str(k): float(v) for k, v in mean_w2.items()}, g, pending)
