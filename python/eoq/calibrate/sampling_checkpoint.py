"""Where block-by-block sampling stands, kept every CHECKPOINT_SECONDS so that an interrupted
run goes on from the token it was at (eoq.calibrate.sampling_blockwise.sample_ids).

Why: sampling the default calibration text is 20 minutes of an 8 B model's conversion here
(every sampled token reads the whole model); a conversion that dies in it should not sample
again from the first token.

What sampling holds between two tokens is exact state: the tokens so far, the random
generator's state (torch's global CPU generator, which ``torch.multinomial`` draws from),
and the key/value cache (one [sequences, heads, tokens, head size] pair per layer, float32).
Restored, the next step computes on the same values in the same order: the sequences equal
the uninterrupted run's bit for bit. Only a cache of plain growing layers (transformers'
DynamicLayer: every model eoq converts; not sliding-window ones, which drop positions and
keep counters) is kept; with another the run samples without checkpoints.

Cost: one torch.save of the cache (written under a temporary name and renamed: a file that
exists is complete), up to 0.5 GiB for an 8 B model at 16 x 128 tokens, every two minutes
(13 tokens of 9.4 s there): 1.8-2.3 s a save measured (BENCHMARKS.md). The file names the
run (sequences, length, seed) and is checked before use: a state of another run is ignored,
one that does not hold what sampling keeps is a ValueError naming it.
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional

import torch

FORMAT = "eoq-sampling-checkpoint-1"
CHECKPOINT_SECONDS = 120.0  # a save costs ~1 s at 8 B; an interruption then loses at most 2 minutes


def resumable(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def save(path: os.PathLike, run: dict, ids: torch.Tensor, cache) -> None:
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "run": run, "ids": ids, "rng": torch.get_rng_state(),
                "keys": [layer.keys for layer in cache.layers], "values": [layer.values for layer in cache.layers]},
               tmp)
    os.replace(tmp, path)


def load(path: os.PathLike, run: dict, cache, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The tokens so far of a kept state of this ``run``, its cache put into ``cache`` (empty)
    and its generator state into torch's; None when there is none or it is another run's."""
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    where = f"{path}: the state of interrupted calibration sampling"
    try:
        s = torch.load(path, weights_only=True)
    except Exception as e:  # a file cut short or not a torch.save: whatever torch.load raises
        raise ValueError(f"{where} cannot be read ({type(e).__name__}: {e}); delete the partial folder to "
                         f"start again") from e
    if not isinstance(s, dict) or s.get("format") != FORMAT:
        raise ValueError(f"{where} is not an eoq sampling checkpoint")
    if s.get("run") != run:
        return None
    problem = _problem(s, run, len(cache.layers), dtype)
    if problem:
        raise ValueError(f"{where} is damaged ({problem}); delete the partial folder to start again")
    for layer, k, v in zip(cache.layers, s["keys"], s["values"]):
        layer.update(k, v)
    torch.set_rng_state(s["rng"])
    return s["ids"]


def _problem(s: dict, run: dict, layers: int, dtype: torch.dtype) -> str:
    ids, rng, keys, values = s.get("ids"), s.get("rng"), s.get("keys"), s.get("values")
    n, length = run["sequences"], run["length"]
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] != n \
            or not 2 <= ids.shape[1] <= length:
        return f"tokens {getattr(ids, 'dtype', type(ids))} {tuple(getattr(ids, 'shape', ()))}, expected int64 " \
               f"({n}, 2..{length})"
    if int(ids.min()) < 0 or int(ids.max()) >= run["vocab"]:
        return f"token ids outside the vocabulary (0..{run['vocab'] - 1})"
    if bool((ids[:, 0] != run["bos"]).any()):
        return f"sequences that do not start with BOS ({run['bos']})"
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        return "no generator state"
    if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != layers or len(values) != layers:
        return f"not {layers} layers of keys and values"
    cached = ids.shape[1] - 1  # the last token is sampled, not yet run
    for i, kv in enumerate(zip(keys, values)):
        for t in kv:
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 4 or t.shape[0] != n \
                    or t.shape[2] != cached:
                return f"layer {i}: {getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}, expected " \
                       f"{dtype} ({n}, heads, {cached}, head size)"
    return ""
