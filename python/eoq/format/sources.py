"""Where a conversion reads its model from: a local HF folder, a hub id, a GGUF file, or a
PreTrainedModel in memory, behind one interface (``Source``).

A folder is read tensor by tensor from its safetensors (memory-mapped), so a data-free
conversion never holds the model; the module structure (which parameters are Linear
weights, embeddings, the output head, which are tied) comes from the model class built on
the meta device, which allocates nothing. A GGUF file is loaded whole by transformers'
GGUF loader (dequantized into memory, as transformers does); its ``quantization_config``
(``quant_method: gguf``) describes the input, not the output, and is dropped.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
from typing import Optional

import torch

EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.txt", "vocab.json",
               "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
               "chat_template.json", "generation_config.json", "preprocessor_config.json",
               # sentence-transformers' description of the pooling, so the folder stays usable there too
               "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
EXTRA_DIRS = ("1_Pooling",)


def model_class(config):
    """The transformers class config.architectures names; a clear error for anything else."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise ValueError(f"unsupported model: config.json names no architecture (model_type "
                         f"{getattr(config, 'model_type', None)!r})")
    cls = getattr(transformers, archs[0], None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise ValueError(f"unsupported architecture {archs[0]!r}: transformers {transformers.__version__} has no such "
                         f"model class (custom code models are not supported)")
    return cls


def module_roles(model: torch.nn.Module) -> dict[str, str]:
    """parameter name -> role: linear, conv1d (GPT-2's transposed Linear), embedding, lm_head, other."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    roles = {}
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if module is out_emb and isinstance(module, torch.nn.Linear):
            role = "lm_head"
        elif isinstance(module, torch.nn.Linear):
            role = "linear"
        elif type(module).__name__ == "Conv1D":
            role = "conv1d"
        elif isinstance(module, torch.nn.Embedding):
            role = "embedding"
        else:
            continue
        roles[prefix + "weight"] = role
    return roles


def vocab_params(model) -> dict[str, str]:
    """The weights with one row per token: {name: "input"|"output"} for the token embedding and
    the output head (a tied matrix under both its names). Their rows get row importance."""
    out = {}
    for role, get in (("input", "get_input_embeddings"), ("output", "get_output_embeddings")):
        try:
            module = getattr(model, get)() if hasattr(model, get) else None
        except (NotImplementedError, AttributeError):
            module = None
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        for name, p in model.named_parameters(remove_duplicate=False):
            if p is weight:
                out.setdefault(name, role)
    return out


def tied_map(model) -> dict[str, str]:
    """tied parameter -> the parameter it is tied to (transformers' own table)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {k: v for k, v in tied.items() if k != v}


class Source:
    kind: str
    name: str
    config = None              # PretrainedConfig, without any input quantization_config
    names: list[str]           # parameter names as the output stores them, sorted
    roles: dict[str, str]
    tied: dict[str, str]
    vocab: dict[str, str]      # token embedding / output head -> "input" / "output"
    largest_shard_bytes: int = 0
    tokenizer = None
    out_dtype: Optional[torch.dtype] = None  # store floating tensors in this dtype (None: as they are)

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def spec(self, name: str) -> torch.Tensor:
        """The tensor's shape and dtype on the meta device, without reading its data."""
        return self.get(name).to("meta")

    def ref(self, name: str):
        """What a job running elsewhere (a Ray task) needs to get the tensor: here the tensor
        itself; a folder gives a TensorRef, read where the job runs (``resolve``)."""
        return self.get(name)

    def load_model(self):
        """The model in memory (for calibration)."""
        raise NotImplementedError

    def release_model(self) -> None:
        pass

    def save_extras(self, out: pathlib.Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out))

    base_model: Optional[str] = None  # the hub id the weights come from, when known

    @property
    def location(self) -> str:
        """Where the weights were read from (a local path or a hub id): for resuming, never published."""
        return self.name

    def describe(self) -> dict:
        """What the manifest and the card say about the source: a hub id or a file / folder name,
        never a local path."""
        d = {"kind": self.kind, "name": public_name(self.name), "architecture": (self.config.architectures or [None])[0],
             "model_type": getattr(self.config, "model_type", None)}
        if self.base_model:
            d["base_model"] = self.base_model
        return d


def public_name(name: str) -> str:
    """A hub id stays as it is; a local path becomes its last component."""
    if is_hub_id(name):
        return name
    return pathlib.PurePath(str(name).rstrip("/\\")).name or str(name)


def is_hub_id(name: str) -> bool:
    import re
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(name)) is not None and not os.path.exists(name)


