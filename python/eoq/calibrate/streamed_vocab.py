"""The vocabulary matrices (token embedding, output head) run from their weight file, without
the matrix held in float32 or its gradient formed.

Why: an 8 B model's embedding and head are 128 256 x 4096 matrices, 2 GiB each in float32,
and in the Fisher pass their gradients are as much again, while the rest of a block-by-block
pass holds about one decoder block (0.9 GiB).
  * The head: ``logits = x W^T`` is computed over row chunks of W read from the stored tensor
    (bf16 as the file has it, a memory map; float32 one chunk at a time), and backward gives
    x's gradient and hands each chunk's weight gradient ``g_c^T x`` to a callback (the
    Fisher pass squares and adds it, eoq.calibrate.sensitivity) instead of forming the whole of it.
  * The embedding: a lookup only reads the rows of the tokens it is given, so those rows are
    read (``embedding_rows``) into a small table the lookup runs on; the gradient of the
    table is the embedding's gradient on those rows, the only ones it has.

eoq.calibrate.blockwise.BlockRunner runs large ones this way (their forward replaced, so hooks on the
modules still fire); the Fisher pass gives the head's callback and reads the tables'
gradients.

Exactness: the embedding's outputs are the very rows. Every logit and every weight gradient
of the head is one dot product, as in the whole head; the chunks only split the output
dimension. x's gradient is a sum over the output dimension, added here chunk after chunk,
and BLAS may block a smaller product differently, so the last bits can differ from the
whole head's (tests/test_blockwise.py bounds the Fisher sums).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# A bias-free Linear head or a plain Embedding of more than this many weights is streamed
# (128 MiB in float32): every real vocabulary matrix (49 152 x 2048 = 100 M for a 1 B model),
# not a tiny test model's.
STREAM_VALUES = 1 << 25

# W rows per chunk: ROWS_VALUES // in_features, the chunk the Fisher sums square at a time
# (sensitivity.CHUNK_ELEMENTS), so each head chunk is one of their additions.
ROWS_VALUES = 1 << 23

# on_grad(first_row, weight gradient of rows first_row.., those rows of W in float32)
OnGrad = Callable[[int, torch.Tensor, torch.Tensor], None]


def head_logits(x: torch.Tensor, stored: torch.Tensor, on_grad: Optional[OnGrad], dtype: torch.dtype) -> torch.Tensor:
    """x W^T for the stored W [out, in] (any float dtype), in ``dtype``, W read in row chunks;
    backward hands each chunk's weight gradient to ``on_grad`` (None: an error, the caller
    did not expect a backward pass)."""
    rows = max(1, ROWS_VALUES // stored.shape[1])
    return _Head.apply(x.to(dtype), stored, on_grad or _unexpected, rows, dtype)


def _unexpected(*_):
    raise RuntimeError("a streamed head was backpropagated through with no gradient callback")


class _Head(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, on_grad, rows, dtype):
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        for r0 in range(0, weight.shape[0], rows):
            out[..., r0:r0 + rows] = torch.matmul(x, weight[r0:r0 + rows].to(dtype).t())
        ctx.save_for_backward(x)
        ctx.weight, ctx.on_grad, ctx.rows, ctx.dtype = weight, on_grad, rows, dtype
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.weight is None:
            raise RuntimeError("a streamed head's graph was backpropagated through twice (its weight is released "
                               "after the first)")
        x, = ctx.saved_tensors
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        gx = torch.zeros_like(x2)
        for r0 in range(0, ctx.weight.shape[0], ctx.rows):
            w = ctx.weight[r0:r0 + ctx.rows].to(ctx.dtype)
            gc = g2[:, r0:r0 + ctx.rows]
            gx.add_(gc @ w)
            ctx.on_grad(r0, gc.t() @ x2, w)
        # The graph can outlive its backward (a caller's logits variable); the weight is a
        # memory map whose touched pages would stay resident with it (1 GiB at 8 B).
        ctx.weight = ctx.on_grad = None
        return gx.reshape(x.shape), None, None, None, None


def head_to_stream(model: torch.nn.Module, weights: set[str]) -> Optional[str]:
    """The module name of the model's output head when it is streamed: a bias-free Linear whose
    weight (one of ``weights``) has more than STREAM_VALUES values; else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or head.weight.numel() <= STREAM_VALUES:
        return None
    name = next((n for n, m in model.named_modules() if m is head), None)
    return name if name is not None and f"{name}.weight" in weights else None


def embedding_to_stream(module: torch.nn.Module) -> bool:
    """Whether an Embedding is streamed: large, and a plain lookup (no max_norm renormalising
    the rows it reads, no gradient scaled by frequency)."""
    return (isinstance(module, torch.nn.Embedding) and module.weight.numel() > STREAM_VALUES
            and module.max_norm is None and not module.scale_grad_by_freq)


def embedding_rows(ids: torch.Tensor, stored: torch.Tensor, padding_idx: Optional[int], dtype: torch.dtype,
                   grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, table, output) of a lookup of ``ids`` in the stored matrix: the distinct token ids
    (sorted), their rows in ``dtype`` (requiring grad when ``grad``), and the lookup itself."""
    rows, inverse = ids.reshape(-1).unique(return_inverse=True)
    if rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= stored.shape[0]):
        raise IndexError(f"token ids outside the embedding's {stored.shape[0]} rows")
    table = stored[rows].to(dtype)
    if grad:
        table.requires_grad_(True)
    pad = None
    if padding_idx is not None:  # the padding row (no gradient) where it is in the table
        hit = (rows == padding_idx).nonzero()
        pad = int(hit[0]) if hit.numel() else None
    out = torch.nn.functional.embedding(inverse.reshape(ids.shape), table, pad)
    return rows, table, out
