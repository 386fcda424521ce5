"""Per-Linear input statistics for activation-aware quantization.

For every Linear layer (and GPT-2's Conv1D) a forward pre-hook accumulates, per input
channel, the sum of a^2 and of a over all calibration tokens, plus the token count, in
float64. Nothing else is kept, so memory is two vectors per layer whatever the number of
tokens; sequences run one at a time under torch.no_grad.

With ``covariance=True`` (what error feedback needs, eoq.methods.feedback) each Linear also gets
the float64 sum of a a^T over its inputs, n x n. Linears that read the very same input
tensor (q/k/v of an attention block, gate/up of a gated MLP) share one matrix: the first to
see an input accumulates it and the others point to it, so a block costs one matrix per
distinct input. Should the inputs of a sharing Linear ever differ (a model that feeds them
differently on some call), it takes a copy of what was accumulated so far (exactly its own
history, since its inputs were identical until then) and goes on alone. The float model
provides the inputs (not the already-quantized blocks): the statistics do not depend on the
quantization settings, so one calibration serves every conversion; GPTQ's papers find the
difference small at 4 bits and up. Memory: 8 n^2 bytes per distinct input (SmolLM2-135M:
~0.8 GB; Qwen2.5-1.5B 18 GB; an 8 B model ~65 GB). ``collect_stats_blockwise`` runs a
folder's model one block at a time from its files (eoq.calibrate.blockwise), with the same
results bit for bit, and with ``spill_to`` writes each block's matrices to disk as the block
ends (eoq.calibrate.covariance_store), so a conversion holds one block's.

Saved as one safetensors file keyed by module name (``<name>.sum_sq``, ``<name>.sum``,
``<name>.count``, and ``<name>.sum_outer`` for each matrix once, the sharing in the
metadata; a matrix on disk is named by its file, relative to the statistics file's folder),
with the calibration source and token counts in its metadata, and loaded back for reuse
across runs.

Calibration text comes from a file path, a ``datasets`` name (``name[:config[:split]]``,
when the hub or a local cache is reachable), or ``"self"``: text sampled from the model
itself (seeded), which needs no data at all. The WikiText-2 test split is the evaluation
text and is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Iterable, Optional, Union

import torch

from .covariance_store import StoredCovariance, from_reference, outer_of, reference, spill

EVALUATION_TEXTS = ("wiki.test.raw",)


@dataclasses.dataclass
class ActStats:
    sum_sq: torch.Tensor  # float64 [in_features]
    sum: torch.Tensor     # float64 [in_features]
    count: int            # tokens seen
    # float64 [in, in]: sum of a a^T (may be shared between Linears), or a StoredCovariance
    # handle to it on disk (eoq.calibrate.covariance_store: the block pass's bounded memory)
    sum_outer: Optional[Union[torch.Tensor, StoredCovariance]] = None

    @property
    def hessian(self) -> Optional[torch.Tensor]:
        """E[a a^T] (float64), the input covariance error feedback weighs errors with (read
        from its file when stored there: a new tensor at each call)."""
        return None if self.sum_outer is None else outer_of(self.sum_outer) / max(self.count, 1)

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[a^2] per input channel: the importance AWQ and the scale searches use."""
        return (self.sum_sq / max(self.count, 1)).float()

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).float()


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _in_features(module) -> int:
    return module.in_features if isinstance(module, torch.nn.Linear) else module.weight.shape[0]