def hub_id_of_cache_folder(folder: pathlib.Path) -> Optional[str]:
    """The hub id of a huggingface_hub cache snapshot (.../models--ORG--NAME/snapshots/REV)."""
    parts = pathlib.Path(folder).resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            org_name = part[len("models--"):].split("--", 1)
            return "/".join(org_name) if len(org_name) == 2 else None
    return None


def gguf_base_model(path: pathlib.Path) -> Optional[str]:
    """The hub id a GGUF file's metadata names as its source or base model, if any."""
    try:
        from gguf import GGUFReader
        fields = GGUFReader(str(path)).fields
    except Exception:
        return None

    def text(key):
        f = fields.get(key)
        if f is None or not f.data:
            return None
        try:
            return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
        except Exception:
            return None

    for key in ("general.base_model.0.repo_url", "general.source.repo_url", "general.source.url"):
        url = text(key)
        if url and "huggingface.co/" in url:
            hub = url.split("huggingface.co/", 1)[1].strip("/")
            if is_hub_id(hub):
                return hub
    org, name = text("general.base_model.0.organization"), text("general.base_model.0.name")
    if org and name and is_hub_id(f"{org}/{name}".replace(" ", "-")):
        return f"{org}/{name}".replace(" ", "-")
    return None


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor in a safetensors file, by path and checkpoint key: a job carries this instead of
    the data, and the worker reads the tensor itself from storage every node sees."""
    file: str
    key: str


def read_tensor(file: str, key: str) -> torch.Tensor:
    """One tensor of a safetensors file; a clear error naming the file and the key."""
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as f:
            return f.get_tensor(key)
    except Exception as e:
        raise ValueError(f"{file}: cannot read tensor {key!r} ({e})") from e


def resolve(ref) -> torch.Tensor:
    """The tensor a Source.ref stands for."""
    return read_tensor(ref.file, ref.key) if isinstance(ref, TensorRef) else ref


class ModelSource(Source):
    """A PreTrainedModel in memory (also what a GGUF file becomes)."""

    def __init__(self, model, tokenizer=None, kind: str = "model", name: Optional[str] = None):
        self.model, self.tokenizer, self.kind = model, tokenizer, kind
        self.name = name or getattr(model.config, "name_or_path", "") or type(model).__name__
        self.config = _clean_config(model.config)
        if not getattr(self.config, "architectures", None):  # e.g. a config transformers made from GGUF
            self.config.architectures = [type(model).__name__]
        model_class(self.config)  # refuse what a loader could not rebuild
        self.tied = tied_map(model)
        self._sd = model.state_dict()
        self.names = sorted(self._sd)
        self.roles, self.vocab = module_roles(model), vocab_params(model)

    def get(self, name):
        return self._sd[name]

    def load_model(self):
        return self.model


class FolderSource(Source):
    """A local HF folder with safetensors weights (one file or shards with an index)."""

    def __init__(self, folder, kind: str = "hf-folder", name: Optional[str] = None):
        from transformers import AutoConfig, AutoTokenizer

        self.folder = pathlib.Path(folder)
        self.kind, self.name = kind, name or str(folder)
        self.base_model = hub_id_of_cache_folder(self.folder) or (name if kind == "hub" else None)
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"{self.folder}: no config.json; not a Hugging Face model folder")
        self.config = _clean_config(AutoConfig.from_pretrained(str(self.folder)))
        cls = model_class(self.config)
        with torch.device("meta"):
            skeleton = cls(self.config)
        self.roles, self.tied, self.vocab = module_roles(skeleton), tied_map(skeleton), vocab_params(skeleton)
        model_keys = set(skeleton.state_dict())
        prefix = getattr(skeleton, "base_model_prefix", "") or ""
        self._files = self._index()
        self._check_shards()
        self._key = {self._model_key(k, model_keys, prefix): k for k in self._files}  # output name -> checkpoint key
        for target, tied_to in self.tied.items():  # HF checkpoints store a tied pair once; list both
            if target not in self._key and tied_to in self._key:
                self._key[target] = self._key[tied_to]
        self.names = sorted(self._key)
        self.largest_shard_bytes = max(os.path.getsize(f) for f in set(self._files.values()))
        self._handles: dict[str, object] = {}
        self._model = None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        except Exception:  # encoders without a tokenizer, image models...: the files are copied as they are
            self.tokenizer = None

    def _index(self) -> dict[str, str]:
        from . import repo

        if not (self.folder / repo.INDEX).is_file() and not (self.folder / repo.WEIGHTS).is_file():
            bins = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = f" (found {bins}: save the model with safetensors first)" if bins else ""
            raise FileNotFoundError(f"{self.folder}: no {repo.WEIGHTS} or {repo.INDEX}{hint}")
        return repo.weight_files(self.folder)

    def _check_shards(self) -> None:
        """Every shard's header against the index, before any work: a tensor the index puts
        in a file that lacks it, or a file holding tensors the index does not list (a shard
        from another version of the model), is an error naming the file, not a failure an
        hour into a conversion."""
        from safetensors import safe_open

        from . import repo

        listed: dict[str, set] = {}
        for key, file in self._files.items():
            listed.setdefault(file, set()).add(key)
        for file, keys in sorted(listed.items()):
            try:
                with safe_open(file, "pt") as f:
                    stored = set(f.keys())
            except Exception as e:
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
            missing, extra = sorted(keys - stored), sorted(stored - keys)
            if missing or extra:
                what = []
                if missing:
                    what.append(f"lacks {len(missing)} tensor(s) the index puts there ({', '.join(missing[:3])}"
                                f"{', ...' if len(missing) > 3 else ''})")
                if extra:
                    what.append(f"holds {len(extra)} tensor(s) the index does not list ({', '.join(extra[:3])}"
                                f"{', ...' if len(extra) > 3 else ''})")
                raise ValueError(f"{file}: does not match the shard index {self.folder / repo.INDEX}"
                                 f": it {' and '.join(what)}")

    @staticmethod
    def _model_key(key: str, model_keys: set, prefix: str) -> str:
        """A checkpoint key as the model names it (a base-model checkpoint lacks the head's prefix)."""
        if key in model_keys or not prefix:
            return key
        if f"{prefix}.{key}" in model_keys:
            return f"{prefix}.{key}"
        if key.startswith(prefix + ".") and key[len(prefix) + 1:] in model_keys:
            return key[len(prefix) + 1:]
        return key

    def _read(self, name: str, what: str, read):
        """read(handle, key) on the safetensors file holding `name`; a clear error naming the file."""
        from safetensors import safe_open

        key = self._key[name]
        file = self._files[key]
        try:
            if file not in self._handles:
                self._handles[file] = safe_open(file, "pt")
            return read(self._handles[file], key)
        except Exception as e:
            raise ValueError(f"{file}: cannot read {what} {key!r} ({e})") from e

    def get(self, name):
        # Not through the cached handles: a tensor is a view of its file's memory map, and the
        # pages it touched stay resident as long as the map is open. Opened per tensor, the map
        # goes with the tensor, so a conversion's RSS holds the tensors in use, not every shard
        # read so far (15 GB for an 8 B model).
        key = self._key[name]
        return read_tensor(self._files[key], key)

    def ref(self, name):
        key = self._key[name]
        return TensorRef(str(pathlib.Path(self._files[key]).absolute()), key)

    def spec(self, name):
        def header(f, key):
            sl = f.get_slice(key)
            return torch.empty(sl.get_shape(), dtype=_SAFETENSORS_DTYPES[sl.get_dtype()], device="meta")

        return self._read(name, "the header of tensor", header)

    def load_model(self):
        if self._model is None:
            cls = model_class(self.config)
            # float32: CPUs without bf16 units run a bf16 model many times slower, and the
            # statistics are accumulated in float64 anyway
            self._model = cls.from_pretrained(str(self.folder), dtype=torch.float32)
            self._model.eval()
        return self._model

    def release_model(self):
        self._model = None

    @property
    def location(self) -> str:
        return str(self.folder.resolve())

    def describe(self) -> dict:
        d = super().describe()
        if (self.folder / "README.md").is_file():  # the source card's license carries over
            try:
                from huggingface_hub import ModelCard
                license_ = ModelCard.load(str(self.folder / "README.md")).data.license
            except Exception:
                license_ = None
            if license_:
                d["license"] = license_
        return d

    def save_extras(self, out):
        for name in EXTRA_FILES:
            if (self.folder / name).is_file():
                shutil.copy2(self.folder / name, out / name)
        for name in EXTRA_DIRS:
            if (self.folder / name).is_dir():
                shutil.copytree(self.folder / name, out / name)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


def _clean_config(config):
    """A copy without an input quantization_config (e.g. GGUF's), which must not reach the output."""
    import copy

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def open_source(model_or_path, gguf_file: Optional[str] = None, tokenizer=None, dtype=None) -> Source:
    """A Source for a PreTrainedModel, a local folder, a .gguf path, or a hub id. ``dtype``
    (any source) stores floating tensors in that dtype; a GGUF defaults to bfloat16."""
    source = _open(model_or_path, gguf_file, tokenizer)
    if dtype is not None:
        source.out_dtype = dtype
    return source


def _open(model_or_path, gguf_file, tokenizer) -> Source:
    import transformers

    if isinstance(model_or_path, transformers.PreTrainedModel):
        return ModelSource(model_or_path, tokenizer)
    path = pathlib.Path(os.fspath(model_or_path))
    if path.suffix == ".gguf" or gguf_file:
        gguf = path if path.suffix == ".gguf" else path / gguf_file
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {gguf} does not exist")
        return _gguf_source(gguf)
    if path.is_dir():
        return FolderSource(path)
    if path.exists():
        raise ValueError(f"{path}: expected a model folder, a .gguf file or a hub id")
    return _hub_source(str(model_or_path))


def _gguf_source(gguf: pathlib.Path) -> ModelSource:
    """Loaded in float32 (exact for GGUF's grids, and fast for calibration on a CPU); stored in
    bfloat16 unless a dtype is asked for."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as e:
        raise ImportError(f"{gguf}: reading GGUF needs the gguf and accelerate packages ({e})") from e
    # transformers keeps GGUF weights packed and dequantizes them in every matmul; a plain
    # model with the dequantized weights runs the calibration pass several times faster.
    plain_config = _clean_config(model.config)
    with torch.device("meta"):
        plain = type(model)(plain_config)
    plain.load_state_dict(model.state_dict(), assign=True)
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary inv_freq) too
        owner, _, attr = name.rpartition(".")
        plain.get_submodule(owner).register_buffer(attr, buf, persistent=name in model.state_dict())
    plain.tie_weights()
    plain.eval()
    del model
    source = ModelSource(plain, tok, kind="gguf", name=str(gguf))
    source.out_dtype = torch.bfloat16
    source.base_model = gguf_base_model(gguf)
    return source


def _hub_source(repo_id: str) -> FolderSource:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise FileNotFoundError(f"{repo_id}: no such folder or file, and not a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                            "*.jinja", "1_Pooling/*"])
    except Exception as e:
        raise RuntimeError(f"could not fetch {repo_id!r} from the Hugging Face hub (offline? pass a local folder "
                           f"or a .gguf file instead): {type(e).__name__}: {e}") from e
    return FolderSource(folder, kind="hub", name=repo_id)
