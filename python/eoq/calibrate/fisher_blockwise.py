"""The Fisher pass with one decoder block in memory at a time (``fisher_pass_blockwise``): the
same sums as eoq.calibrate.sensitivity.fisher_pass, bit for bit, for a model read block by
block from its files (eoq.calibrate.blockwise.BlockRunner). Forward, each block's inputs are
kept on disk (eoq.calibrate.stored_inputs); the tail is run with a graph; then the blocks are
run backward in reverse, each gradient squared and freed as soon as it is complete. The pass
resumes from the block it was in (eoq.calibrate.fisher_checkpoint).
"""

from __future__ import annotations

import os
import shutil
from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm

from . import fisher_checkpoint
from . import sensitivity as sens  # its helpers read through the module: tests patch them there
from .sensitivity import Sensitivity, round_sig
from .stored_inputs import StoredInputs


def _squared_then_freed(add, first: str):
    """A post-accumulate-grad hook: the parameter's gradient into the sums of `first`, then
    dropped (each parameter's own sums get the same additions in the same order as after the
    whole backward pass)."""
    def hook(p: torch.Tensor) -> None:
        with torch.no_grad():
            add(first, p.grad, p)
        p.grad = None
    return hook


class _HeadGradients:
    """The Fisher sums of a streamed head (BlockRunner.head): each chunk's weight gradient of
    the current sequence goes into the sums as it comes; of a tied head, the rows the
    sequence's tokens select are kept aside (as fisher_pass_blockwise does with a whole
    head's gradient) for the embedding step to add its own gradient to."""

    def __init__(self, first: Optional[str], tied: bool, add):
        self.first, self.tied, self.add = first, tied, add
        self.sel, self.pieces = None, []

    def start(self, ids: torch.Tensor) -> None:
        self.sel, self.pieces = ids.reshape(-1).unique(), []

    def __call__(self, r0: int, g: torch.Tensor, w: torch.Tensor) -> None:
        if not self.tied:
            self.add(self.first, g, w, row0=r0)
            return
        local = self.sel[(self.sel >= r0) & (self.sel < r0 + g.shape[0])] - r0
        keep = torch.ones(g.shape[0], dtype=torch.bool)
        keep[local] = False
        self.add(self.first, g[keep], w[keep], keep.nonzero().reshape(-1) + r0)
        self.pieces.append((local + r0, g[local].clone(), w[local].clone()))

    def finish(self, stash: dict) -> None:
        if self.tied and self.pieces:
            sel, g, w = (torch.cat(x) for x in zip(*self.pieces))
            stash[self.first] = (sel, g, w)


def _forward_storing_inputs(runner, calls: list, stored: StoredInputs, progress: bool) -> None:
    """Step 1 of fisher_pass_blockwise, without a graph: each block's input hidden states,
    and the last block's output (the tail's input, stored as block ``len(blocks)``'s), into
    ``stored``. A kept store that already holds blocks 0..j's inputs (an interrupted pass)
    goes on from block j."""
    blocks = len(runner.blocks)
    if not stored.has(0):
        stored.put(0, [args[0] for args, _ in calls])
    done = 0  # blocks whose output is stored
    while done < blocks and stored.has(done + 1):
        done += 1
    hidden = [args[0] for args, _ in calls] if done == 0 else stored.take(done)
    with torch.no_grad():
        for i in tqdm(range(done, blocks), total=blocks, initial=done, desc="sensitivity forward", unit="block",
                      disable=not progress):
            block = runner.load_block(i)
            try:
                hidden = [runner.block_forward(block, h, c) for h, c in zip(hidden, calls)]
            finally:
                runner.drop_block(i)
            stored.put(i + 1, hidden)


class Unsupported(Exception):
    """The block-by-block Fisher pass cannot reproduce this model's gradients exactly."""