@contextlib.contextmanager
def recording(model: torch.nn.Module, include: Optional[callable] = None, covariance: bool = False,
              prefix: str = ""):
    """Forward pre-hooks on every Linear (filtered by ``include(name)``) for the duration of the
    block; yields the dict of ActStats they fill (with ``sum_outer`` when covariance), keyed by
    ``prefix`` + the module's name in ``model``."""
    stats: dict[str, ActStats] = {}
    hooks = []
    owner: dict[str, str] = {}      # module -> the module whose sum_outer it shares (itself if none)
    sharers: dict[str, set] = {}    # owner -> the modules sharing its matrix
    seen: dict[str, tuple] = {}     # owner -> (forward call, its input), while sharers of that call are pending
    pending: dict[str, set] = {}    # owner -> sharers that have not run in the owner's latest call
    call = [0]
    last = {"input": None, "name": None}  # the latest input an owner accumulated, in order

    def outer(name, a, n, raw):
        s = stats[name]
        o = owner.get(name)
        if o is None:  # first call: share when the previous Linear read this very tensor
            o = last["name"] if raw is last["input"] and last["name"] is not None else name
            owner[name] = o
            if o == name:
                s.sum_outer = torch.zeros(n, n, dtype=torch.float64)
            else:
                s.sum_outer = stats[o].sum_outer
                sharers.setdefault(o, set()).add(name)
                _ran(o, name)
                return
        elif o != name:
            c, x = seen.get(o, (None, None))
            if c == call[0] and raw is x:
                _ran(o, name)
                return  # the owner accumulated this very input
            # inputs differ now: its own copy of the history so far (identical inputs until
            # this call), without the owner's contribution of this call, and alone from now on
            own = stats[o].sum_outer.clone()
            if c == call[0]:
                xo = x.detach().reshape(-1, n).double()
                own.sub_(xo.t() @ xo)
            s.sum_outer = own
            owner[name] = name
            sharers[o].discard(name)
            _ran(o, name)
        s.sum_outer.addmm_(a.t(), a)
        last["input"], last["name"] = raw, name
        if sharers.get(name):
            seen[name] = (call[0], raw)
            pending[name] = set(sharers[name])

    def _ran(o, name):
        """A sharer of o ran in this call; once all have, o's input reference is dropped."""
        p = pending.get(o)
        if p is not None:
            p.discard(name)
            if not p:
                seen.pop(o, None)
                pending.pop(o, None)

    def hook_for(name, n):
        stats[name] = ActStats(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0)

        def hook(module, args):
            raw = args[0]
            a = raw.detach().reshape(-1, n).double()
            s = stats[name]
            s.sum_sq += a.pow(2).sum(0)
            s.sum += a.sum(0)
            s.count += a.shape[0]
            if covariance:
                outer(name, a, n, raw)

        return hook

    def count_call(module, args):
        call[0] += 1

    if covariance:
        hooks.append(model.register_forward_pre_hook(count_call))
    for name, module in model.named_modules():
        name = prefix + name
        if _is_linear(module) and (include is None or include(name)):
            hooks.append(module.register_forward_pre_hook(hook_for(name, _in_features(module))))
    try:
        yield stats
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def collect_stats(model: torch.nn.Module, sequences: Iterable[torch.Tensor],
                  include: Optional[callable] = None, progress: bool = True,
                  covariance: bool = False) -> dict[str, ActStats]:
    """Run token sequences (1-D LongTensors) through the model, accumulating input statistics
    of every Linear (filtered by ``include(name)``; the input covariance too with covariance)."""
    from tqdm.auto import tqdm

    seqs = list(sequences)
    was_training = model.training
    model.eval()
    try:
        with recording(model, include, covariance) as stats:
            for ids in tqdm(seqs, desc="calibration", disable=not progress):
                model(input_ids=ids.reshape(1, -1))
    finally:
        model.train(was_training)
    return stats


