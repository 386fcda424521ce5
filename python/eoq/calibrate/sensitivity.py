"""End-to-end sensitivity: how much the model's output divergence grows with error in each tensor.

Why: a bit spent on one tensor is not worth a bit spent on another. Measured on
SmolLM2-135M, the KL divergence caused by the same relative error differs ~500x between
tensors (v_proj ~20x gate/up; some down projections 50x their median), and a layer's own
output error (the activation-weighted proxy AWQ and GPTQ minimise) does not see that: it
cannot know how the network amplifies an error downstream.

The model: for small weight errors dW the KL divergence of the output distribution per
token is KL ~ 1/2 dW^T F dW, F the Fisher information of the next-token distribution (the
KL's Hessian at dW = 0). With F's diagonal, and errors of different tensors independent,

    KL ~ sum_t sum_ij F_ij dW_ij^2 / 2,

additive over tensors (the "linearity theorem" HIGGS, arXiv 2411.17525, builds on; measured on
SmolLM2-dithered: noise in all 211 tensors at once gives 1.06x the sum of single-tensor
KLs). For a tensor quantized with relative weighted error D_t = sum rho_i a_j dW_ij^2 /
sum rho_i a_j W_ij^2 (a_j = E[x_j^2] of its inputs, rho_i its row weights, as ecsq's
rate-distortion curves measure it), F_ij ~ rho_i a_j up to a constant gives
KL_t ~ c_t * D_t with c_t = sum_ij F_ij W_ij^2 / 2 (per token). The allocator then
minimises sum_t c_t D_t(R_t) under the size budget (eoq.convert.allocate).

How F is estimated (``fisher_pass``): for each calibration sequence, one forward pass; at
every position a next token is *sampled from the model's own distribution* (seeded); one
backward pass of sum_t log p(y_t); the squared gradient is accumulated per weight. With
sampled labels the cross terms between positions have zero mean, so E[g^2] is the sum of
the per-position Fishers (the "true" Fisher, not the empirical one, which uses the data's
labels and is biased). One backward pass per sequence gives every tensor's coefficient, so
the cost is ~3 forward passes per sequence: at 8 sequences of 512 tokens, minutes per
billion parameters on a CPU, against one full forward pass *per tensor* for noise injection.
Cross-checked against noise injection (``noise_kl``) in tests and BENCHMARKS.md.

Kept per 2-D parameter: sum F, sum F W^2 (both float64, rounded to SIG_DIGITS significant
digits so that thread-count-dependent last bits of the gradients cannot change an
allocation), and for the vocabulary tensors (token embedding, output head) the row sums
sum_j F_ij: an embedding row's error matters as often as its token occurs and a head row's
as much as its token is predicted, which the row sums measure directly (a tied matrix gets
both roles' gradient in one). Plus the token counts of the calibration text, the row
weights of an embedding when the model has no output distribution to differentiate
(encoders).

Memory: ``fisher_pass`` holds the whole model and its gradients (2x the float32 model).
``fisher_pass_blockwise`` (what a conversion from a folder uses) gives the same sums with one
decoder block and its gradients in memory, plus every block's input hidden states for the
Fisher sequences (eoq.calibrate.blockwise; 2 GiB for an 8 B model at 8 x 512 tokens). The embedding
and the head are read in different steps, and large ones not whole (eoq.calibrate.streamed_vocab):
the head runs from its file in row chunks, its weight gradient squared and added chunk by
chunk; the embedding reads the rows its tokens select, and its gradient is those rows'.
Each block parameter's gradient is squared and freed as soon as it is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Iterable, Optional, Union

import torch

from . import fisher_checkpoint
from .stored_inputs import StoredInputs

SIG_DIGITS = 9
FORMAT = "eoq-sensitivity-1"


def round_sig(x: torch.Tensor, digits: int = SIG_DIGITS) -> torch.Tensor:
    """x (float64) rounded to `digits` significant digits, elementwise (zeros stay zero)."""
    x = x.double()
    mag = torch.where(x != 0, x.abs(), torch.ones_like(x)).log10().floor()
    scale = torch.pow(10.0, digits - 1 - mag)
    return torch.round(x * scale) / scale


@dataclasses.dataclass
class Sensitivity:
    tokens: int                                   # positions the Fisher sums are over (0: none measured)
    fisher: dict[str, float]                      # sum_ij F_ij per 2-D parameter
    fisher_w2: dict[str, float]                   # sum_ij F_ij W_ij^2
    mean_w2: dict[str, float]                     # mean W^2 (for white-noise predictions)
    rows: dict[str, torch.Tensor]                 # sum_j F_ij of the vocabulary tensors (float64)
    token_counts: Optional[torch.Tensor] = None   # int64 [vocab]: the calibration tokens
    count_tokens: int = 0                         # how many tokens token_counts sums

    def coefficient(self, name: str) -> Optional[float]:
        """c_t: KL per token ~ c_t * (relative weighted squared error of tensor t)."""
        if not self.tokens or name not in self.fisher_w2:
            return None
        return self.fisher_w2[name] / (2.0 * self.tokens)

    def noise_coefficient(self, name: str) -> Optional[float]:
        """KL per token ~ this * eps for white noise of relative mean square eps in tensor t."""
        if not self.tokens or name not in self.fisher:
            return None
        return self.fisher[name] * self.mean_w2[name] / (2.0 * self.tokens)

    def row_weights(self, name: str, input_embedding: bool = False) -> tuple[Optional[torch.Tensor], int]:
        """(row importance, tokens it sums over) of a vocabulary tensor: its Fisher row sums;
        for the input embedding of a model without them (an encoder), the token counts."""
        if name in self.rows and self.tokens:
            return self.rows[name], self.tokens
        if input_embedding and self.token_counts is not None and self.count_tokens:
            return self.token_counts.double(), self.count_tokens
        return None, 0

    # ---- files ---------------------------------------------------------------------------

    def save(self, path: Union[str, os.PathLike]) -> None:
        from safetensors.torch import save_file

        tensors = {f"rows.{k}": v.contiguous() for k, v in self.rows.items()}
        if self.token_counts is not None:
            tensors["token_counts"] = self.token_counts.contiguous()
        meta = {"format": FORMAT, "scalars": json.dumps(
            {"tokens": self.tokens, "fisher": self.fisher, "fisher_w2": self.fisher_w2, "mean_w2": self.mean_w2,
             "count_tokens": self.count_tokens}, sort_keys=True)}
        path = pathlib.Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Sensitivity":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not an eoq sensitivity file (format {meta.get('format')!r})")
            try:
                s = json.loads(meta["scalars"])
                rows = {k[len("rows."):]: f.get_tensor(k) for k in f.keys() if k.startswith("rows.")}
                counts = f.get_tensor("token_counts") if "token_counts" in f.keys() else None
                return cls(int(s["tokens"]), {k: float(v) for k, v in s["fisher"].items()},
                           {k: float(v) for k, v in s["fisher_w2"].items()},
                           {k: float(v) for k, v in s["mean_w2"].items()}, rows, counts, int(s["count_tokens"]))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: damaged sensitivity file ({type(e).__name__}: {e})") from e


def token_counts(sequences: Iterable[torch.Tensor], vocab: int) -> tuple[torch.Tensor, int]:
    ids = torch.cat([s.reshape(-1) for s in sequences]) if sequences else torch.zeros(0, dtype=torch.long)
    ids = ids[(ids >= 0) & (ids < vocab)]
    return torch.bincount(ids, minlength=vocab).to(torch.int64), int(ids.numel())


def has_logits(model) -> bool:
    """Whether the model has an output distribution over tokens to differentiate."""
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


def fisher_pass(model, sequences: list[torch.Tensor], row_params: Iterable[str] = (), seed: int = 0,
                progress: bool = False) -> Sensitivity:
    """Diagonal-Fisher sums of every 2-D floating parameter over the sequences (module docstring).
    ``row_params``: parameter names whose row sums are kept (the vocabulary tensors)."""
    from tqdm.auto import tqdm

    params = {n: p for n, p in model.named_parameters(remove_duplicate=False)
              if p.dim() == 2 and p.is_floating_point()}
    unique: dict[int, list[str]] = {}
    for n, p in params.items():
        unique.setdefault(id(p), []).append(n)
    first = {ids[0]: ids for ids in unique.values()}
    acc = {n: torch.zeros((), dtype=torch.float64) for n in first}
    acc_w2 = {n: torch.zeros((), dtype=torch.float64) for n in first}
    row_params = set(row_params)
    rows = {n: torch.zeros(params[n].shape[0], dtype=torch.float64)
            for n, names in first.items() if row_params & set(names)}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    gen = torch.Generator().manual_seed(int(seed))
    tokens = 0
    try:
        for ids in tqdm(sequences, desc="sensitivity", disable=not progress):
            _backward_sampled_loglik(model(input_ids=ids.reshape(1, -1)).logits, gen)
            tokens += int(ids.numel())
            with torch.no_grad():
                for n in first:
                    p = params[n]
                    g2 = p.grad.double().pow(2)
                    acc[n] += g2.sum()
                    acc_w2[n] += (g2 * p.double().pow(2)).sum()
                    if n in rows:
                        rows[n] += g2.sum(1)
                    p.grad = None
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    fisher, fisher_w2, mean_w2, out_rows = {}, {}, {}, {}
    with torch.no_grad():
        for n, names in first.items():
            f, fw = float(round_sig(acc[n])), float(round_sig(acc_w2[n]))
            mw = _mean_square(params[n])
            for alias in names:  # a tied matrix answers to each of its names
                fisher[alias], fisher_w2[alias], mean_w2[alias] = f, fw, mw
                if n in rows:
                    out_rows[alias] = round_sig(rows[n])
    return Sensitivity(tokens, fisher, fisher_w2, mean_w2, out_rows)


CHUNK_ELEMENTS = 1 << 23  # rows of a parameter squared in float64 at a time (64 MiB)
LOGP_ROWS = 64  # tokens' log-probabilities formed at a time (32 MiB at a 128 k vocabulary)


def _backward_sampled_loglik(logits: torch.Tensor, gen: torch.Generator) -> None:
    """Backpropagate sum_t log p(y_t) from one sequence's logits [1, T, V], each label y_t
    drawn from p_t = softmax(logits_t) with ``gen``.

    The logits' gradient, onehot(y) - p, is formed in one float32 buffer that first holds p,
    where autograd through log_softmax and gather allocates log p, the scattered one-hot, log
    p's gradient and the logits' gradient, each T x V (250 MiB at 512 tokens of a 128 k
    vocabulary). log p is taken LOGP_ROWS rows at a time (row by row the same values as
    whole), so the labels are those exp(log_softmax) sampling drew."""
    src = logits.detach()[0]
    with torch.no_grad():
        grad = torch.empty(src.shape, dtype=torch.float32)
        for r0 in range(0, src.shape[0], LOGP_ROWS):
            grad[r0:r0 + LOGP_ROWS] = torch.log_softmax(src[r0:r0 + LOGP_ROWS].float(), dim=-1)
        probs = grad.exp_()
        y = torch.multinomial(probs, 1, generator=gen)
        grad = probs.neg_().scatter_add_(1, y, torch.ones(y.shape, dtype=grad.dtype))
    logits.backward(grad.to(logits.dtype).reshape(logits.shape))


def _mean_square(p: torch.Tensor) -> float:
    """mean p^2 in float64, CHUNK_ELEMENTS at a time, rounded as fisher_pass rounds it."""
    step = max(1, CHUNK_ELEMENTS // max(1, p.shape[1]))
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for r0 in range(0, p.shape[0], step):
            total += p[r0:r0 + step].double().pow(2).sum()
    return float(round_sig(total / p.numel()))


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
    from tqdm.auto import tqdm

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
    from tqdm.auto import tqdm

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
        step = max(1, CHUNK_ELEMENTS // max(1, g.shape[1]))
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
            mean_w2.setdefault(n, _mean_square(p))

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
            runner.grad_outside = True
            grads, pending = [], []  # pending[k]: {first: (rows, head gradient there, head rows)} of the tied matrices
            outputs = [None] * len(seqs)
            head = f"{runner.head}.weight" if runner.head is not None else None
            on_head = _HeadGradients(first_of.get(head), first_of.get(head) in tied_firsts, add)
            runner.on_head_grad = on_head if head is not None else None
            gen = torch.Generator().manual_seed(int(seed))
            with runner.outside(), runner.tail(outputs) as current:  # 2
                for k, (ids, x) in enumerate(zip(seqs, stored.take(blocks))):
                    current[0] = k
                    on_head.start(ids)
                    outputs[k] = x.requires_grad_(True)
                    _backward_sampled_loglik(model(input_ids=ids.reshape(1, -1), use_cache=False).logits, gen)
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
                            mean_w2[n] = _mean_square(p)
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
            mean_w2[n] = _mean_square(runner.source.get(n))  # (bf16 -> float64 chunk by chunk: exact)
    fisher, fisher_w2, out_mean, out_rows = {}, {}, {}, {}
    for n in names:
        f = first_of[n]
        fisher[n], fisher_w2[n] = float(round_sig(acc[f])), float(round_sig(acc_w2[f]))
        out_mean[n] = mean_w2[f] if f in mean_w2 else mean_w2[n]
        if f in rows:
            out_rows[n] = round_sig(rows[f])
    return Sensitivity(tokens, fisher, fisher_w2, out_mean, out_rows)


@torch.no_grad()
def noise_kl(model, sequences: list[torch.Tensor], names: Iterable[str], rel_mse: float, seed: int = 0,
             progress: bool = False) -> dict[str, float]:
    """Mean KL(base || noisy) per token when one tensor at a time gets seeded Gaussian noise of
    relative mean square ``rel_mse`` (||dW||^2 / ||W||^2): the direct measurement the Fisher
    estimate stands in for. One forward pass over all sequences per tensor."""
    from tqdm.auto import tqdm

    params = dict(model.named_parameters(remove_duplicate=False))
    model.eval()
    base = [torch.log_softmax(model(input_ids=s.reshape(1, -1)).logits[0].float(), -1) for s in sequences]
    out = {}
    for k, name in enumerate(tqdm(list(names), desc="noise injection", disable=not progress)):
        p = params[name]
        saved = p.detach().clone()
        g = torch.Generator().manual_seed(int(seed) * 1000003 + k)
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        p.add_((noise * (rel_mse * float(saved.double().pow(2).mean())) ** 0.5).to(p.dtype))
        try:
            total = n = 0.0
            for s, lb in zip(sequences, base):
                lq = torch.log_softmax(model(input_ids=s.reshape(1, -1)).logits[0].float(), -1)
                total += float((lb.exp() * (lb - lq)).sum())
                n += s.numel()
            out[name] = total / n
        finally:
            p.copy_(saved)
    return out


__all__ = ["Sensitivity", "fisher_pass", "fisher_pass_blockwise", "Unsupported", "noise_kl", "token_counts", "has_logits", "round_sig"]