def _tail_step(runner, model, seqs: list, inputs, first_of: dict, tied_firsts: set, loaded, add, mean_squares,
               seed: int) -> tuple[list, list]:
    """Step 2 of fisher_pass_blockwise: the tail (final norm, head) run with a graph on each
    sequence's stored last-block output, labels sampled from the model, sum log p(y)
    backpropagated. The matrices outside the blocks (``loaded()``) add their squared gradients
    (``add``); a tied matrix's rows that the sequence's tokens select wait in ``pending`` for
    the embedding's gradient there (they are added before squaring). Returns (the gradient at
    each sequence's tail input, pending)."""
    runner.grad_outside = True
    grads, pending = [], []  # pending[k]: {first: (rows, head gradient there, head rows)} of the tied matrices
    outputs = [None] * len(seqs)
    head = f"{runner.head}.weight" if runner.head is not None else None
    on_head = _HeadGradients(first_of.get(head), first_of.get(head) in tied_firsts, add)
    runner.on_head_grad = on_head if head is not None else None
    gen = torch.Generator().manual_seed(int(seed))
    with runner.outside(), runner.tail(outputs) as current:
        for k, (ids, x) in enumerate(zip(seqs, inputs)):
            current[0] = k
            on_head.start(ids)
            outputs[k] = x.requires_grad_(True)
            sens._backward_sampled_loglik(model(input_ids=ids.reshape(1, -1), use_cache=False).logits, gen)
            grads.append(outputs[k].grad)
            outputs[k] = None
            stash = {}
            with torch.no_grad():
                for n, p in loaded().items():
                    if p.grad is None:
                        continue
                    f = first_of[n]
                    if f in tied_firsts:
                        sel = ids.reshape(-1).unique()
                        keep_rows = torch.ones(p.shape[0], dtype=torch.bool)
                        keep_rows[sel] = False
                        add(f, p.grad[keep_rows], p[keep_rows], keep_rows.nonzero().reshape(-1))
                        stash[f] = (sel, p.grad[sel].clone(), p[sel].detach().clone())
                    else:
                        add(f, p.grad, p)
                    p.grad = None
            on_head.finish(stash)
            pending.append(stash)
        mean_squares()
    runner.on_head_grad = None
    return grads, pending