@torch.no_grad()
def collect_stats_blockwise(runner, sequences: Iterable[torch.Tensor], include: Optional[callable] = None,
                            progress: bool = True, covariance: bool = False,
                            spill_to: Optional[os.PathLike] = None) -> dict[str, ActStats]:
    """``collect_stats`` on a model run one block at a time from its files (an
    eoq.calibrate.blockwise.BlockRunner): the same statistics, bit for bit, holding one block instead of
    the model. With covariance each block's matrices exist once that block has run; with
    ``spill_to`` (a folder) they are written there as the block ends and the statistics hold
    handles to them (eoq.calibrate.covariance_store), so memory holds one block's matrices, not
    the model's (8 n^2 bytes per distinct input)."""
    seqs = list(sequences)
    stats: dict[str, ActStats] = {}

    def wanted(name):
        return include is None or include(name)

    @contextlib.contextmanager
    def block_stats(name, block):
        with recording(block, wanted, covariance, prefix=name + ".") as s:
            yield
        if covariance and spill_to is not None:
            spill(s, spill_to, name)
        stats.update(s)

    @contextlib.contextmanager
    def rest_stats(model):
        # The model's own passes run the modules outside the blocks: those before them in the
        # capture pass, those after them (the head) in the tail pass; each is kept from the
        # pass it ran in.
        with recording(model, lambda n: not n.startswith(runner.prefix) and wanted(n), covariance) as s:
            yield
        for n, st in s.items():
            if st.count and n not in stats:
                stats[n] = st

    runner.run(seqs, block_stats, rest_stats, progress=progress)
    order = [n for n, m in runner.model.named_modules() if n in stats]
    return {n: stats[n] for n in order}


def self_stats(model, tokenizer, n_sequences: int, seq_len: int, seed: int = 0, progress: bool = False,
               covariance: bool = False) -> tuple[dict[str, ActStats], str, list[torch.Tensor]]:
    """Statistics recorded while the model samples its own calibration text (no second pass:
    every sampled token goes through every Linear once as it is generated). Returns the
    statistics, the text and the sampled token sequences (BOS first)."""
    model.eval()
    ids: list[torch.Tensor] = []
    with recording(model, covariance=covariance) as stats:
        text = sample_text(model, tokenizer, n_sequences * seq_len, seed, chunk=seq_len, batch=n_sequences,
                           progress=progress, ids_out=ids)
    return stats, text, ids


def save_stats(stats: dict[str, ActStats], path: Union[str, os.PathLike], source: str = "") -> None:
    """Write to a temporary name and rename, so a reader never sees a partial file."""
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    tensors, shared, first, stored = {}, {}, {}, {}
    for name, s in sorted(stats.items()):
        tensors[f"{name}.sum_sq"] = s.sum_sq.contiguous()
        tensors[f"{name}.sum"] = s.sum.contiguous()
        tensors[f"{name}.count"] = torch.tensor([s.count], dtype=torch.int64)
        if s.sum_outer is not None:  # each matrix once; the others name who holds it
            holder = first.setdefault(id(s.sum_outer), name)
            if holder != name:
                shared[name] = holder
            elif isinstance(s.sum_outer, StoredCovariance):  # named, not copied into this file
                stored[name] = reference(s.sum_outer, path)
            else:
                tensors[f"{name}.sum_outer"] = s.sum_outer.contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "eoq-act-stats-1", "source": source,
                                          "modules": json.dumps(sorted(stats)), "shared": json.dumps(shared),
                                          "stored": json.dumps(stored)})
    os.replace(tmp, path)


def load_stats(path: Union[str, os.PathLike]) -> dict[str, ActStats]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "eoq-act-stats-1":
            raise ValueError(f"{path}: not an eoq activation-statistics file (format {meta.get('format')!r})")
        out = {}
        keys = set(f.keys())
        shared = json.loads(meta.get("shared", "{}"))
        stored = json.loads(meta.get("stored", "{}"))
        if not isinstance(stored, dict):
            raise ValueError(f"{path}: the covariance references are malformed")
        for name in json.loads(meta["modules"]):
            try:
                s = ActStats(f.get_tensor(f"{name}.sum_sq"), f.get_tensor(f"{name}.sum"),
                             int(f.get_tensor(f"{name}.count")[0]))
                n = s.sum_sq.numel()
                if s.sum_sq.shape != (n,) or s.sum.shape != (n,):
                    raise ValueError("the vectors' shapes differ")
                if f"{name}.sum_outer" in keys:
                    s.sum_outer = f.get_tensor(f"{name}.sum_outer")
                    if s.sum_outer.shape != (n, n):
                        raise ValueError(f"sum_outer has shape {list(s.sum_outer.shape)}, expected [{n}, {n}]")
                elif name in stored:
                    s.sum_outer = from_reference(stored[name], pathlib.Path(path), n, name)
                out[name] = s
            except Exception as e:  # a missing or mistyped key: say which
                raise ValueError(f"{path}: statistics of {name!r} are missing or damaged ({e})") from e
        for name, holder in shared.items():
            if name not in out or holder not in out or out[holder].sum_outer is None \
                    or out[holder].sum_outer.shape[0] != out[name].sum_sq.numel():
                raise ValueError(f"{path}: {name!r} shares the covariance of {holder!r}, which is missing or of "
                                 f"another width")
            out[name].sum_outer = out[holder].sum_outer
    return out


