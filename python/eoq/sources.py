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
    largest_shard_bytes: int = 0
    tokenizer = None
    out_dtype: Optional[torch.dtype] = None  # store floating tensors in this dtype (None: as they are)

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def load_model(self):
        """The model in memory (for calibration)."""
        raise NotImplementedError

    def release_model(self) -> None:
        pass

    def save_extras(self, out: pathlib.Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out))

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "architecture": (self.config.architectures or [None])[0],
                "model_type": getattr(self.config, "model_type", None)}


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
        self.roles = module_roles(model)

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
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"{self.folder}: no config.json; not a Hugging Face model folder")
        self.config = _clean_config(AutoConfig.from_pretrained(str(self.folder)))
        cls = model_class(self.config)
        with torch.device("meta"):
            skeleton = cls(self.config)
        self.roles, self.tied = module_roles(skeleton), tied_map(skeleton)
        model_keys = set(skeleton.state_dict())
        prefix = getattr(skeleton, "base_model_prefix", "") or ""
        self._files = self._index()
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

    def get(self, name):
        from safetensors import safe_open

        key = self._key[name]
        file = self._files[key]
        if file not in self._handles:
            self._handles[file] = safe_open(file, "pt")
        try:
            return self._handles[file].get_tensor(key)
        except Exception as e:
            raise ValueError(f"{file}: cannot read tensor {key!r} ({e})") from e

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
