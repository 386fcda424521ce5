"""Perplexity and KL divergence of a causal LM on a text, window by window.

Two protocols, recorded in every result:

* ``llama.cpp`` (what ``llama-perplexity`` computes): the whole text is tokenised with a BOS
  in front and cut into non-overlapping windows of ``n_ctx`` tokens (a ragged tail is
  dropped); each window's first token is replaced by BOS, and only the second half is
  scored: the logits at positions j = n_ctx/2 .. n_ctx-2 predict tokens j+1, so a window
  scores n_ctx/2 - 1 tokens, each with at least n_ctx/2 tokens of context.
* ``sliding`` (the Hugging Face recipe): windows of ``n_ctx`` tokens every ``stride``
  tokens; each window scores only the tokens the previous one did not, so every token but
  the first is scored exactly once, with up to n_ctx - stride tokens of context.

Against a base model the same windows run through both models; per scored token the KL
divergence KL(base || model) of the next-token distributions, whether the top-1 tokens
agree, and the probability each gives the correct token are kept (a few floats per token,
never the logits), so memory stays bounded whatever the text length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

PROTOCOLS = ("llama.cpp", "sliding")


@dataclass(frozen=True)
class Window:
    start: int        # first token of the window in the token sequence
    end: int          # one past the last
    first: int        # first scored position (relative): logits there predict token first + 1
    bos: bool         # replace the window's first token by BOS (llama.cpp)

    @property
    def scored(self) -> int:
        return self.end - self.start - 1 - self.first


def windows(n_tokens: int, protocol: str = "llama.cpp", n_ctx: int = 512, stride: int = 256) -> Iterator[Window]:
    """The windows a protocol evaluates over a sequence of n_tokens tokens."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if n_ctx < 4:
        raise ValueError(f"n_ctx must be at least 4, got {n_ctx}")
    if protocol == "llama.cpp":
        for i in range(n_tokens // n_ctx):
            yield Window(i * n_ctx, (i + 1) * n_ctx, n_ctx // 2, True)
        return
    if not 0 < stride <= n_ctx:
        raise ValueError(f"stride must be in 1..n_ctx ({n_ctx}), got {stride}")
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + n_ctx, n_tokens)
        new = end - prev_end                      # tokens not scored yet
        first = max(0, end - begin - new - 1)     # logits at `first` predict the first new token
        if end - begin >= 2:
            yield Window(begin, end, first, False)
        prev_end = end
        if end == n_tokens:
            break


def resolve_device(device=None) -> torch.device:
    """None / "auto": the GPU when torch sees one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """[len, vocab] float32 log-probabilities, on the model's device."""
    ids = ids.reshape(1, -1).to(model.device)
    return model(input_ids=ids).logits[0].float().log_softmax(-1)


def _window_ids(ids: torch.Tensor, w: Window, bos_id: Optional[int]) -> torch.Tensor:
    x = ids[w.start:w.end].clone()
    if w.bos:
        if bos_id is None:
            raise ValueError("the llama.cpp protocol needs a BOS token id")
        x[0] = bos_id
    return x


def _scored(w: Window) -> slice:
    """The rows of a window's log-probabilities that predict scored tokens."""
    return slice(w.first, w.end - w.start - 1)


def token_stats(lp: torch.Tensor, ids: torch.Tensor, w: Window, base_lp: Optional[torch.Tensor] = None) -> dict:
    """Per scored token (CPU tensors): NLL, and against a base: KL(base || model), top-1
    agreement, p(correct). ``lp`` is the window's [len, vocab] log-probabilities; ``base_lp``
    only the scored rows (``_scored(w)``: what a base cache keeps, half a window under the
    llama.cpp protocol). Computed on lp's device; only a few floats per token come back."""
    dev = lp.device
    q = lp[_scored(w)]
    n = q.shape[0]
    target = ids[w.start + w.first + 1:w.end].to(dev)
    rows = torch.arange(n, device=dev)
    out = {"nll": -q[rows, target].double()}
    if base_lp is not None:
        if base_lp.shape != q.shape:
            raise ValueError(f"base log-probabilities {tuple(base_lp.shape)} do not match the scored rows "
                             f"{tuple(q.shape)} of window {w}")
        b = base_lp.to(dev)
        out["kld"] = (b.exp() * (b - q)).sum(-1).double().clamp_min(0)
        out["same_top1"] = (b.argmax(-1) == q.argmax(-1))
        out["dp"] = (q[rows, target].exp() - b[rows, target].exp()).double()
        out["base_nll"] = -b[rows, target].double()
    return {k: v.cpu() for k, v in out.items()}


def _ppl(nll: torch.Tensor) -> dict:
    """PPL with its standard error (delta method on the mean NLL), as llama-perplexity reports."""
    n = nll.numel()
    mean = float(nll.mean()) if n else float("nan")
    var = float(nll.var(unbiased=True)) if n > 1 else 0.0
    se = math.sqrt(var / n) if n > 1 else float("nan")
    ppl = math.exp(mean) if n else float("nan")
    return {"nll": mean, "nll_stderr": se, "ppl": ppl, "ppl_stderr": ppl * se, "tokens": n}


def evaluate_tokens(model, ids: torch.Tensor, base=None, protocol: str = "llama.cpp", n_ctx: int = 512,
                    stride: int = 256, bos_id: Optional[int] = None, max_windows: Optional[int] = None,
                    progress: bool = True, base_cache: Optional[dict] = None) -> dict:
    """Perplexity of ``model`` on a 1-D token sequence, and with ``base`` the KL statistics.
    ``base_cache`` (a dict) keeps the base's log-probabilities per window across calls, for
    comparing many models with one base (float32, scored tokens x vocab per window: under the
    llama.cpp protocol 40 windows of 512 keep 40 x 255 rows, 6.2 GB at a 152k vocabulary)."""
    from tqdm.auto import tqdm

    ids = ids.reshape(-1).long()
    ws = list(windows(ids.numel(), protocol, n_ctx, stride))
    if max_windows is not None:
        ws = ws[:max_windows]
    if not ws:
        raise ValueError(f"{ids.numel()} tokens make no window of the {protocol} protocol (n_ctx {n_ctx})")
    acc: dict[str, list] = {}
    for w in tqdm(ws, desc=f"eval ({protocol})", unit="window", disable=not progress):
        x = _window_ids(ids, w, bos_id)
        lp = _log_probs(model, x)
        base_lp = None
        if base is not None:
            key = (protocol, n_ctx, stride, w)
            if base_cache is not None and key in base_cache:
                base_lp = base_cache[key]
            else:
                # the scored rows alone (half the memory); the base against itself needs no second pass
                base_lp = (lp if base is model else _log_probs(base, x))[_scored(w)].clone()
                if base_cache is not None:
                    base_cache[key] = base_lp
        for k, v in token_stats(lp, ids, w, base_lp).items():
            acc.setdefault(k, []).append(v)
    cat = {k: torch.cat(v) for k, v in acc.items()}
    result = {"protocol": protocol, "n_ctx": n_ctx, "stride": stride if protocol == "sliding" else None,
              "windows": len(ws), **_ppl(cat["nll"])}
    if base is not None:
        kld = cat["kld"]
        base_ppl = _ppl(cat["base_nll"])
        result["base"] = base_ppl
        result["kld"] = {"mean": float(kld.mean()), "median": float(kld.median()),
                         "p99": float(torch.quantile(kld.float(), 0.99)), "max": float(kld.max())}
        result["same_top1"] = float(cat["same_top1"].float().mean())
        result["rms_dp"] = float(cat["dp"].pow(2).mean().sqrt())
        result["ppl_ratio"] = result["ppl"] / base_ppl["ppl"]
    return result


# ---- models, texts, and the whole evaluation -----------------------------------------------

PROMPTS = ("What is the capital of France?", "Write a Python function that checks whether a number is prime.",
           "Give three tips for staying healthy.", "Once upon a time, in a small village by the sea,")


def load_model(model_or_path, dtype=torch.float32, device="cpu"):
    """(model, tokenizer, description) for an eoq folder, a plain HF folder, a .gguf file or a
    PreTrainedModel (whose tokenizer must then be given separately; it stays where it is)."""
    import os
    import pathlib

    import transformers

    if isinstance(model_or_path, transformers.PreTrainedModel):
        return model_or_path.eval(), None, {"kind": "model", "name": type(model_or_path).__name__}
    path = pathlib.Path(os.fspath(model_or_path))
    if path.suffix == ".gguf":
        from ..format.sources import open_source
        source = open_source(path)  # dequantized into a plain model: transformers' GGUF matmuls are slow
        return source.load_model().to(device=device, dtype=dtype).eval(), source.tokenizer, \
            {"kind": "gguf", "name": str(path)}
    if (path / "quant_manifest.json").is_file():
        from ..load.loader import load_quantized
        model, _ = load_quantized(path, dtype=dtype, device=device)
        return model, _tokenizer(path), {"kind": "eoq", "name": str(path)}
    from ..format.sources import model_class
    config = transformers.AutoConfig.from_pretrained(str(path))
    model = model_class(config).from_pretrained(str(path), dtype=dtype).to(device).eval()
    return model, _tokenizer(path), {"kind": "hf-folder", "name": str(path)}


def _tokenizer(folder):
    """The folder's tokenizer, or None when it has none (evaluate then asks for tokenizer=)."""
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                                "vocab.txt", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(str(folder))


def read_text(source: str) -> str:
    """Evaluation text from a file path or a ``datasets`` name (``name[:config[:split]]``, split
    defaulting to test)."""
    import os
    import pathlib

    p = pathlib.Path(source)
    if p.is_file():
        return p.read_text(encoding="utf-8", errors="replace")
    if p.suffix or os.sep in source:
        raise FileNotFoundError(f"evaluation text {source} does not exist")
    name, config, split = (source.split(":") + [None, None])[:3]
    try:
        import datasets
        ds = datasets.load_dataset(name, config, split=split or "test")
    except ImportError as e:
        raise ImportError(f"{source!r} looks like a datasets name; pip install datasets, or give a file") from e
    except Exception as e:
        raise RuntimeError(f"could not load the dataset {source!r} (offline? give a text file path): {e}") from e
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "".join(ds[column])


def fingerprint(model) -> str:
    """sha256 (16 hex digits) of the model's parameters and persistent buffers, in name order."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def generations(model, tokenizer, prompts=PROMPTS, max_new_tokens: int = 48) -> list[str]:
    out = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
        else:
            enc = tokenizer(prompt, return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def sentences_of(text: str, n: int = 256, min_words: int = 4) -> list[str]:
    """Up to n sentence-like lines of a text (WikiText headings and blank lines skipped), evenly spread."""
    lines = [l.strip() for l in text.splitlines()]
    lines = [l for l in lines if len(l.split()) >= min_words and not l.startswith("=")]
    if len(lines) <= n:
        return lines
    step = len(lines) / n
    return [lines[int(i * step)] for i in range(n)]


@torch.no_grad()
def evaluate_encoder(model, base, tokenizer, sentences: list[str]) -> dict:
    """Cosine similarity of the mean-pooled sentence embeddings, base vs model."""
    from .embeddings import sentence_embeddings

    if not sentences:
        raise ValueError("no sentences to embed")
    a = sentence_embeddings(base, tokenizer, sentences)
    b = sentence_embeddings(model, tokenizer, sentences)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).double()
    return {"protocol": "embedding-cosine", "sentences": len(sentences), "cosine": {
        "mean": float(cos.mean()), "p1": float(torch.quantile(cos, 0.01)), "min": float(cos.min())}}


def evaluate(model_or_path, text: str, base=None, protocol: str = "llama.cpp", n_ctx: int = 512, stride: int = 256,
             max_windows: Optional[int] = None, tokenizer=None, out_dir=None, samples: bool = True,
             max_new_tokens: int = 48, progress: bool = True, device=None, dtype=torch.float32) -> dict:
    """Perplexity of a model on a text (file or ``datasets`` name) and, with ``base``, its KL
    divergence from the base window by window; writes ``eval_summary.json`` (and
    ``sample_generations.json`` unless samples=False) into out_dir when given.
    Both models are loaded on ``device`` (None: the GPU when there is one) in ``dtype``."""
    import hashlib
    import json
    import pathlib

    import transformers

    from .._version import __version__

    device = resolve_device(device)
    model, tok, desc = load_model(model_or_path, dtype, device)
    tok = tokenizer or tok
    if tok is None:
        raise ValueError(f"{desc['name']} comes without a tokenizer: pass tokenizer=")
    base_model = base_desc = None
    if base is not None:
        base_model, base_tok, base_desc = load_model(base, dtype, device)
    raw = read_text(text)
    text_info = {"source": str(text), "sha256_16": hashlib.sha256(raw.encode()).hexdigest()[:16]}
    if not model.can_generate():  # an encoder: embeddings against the base's
        if base_model is None:
            raise ValueError("an encoder is evaluated against its base: pass base=")
        sents = sentences_of(raw)
        summary = {"eoq_version": __version__, "transformers_version": transformers.__version__,
                   "torch_version": torch.__version__, "device": str(device),
                   "model": {**desc, "fingerprint": fingerprint(model)},
                   "base": {**base_desc, "fingerprint": fingerprint(base_model)},
                   "text": {**text_info, "sentences": len(sents)},
                   "result": evaluate_encoder(model, base_model, tok, sents)}
        if out_dir is not None:
            out = pathlib.Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval_summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    ids = torch.tensor(tok(raw, add_special_tokens=False)["input_ids"], dtype=torch.long)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if protocol == "llama.cpp" and bos is not None:
        ids = torch.cat([torch.tensor([bos]), ids])  # llama-perplexity tokenises with a BOS first
    result = evaluate_tokens(model, ids, base_model, protocol, n_ctx, stride, bos, max_windows, progress)
    summary = {
        "eoq_version": __version__, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "model": {**desc, "fingerprint": fingerprint(model)},
        "base": {**base_desc, "fingerprint": fingerprint(base_model)} if base_model is not None else None,
        "text": {**text_info, "tokens": int(ids.numel())},
        "result": result,
    }
    sample_rows = None
    if samples:
        mine = generations(model, tok, max_new_tokens=max_new_tokens)
        theirs = generations(base_model, tok, max_new_tokens=max_new_tokens) if base_model is not None else None
        sample_rows = [{"prompt": p, "model": m, **({"base": theirs[i]} if theirs else {})}
                       for i, (p, m) in enumerate(zip(PROMPTS, mine))]
        summary["samples"] = {"prompts": len(PROMPTS), "max_new_tokens": max_new_tokens, "greedy": True}
    if out_dir is not None:
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_summary.json").write_text(json.dumps(summary, indent=2))
        if sample_rows is not None:
            (out / "sample_generations.json").write_text(json.dumps(sample_rows, indent=2, ensure_ascii=False))
    summary["generations"] = sample_rows
    return summary


def format_result(summary: dict) -> str:
    r = summary["result"]
    if r["protocol"] == "embedding-cosine":
        c = r["cosine"]
        return (f"{summary['model']['name']} vs {summary['base']['name']}: {r['sentences']} sentences of "
                f"{summary['text']['source']}\n  embedding cosine mean {c['mean']:.5f} p1 {c['p1']:.5f} min {c['min']:.5f}")
    lines = [f"{summary['model']['name']} on {summary['text']['source']} ({r['protocol']}, n_ctx {r['n_ctx']}"
             + (f", stride {r['stride']}" if r["stride"] else "") + f"; {r['windows']} windows, {r['tokens']} tokens)",
             f"  PPL {r['ppl']:.4f} +/- {r['ppl_stderr']:.4f}   NLL {r['nll']:.5f}"]
    if "kld" in r:
        k = r["kld"]
        lines += [f"  base PPL {r['base']['ppl']:.4f} +/- {r['base']['ppl_stderr']:.4f}   PPL ratio {r['ppl_ratio']:.4f}",
                  f"  KLD mean {k['mean']:.5f} median {k['median']:.5f} p99 {k['p99']:.5f} max {k['max']:.4f}   "
                  f"same top-1 {100 * r['same_top1']:.2f} %   RMS dp {100 * r['rms_dp']:.3f} %"]
    return "\n".join(lines)