def load_text(source: str, model=None, tokenizer=None, n_tokens: int = 16384, seed: int = 0,
              progress: bool = False) -> str:
    """Calibration text from a file path, a ``datasets`` name, or ``"self"`` (sampled from the model)."""
    if source == "self":
        if model is None or tokenizer is None:
            raise ValueError("calibration source 'self' needs the model and its tokenizer")
        return sample_text(model, tokenizer, n_tokens, seed, progress=progress)
    p = pathlib.Path(source)
    if p.name in EVALUATION_TEXTS:
        raise ValueError(f"{source} is the evaluation text (WikiText-2 test); never calibrate on it")
    if p.is_file():
        return p.read_text(encoding="utf-8", errors="replace")
    if p.suffix or os.sep in source:
        raise FileNotFoundError(f"calibration text {source} does not exist")
    name, config, split = (source.split(":") + [None, None])[:3]
    if name.endswith("wikitext") and (split or "train") == "test":
        raise ValueError(f"{source}: the WikiText test split is the evaluation text; never calibrate on it")
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"calibration source {source!r} looks like a datasets name; pip install datasets") from e
    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as e:
        raise RuntimeError(f"could not load the dataset {source!r} (offline? give a text file path or 'self'): {e}") from e
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n".join(ds[column])


@torch.no_grad()
def sample_text(model, tokenizer, n_tokens: int, seed: int = 0, chunk: int = 256, batch: int = 16,
                progress: bool = False, ids_out: Optional[list] = None) -> str:
    """Seeded text sampled from the model itself (temperature 1, no top-k/top-p), from BOS:
    ``batch`` sequences of ``chunk`` tokens at a time (a batch costs about what one sequence
    does on a CPU, so this is ~batch times faster than one long sample). ``ids_out`` receives
    the sampled token sequences."""
    from tqdm.auto import tqdm

    bos = sampling_bos(tokenizer)
    pieces = []
    n_seq = -(-n_tokens // chunk)
    with torch.random.fork_rng(devices=[]):  # seed locally, leave the caller's RNG alone
        torch.manual_seed(seed)
        for start in tqdm(range(0, n_seq, batch), desc="sampling calibration text", disable=not progress):
            b = min(batch, n_seq - start)
            out = model.generate(torch.full((b, 1), bos), attention_mask=torch.ones(b, 1, dtype=torch.long),
                                 do_sample=True, max_new_tokens=chunk, min_new_tokens=chunk, top_k=0, top_p=1.0,
                                 temperature=1.0, pad_token_id=bos)
            pieces.append(decode_samples(tokenizer, out))
            if ids_out is not None:
                ids_out += [row.clone() for row in out]
    return "\n".join(pieces)


def sampling_bos(tokenizer) -> int:
    """The token a sampled sequence starts from: BOS, else end-of-text."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def decode_samples(tokenizer, rows) -> str:
    """Sampled sequences (BOS first) as text, one per line."""
    return "\n".join(tokenizer.decode(row[1:].tolist(), skip_special_tokens=True) for row in rows)


def token_sequences(text: str, tokenizer, n_sequences: int = 64, seq_len: int = 512) -> list[torch.Tensor]:
    """n_sequences windows of seq_len tokens, evenly spaced over the tokenised text."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    starts = torch.linspace(0, ids.numel() - seq_len, n_sequences).long().unique()
    return [ids[s:s + seq_len] for s in starts.tolist()]


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
