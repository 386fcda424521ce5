"""Sentence embeddings from an encoder (all-MiniLM-L6-v2, see eoq.testing.models.minilm).

Mean pooling of the last hidden state over the attention mask, as the sentence-transformers
``Pooling`` module with ``pooling_mode_mean_tokens`` does; ``normalize=True`` adds the L2
normalisation of all-MiniLM-L6-v2's ``Normalize`` module (cosine similarities are the same
either way).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq, dim] hidden states, [batch, seq] mask -> [batch, dim] masked mean."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return summed / counts


@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences: Union[str, Sequence[str]], *, normalize: bool = False,
                        max_length: int = 256, batch_size: int = 64) -> torch.Tensor:
    """Embeddings [len(sentences), hidden] (float32, on the CPU) of a list of sentences.

    ``model`` is a transformers encoder (``AutoModel``), ``tokenizer`` its tokenizer.
    Sentences are truncated to ``max_length`` tokens (all-MiniLM-L6-v2 uses 256).
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    sentences = list(sentences)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(sentences), batch_size):
            enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            hidden = model(**enc).last_hidden_state
            emb = mean_pool(hidden.float(), enc["attention_mask"])
            if normalize:
                emb = torch.nn.functional.normalize(emb, p=2, dim=1)
            out.append(emb.cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0, int(model.config.hidden_size))
    return torch.cat(out)


__all__ = ["sentence_embeddings", "mean_pool"]
