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
KL_t ~ c_t * D_t with c_t = sum_ij F_ij W_ij^2 / 2 (per token; ``coefficient``). But a
rotated quantizer's error is white within each row, not proportional to W^2, so the
allocator uses KL_t ~ (sum F / 2) * (weighted mean squared error) instead
(``white_coefficient``, eoq.convert.allocate.ERROR_MODEL): the two differ wherever the Fisher
sits on small or large weights, as in Qwen2.5's early down projections (BENCHMARKS.md). The
allocator minimises sum_t KL_t(R_t) under the size budget.

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
from typing import Iterable, Optional, Union

import torch


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

    def white_coefficient(self, name: str) -> Optional[float]:
        """KL per token ~ this * the mean squared error of tensor t's weights, for an error
        spread evenly over each row (rows weighted by their Fisher sums when they differ):
        sum F / 2. What a rotated quantizer's error is (eoq.convert.allocate.ERROR_MODEL)."""
        if not self.tokens or name not in self.fisher:
            return None
        return self.fisher[name] / (2.0 * self.tokens)

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


__all__ = ["Sensitivity", "fisher_pass", "noise_kl", "token_counts", "has_logits", "round_sig"]