def fisher_pass_blockwise(runner, sequences: list[torch.Tensor], row_params: Iterable[str] = (), seed: int = 0,
                          progress: bool = False, checkpoint: Optional[os.PathLike] = None) -> Sensitivity:
    """``fisher_pass`` with one decoder block in memory at a time (eoq.calibrate.blockwise.BlockRunner).

    The same sums as the whole-model pass (equal up to the order of float additions): the
    labels are sampled from the same logits with the same generator, and every parameter's
    gradient for a sequence is the one backpropagation through the whole model gives.
      1. Forward, no graph: each block's input hidden states are kept for every sequence, on
         disk (eoq.calibrate.stored_inputs; blocks x sequences x tokens x hidden float32: 2 GiB for an
         8 B model at 8 x 512), under ``runner.scratch``.
      2. The tail (final norm, head) with a graph: labels sampled, sum log p(y) backpropagated
         to the last block's output; the head's gradients taken.
      3. The blocks in reverse order, each read from the files once: every sequence's forward
         recomputed from its stored input, backpropagated from the gradient of its output; the
         block's squared gradients accumulated, its input's gradient passed down.
      4. The embeddings: the model's forward pass up to the first block, with a graph,
         backpropagated from the first block's input gradient.
    A tied matrix (embedding = head) gets its two roles' gradients in steps 2 and 4; its
    squared gradient per sequence needs their sum, so the head's gradient is kept for the rows
    the sequence's tokens select (the only rows an embedding lookup's gradient touches; checked,
    Unsupported otherwise) and the two are added there before squaring.

    With ``checkpoint`` (a folder; a conversion gives one in its partial folder) the pass can
    be interrupted and run again: the block inputs are kept there, and after the tail and
    after each block of step 3 the sums and gradients (eoq.calibrate.fisher_checkpoint), so a new call
    on the same sequences goes on from the block the last one was in and returns the same
    sums bit for bit. The folder is removed when the pass has finished."""

    model = runner.model
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p.dim() == 2 and p.is_floating_point()]
    first_of = {n: n for n in names}
    for first, group in runner.tied.items():
        for n in group:
            first_of[n] = first
    firsts = list(dict.fromkeys(first_of[n] for n in names))
    acc = {n: torch.zeros((), dtype=torch.float64) for n in firsts}
    acc_w2 = {n: torch.zeros((), dtype=torch.float64) for n in firsts}
    row_params = set(row_params)
    shapes = {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)}
    rows = {f: torch.zeros(shapes[f][0], dtype=torch.float64) for f in firsts
            if row_params & {n for n in names if first_of[n] == f}}
    mean_w2: dict[str, float] = {}
    tied_firsts = {f for f in firsts if f in runner.tied}

    def add(first, g, w, sel=None, row0=0):
        """Squared gradient g of parameter `first` (rows `sel` only, when given; else rows
        row0..) into the sums, CHUNK_ELEMENTS at a time: float64 copies of a whole vocabulary
        matrix would cost three times its float32 size (an 8 B model's head: 12 GiB)."""
        step = max(1, sens.CHUNK_ELEMENTS // max(1, g.shape[1]))
        for r0 in range(0, g.shape[0], step):
            g2 = g[r0:r0 + step].double().pow(2)
            acc[first] += g2.sum()
            acc_w2[first] += (g2 * w[r0:r0 + step].double().pow(2)).sum()
            if first in rows:
                if sel is None:
                    rows[first][row0 + r0:row0 + r0 + g2.shape[0]] += g2.sum(1)  # (a chunk may be shorter)
                else:
                    rows[first].index_add_(0, sel[r0:r0 + step], g2.sum(1))

    for n, p in model.named_parameters():
        p.requires_grad_(False)
    seqs = list(sequences)
    with torch.no_grad(), runner.outside():
        calls = runner.capture(seqs)
    expect = [(tuple(args[0].shape), args[0].dtype) for args, _ in calls]
    blocks = len(runner.blocks)
    # The matrices outside the blocks, read by the runner when their module runs (the head in
    # the tail, the embeddings in step 4), each with requires_grad; looked up by name, as
    # each read makes a new Parameter.
    rest = [n for n in first_of if not n.startswith(runner.prefix)]

    def loaded():
        return {n: p for n in rest if (p := runner.loaded_parameter(n)) is not None}

    def mean_squares():  # of the matrices read in this phase, before they are dropped
        for n, p in loaded().items():
            mean_w2.setdefault(n, sens._mean_square(p))

    mark = fisher_checkpoint.fingerprint(seqs, blocks, seed)
    keep = None if checkpoint is None else fisher_checkpoint.FisherCheckpoint(checkpoint, mark)
    state = None if keep is None else keep.load(
        blocks, firsts, {f: r.shape[0] for f, r in rows.items()}, {f: tuple(shapes[f]) for f in tied_firsts},
        expect, tied_firsts)
    stored = StoredInputs(runner.scratch, keep=None if keep is None else keep.root / "inputs", fingerprint=mark,
                          expect=expect)
    with stored:  # 1-3: each block's inputs on disk (eoq.calibrate.stored_inputs)
        if state is None:
            _forward_storing_inputs(runner, calls, stored, progress)
            grads, pending = _tail_step(runner, model, seqs, stored.take(blocks), first_of, tied_firsts, loaded, add,
                                        mean_squares, seed)  # 2
            start = blocks - 1
            if keep is not None:
                keep.save(fisher_checkpoint.FisherState(start, acc, acc_w2, rows, mean_w2, grads, pending))
            stored.discard(blocks)
        else:  # resumed: the sums and gradients as the interrupted pass left them after a block
            acc.update(state.acc)
            acc_w2.update(state.acc_w2)
            rows.update(state.rows)
            mean_w2.update(state.mean_w2)
            grads, pending, start = state.grads, state.pending, state.next_block
        for i in tqdm(range(start, -1, -1), total=start + 1, desc="sensitivity backward", unit="block",
                      disable=not progress):  # 3
            block = runner.load_block(i)
            prefix = runner.block_name(i) + "."
            try:
                params = {prefix + n: p for n, p in block.named_parameters(remove_duplicate=False)}
                hooks = []
                for n, p in params.items():
                    p.requires_grad_(n in first_of)
                    if n in first_of:  # each gradient squared and freed as soon as it is complete, so
                        hooks.append(p.register_post_accumulate_grad_hook(_squared_then_freed(add, first_of[n])))
                for k, (x, call) in enumerate(zip(stored.take(i), calls)):  # its gradients never all exist at once
                    x.requires_grad_(True)
                    runner.block_forward(block, x, call).backward(grads[k])
                    grads[k] = x.grad
                for h in hooks:
                    h.remove()
                with torch.no_grad():
                    for n, p in params.items():
                        if n in first_of:
                            mean_w2[n] = sens._mean_square(p)
            finally:
                runner.drop_block(i)
            if keep is not None:
                keep.save(fisher_checkpoint.FisherState(i - 1, acc, acc_w2, rows, mean_w2, grads, pending))
            stored.discard(i)
    runner.grad_outside = True
    tokens = 0
    with runner.outside():  # 4
        for k, ids in enumerate(seqs):
            (args, _), = runner.capture([ids])
            if args[0].requires_grad:
                args[0].backward(grads[k])
            tokens += int(ids.numel())
            with torch.no_grad():
                for n, p in loaded().items():
                    f = first_of[n]
                    stash = pending[k].get(f)
                    if p.grad is None:  # (a tied head's rows left alone are added below)
                        continue
                    if stash is None:
                        add(f, p.grad, p)
                    else:
                        sel, g_head, _ = stash
                        outside = torch.ones(p.shape[0], dtype=torch.bool)
                        outside[sel] = False
                        if bool(p.grad[outside].any()):
                            raise Unsupported(f"{n}: its gradient reaches rows the sequence's tokens do not select")
                        add(f, p.grad[sel] + g_head, p[sel], sel)
                        del pending[k][f]
                    p.grad = None
                for n, (sel, w, g) in runner.embedding_grads().items():  # a streamed embedding: its rows' gradient
                    f = first_of[n]
                    stash = pending[k].pop(f, None)
                    if stash is not None:  # tied: the head's gradient on the same rows (the sequence's tokens)
                        if not torch.equal(stash[0], sel):
                            raise Unsupported(f"{n}: the embedding's rows are not the tokens' the head's were kept for")
                        g = g + stash[1]
                    add(f, g, w, sel)
                for f, (sel, g_head, w_head) in pending[k].items():  # a tied matrix the embedding pass did not reach
                    add(f, g_head, w_head, sel)
        mean_squares()
    runner.grad_outside = False
    if keep is not None:
        shutil.rmtree(keep.root, ignore_errors=True)
    for n in rest:  # a streamed head, or a matrix neither pass ran: its mean square from the file
        if n not in mean_w2:
            mean_w2[n] = sens._mean_square(runner.source.get(n))  # (bf16 -> float64 chunk by chunk: exact)
    fisher, fisher_w2, out_mean, out_rows = {}, {}, {}, {}
    for n in names:
        f = first_of[n]
        fisher[n], fisher_w2[n] = float(round_sig(acc[f])), float(round_sig(acc_w2[f]))
        out_mean[n] = mean_w2[f] if f in mean_w2 else mean_w2[n]
        if f in rows:
            out_rows[n] = round_sig(rows[f])
    return Sensitivity(tokens, fisher, fisher_w2, out_mean, out_rows)
