"""The default calibration text, sampled from the model, with one decoder block in memory.

Why: ``calibration="self"`` (the default) has the model write its own calibration text
(calibration.sample_text: ``generate`` on the whole loaded model). A model larger than the
machine's memory cannot be loaded whole (an 8 B model is 32 GB in float32), so a folder's
model samples here through eoq.calibrate.blockwise.BlockRunner instead.

How: the batch of sequences is generated one token at a time with a key/value cache
(transformers' DynamicCache); each step is one forward pass of the model run block by
block: the first block's call captured (the new tokens' embeddings, the mask, the cache),
every block read in turn and run on it (each appends its keys and values to its layer of
the cache), then the final norm and head on the last block's output. Sampling is what
sample_text asks ``generate`` for: temperature 1 over the full vocabulary, end-of-text
tokens masked until the length is reached (min_new_tokens = max_new_tokens), one
``torch.multinomial`` draw per step from the seeded generator. On the same model it gives
sample_text's sequences (tests/test_sampling_blockwise.py).

Cost: every step reads every block, so the model is read once per sampled token (129 times
for the default 16 x 128 tokens). The block tensors are copied into one reused set of
float32 buffers (BlockRunner.pool), so a read is a copy from the page cache rather than
fresh memory to fault in; the vocabulary matrices run from their files as in every
block-by-block pass. Memory: one block, the cache (sequences x tokens x layers x 2 x key/value
width, float32: 0.5 GiB for an 8 B model at 16 x 129), one step's logits.

Not applied: the logits processors a folder's generation_config.json may add (a repetition
penalty...); sample_text passes top_k=0, top_p=1, temperature=1 explicitly, and the models
eoq converts leave the rest unset.
"""

from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch


def sample_ids(runner, bos: int, n_sequences: int, length: int, seed: int = 0, progress: bool = False,
               checkpoint: Optional[os.PathLike] = None) -> list[torch.Tensor]:
    """``n_sequences`` sequences of BOS and ``length`` sampled tokens (1-D LongTensors), the
    model run block by block (module docstring). With ``checkpoint`` (a file), the state is
    kept there every sampling_checkpoint.CHECKPOINT_SECONDS, and a run that finds one of the
    same sampling goes on from it, to the same tokens."""
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from . import sampling_checkpoint as ck

    model = runner.model
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    ids = torch.full((n_sequences, 1), int(bos), dtype=torch.long)
    cache = DynamicCache(config=model.config)
    keep = checkpoint is not None and ck.resumable(cache)
    run = {"sequences": n_sequences, "length": length, "seed": int(seed), "bos": int(bos),
           "vocab": int(model.config.vocab_size)}
    runner.pool = {}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            kept = ck.load(checkpoint, run, cache, runner.dtype) if keep else None
            ids = ids if kept is None else kept
            saved = time.monotonic()
            for t in tqdm(range(ids.shape[1] - 1, length), total=length, initial=ids.shape[1] - 1,
                          desc="sampling calibration text", unit="token", disable=not progress):
                new = ids if t == 0 else ids[:, -1:]
                logits = _step(runner, new, ids.shape[1], cache)
                vocab = torch.arange(logits.shape[-1])
                logits = torch.where(torch.isin(vocab, torch.tensor(eos, dtype=torch.long)), -math.inf, logits)
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
                ids = torch.cat([ids, nxt], dim=1)
                if keep and t + 1 < length and time.monotonic() - saved >= ck.CHECKPOINT_SECONDS:
                    ck.save(checkpoint, run, ids, cache)
                    saved = time.monotonic()
    finally:
        runner.pool = None
    return [row.clone() for row in ids]


def _step(runner, new: torch.Tensor, seen: int, cache) -> torch.Tensor:
    """The float32 logits of the last position after ``new`` [batch, tokens] (the sequences'
    tokens up to ``seen`` in all, the earlier ones in ``cache``)."""
    b, n = new.shape
    kwargs = dict(input_ids=new, attention_mask=torch.ones(b, seen, dtype=torch.long),
                  cache_position=torch.arange(seen - n, seen), use_cache=True)
    kwargs[_cache_keyword(runner.model)] = cache
    with runner.outside():
        call = runner.capture_call(**kwargs)
    hidden = call[0][0]
    for i in range(len(runner.blocks)):
        block = runner.load_block(i)
        try:
            hidden = runner.block_forward(block, hidden, call)
        finally:
            runner.drop_block(i)
    # The tail without the cache: the blocks are replays, and a model that derives positions
    # from the cache would see this step's keys already in it (GPT-2: a position past its last)
    tail = dict(input_ids=new, position_ids=kwargs["cache_position"].expand(b, -1), use_cache=False)
    with runner.outside(), runner.tail([hidden]) as current:
        current[0] = 0
        out = runner.model(**tail)
    return out.logits[:, -1, :].to(copy=True, dtype=torch.float32)


def _cache_keyword(model) -> str:
    """What the model's forward calls its cache: ``cache`` from transformers 5.2x on,
    ``past_key_values`` before (and still accepted, with a deprecation warning)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


SAMPLES_FORMAT = "eoq-sampled-ids-1"


def save_samples(path, seqs: list[torch.Tensor]) -> None:
    """The sampled sequences, one [sequences, tokens] int64 tensor, written under a temporary
    name and renamed: sampling is the longest part of an 8 B model's calibration (20 min
    here), and a resumed conversion reads them back instead (load_samples)."""
    import os

    from safetensors.torch import save_file

    tmp = f"{path}.tmp"
    save_file({"ids": torch.stack(seqs).contiguous()}, tmp, metadata={"format": SAMPLES_FORMAT})
    os.replace(tmp, path)


def load_samples(path, n_sequences: int, length: int, vocab: int) -> list[torch.Tensor]:
    """save_samples' sequences, checked against what the conversion asks for (n_sequences of
    BOS and ``length`` tokens, ids below ``vocab``) before they are used; a ValueError naming
    the file otherwise."""
    from safetensors import SafetensorError, safe_open

    where = f"{path}: the sampled calibration text of an interrupted conversion"
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") != SAMPLES_FORMAT or set(f.keys()) != {"ids"}:
                raise ValueError(f"{where} is not an eoq samples file")
            ids = f.get_tensor("ids")
    except SafetensorError as e:
        raise ValueError(f"{where} cannot be read ({e}); delete the partial folder to start again") from e
    want = (n_sequences, length + 1)
    if ids.dtype != torch.int64 or tuple(ids.shape) != want:
        raise ValueError(f"{where} holds {ids.dtype} {tuple(ids.shape)}, where int64 {want} is expected; delete "
                         f"the partial folder to start again")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{where} holds token ids outside the vocabulary (0..{vocab - 1}); delete the partial "
                         f"folder to start again")
    return [row.clone() for row in ids]
