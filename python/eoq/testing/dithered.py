"""SmolLM2-dithered: a continuous-weight copy of the SmolLM2-135M Q4_1 GGUF test model.

The GGUF checkpoint is a real language model, but its weights are not "honest" inputs for a
quantizer: every Linear weight lies on a Q4_1 grid (blocks of 32 along the input dimension,
at most 16 values each) and the token embedding on a Q8_0 grid, so a quantizer that
rediscovers that grid looks far better than it would on a real checkpoint. This module
builds, deterministically, a copy whose every quantized weight is moved by a seeded uniform
dither inside its own quantization cell::

    w' = w + d * u,   u ~ U(-1/2, 1/2)

with ``d`` the step of the block the weight belongs to (Q4_1 and Q8_0 both store it as the
block's fp16 ``d``), read from the raw GGUF blocks, never inferred from the values. F32
tensors (the RMSNorm weights) are kept as they are.

The network is loaded with transformers from the GGUF (which dequantizes it and un-permutes
the rows of attn_q / attn_k from llama.cpp's rotary layout); the step map gets the same row
permutation and every dequantized GGUF tensor is checked to be bit-identical to the
transformers tensor before it is dithered. The result is saved with ``save_pretrained`` in
bfloat16 (as the released SmolLM2) plus the tokenizer, without the GGUF
``quantization_config``. bfloat16 rounding is done so that the stored value stays inside the
closed cell ``[w - d/2, w + d/2]`` wherever the cell holds a bfloat16 number (else the
bfloat16 number nearest to ``w`` is stored).

Per-tensor seeds are derived from the global seed and the GGUF tensor name (SHA-256), and
the dither is drawn with a CPU ``torch.Generator``, so two builds give byte-identical files.

``python -m eoq.testing.models`` builds it (with the other test models) from the command line.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
from typing import Optional, Union

import numpy as np
import torch

from . import kquants

QK = 32  # weights per block, Q4_1 and Q8_0
_BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # fp16 d (+ fp16 m for Q4_1) + payload

_LINEAR_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


class DitherError(RuntimeError):
    """The GGUF and the transformers model disagree, or the file has an unexpected layout."""


def hf_name(gguf_name: str) -> str:
    """transformers (llama) parameter name of a GGUF tensor name."""
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in fixed:
        return fixed[gguf_name]
    m = _BLK_RE.match(gguf_name)
    if not m or m.group(2) not in _LINEAR_HF:
        raise DitherError(f"no transformers name known for GGUF tensor {gguf_name!r}")
    return f"model.layers.{m.group(1)}.{_LINEAR_HF[m.group(2)]}.{m.group(3)}"


def rotary_row_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that transformers applies to llama.cpp's attn_q (n_head = heads) and attn_k
    (n_head = kv heads): ``hf[i] = gguf[perm[i]]``. Same as ``_reverse_permute_weights`` of
    transformers' GGUF integration: reshape(n_head, dim, 2, ...).swapaxes(1, 2)."""
    if n_rows % (2 * n_head):
        raise DitherError(f"{n_rows} rows do not split into {n_head} heads of pairs")
    dim = n_rows // n_head // 2
    idx = torch.arange(n_rows).reshape(n_head, dim, 2)
    return idx.transpose(1, 2).reshape(n_rows)


def _raw_blocks(t) -> tuple[np.ndarray, int, int]:
    """(raw uint8 blocks [rows, n_blocks, block_bytes], rows, cols) of a Q4_1/Q8_0 tensor."""
    kind = t.tensor_type.name
    cols, rows = (int(x) for x in t.shape[:2])  # GGUF: ne0 (= input dim) first
    if len(t.shape) != 2 or cols % QK:
        raise DitherError(f"{t.name}: unexpected shape {list(t.shape)} for {kind}")
    raw = np.asarray(t.data)
    nb = cols // QK
    if raw.dtype != np.uint8 or raw.size != rows * nb * _BLOCK_BYTES[kind]:
        raise DitherError(f"{t.name}: {raw.size} raw bytes ({raw.dtype}), expected "
                          f"{rows * nb * _BLOCK_BYTES[kind]} for {rows} x {cols} {kind}")
    return raw.reshape(rows, nb, _BLOCK_BYTES[kind]), rows, cols


def block_steps(t) -> torch.Tensor:
    """Per-weight quantization step [rows, cols] (float32) of a Q4_1, Q8_0, Q4_K or Q6_K GGUF
    tensor, in GGUF row order: the fp16 ``d`` at the start of each raw Q4_1 / Q8_0 block; a
    K-quant's sub-block scale x its super-block scale (eoq.testing.kquants)."""
    kind = t.tensor_type.name
    if kind in kquants.FIELDS:
        cols, rows = (int(x) for x in t.shape[:2])
        if len(t.shape) != 2 or cols % kquants.QK_K:
            raise DitherError(f"{t.name}: unexpected shape {list(t.shape)} for {kind}")
        try:
            _, steps, _ = kquants.FIELDS[kind](np.asarray(t.data))
        except ValueError as e:
            raise DitherError(f"{t.name}: {e}") from None
        if steps.size != rows * cols:
            raise DitherError(f"{t.name}: {steps.size} weights in its blocks, expected {rows} x {cols}")
        # the cell's width: Q6_K's scales are signed, so a sub-block's d * scale can be negative
        return torch.from_numpy(np.abs(steps).reshape(rows, cols))
    if kind not in _BLOCK_BYTES:
        raise DitherError(f"{t.name}: no step map for tensor type {kind}")
    blocks, rows, cols = _raw_blocks(t)
    d = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16)[..., 0].astype(np.float32)
    return torch.from_numpy(np.repeat(d, QK, axis=1).reshape(rows, cols))


def dequantized(t) -> torch.Tensor:
    """The GGUF tensor dequantized to float32 [rows, cols], in GGUF row order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    arr = dequantize(np.asarray(t.data), GGMLQuantizationType(int(t.tensor_type)))
    shape = tuple(int(x) for x in reversed(t.shape))
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True).reshape(shape))


def tensor_seed(seed: int, gguf_name: str) -> int:
    """Stable 63-bit generator seed of one tensor."""
    h = hashlib.sha256(f"eoq-dither:{int(seed)}:{gguf_name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def hf_row_permutation(gguf_name: str, n_rows: int, n_head: int, n_kv_head: int) -> Optional[torch.Tensor]:
    """The row permutation transformers applies to this tensor (None: rows unchanged)."""
    if ".attn_q." in gguf_name:
        return rotary_row_permutation(n_rows, n_head)
    if ".attn_k." in gguf_name:
        return rotary_row_permutation(n_rows, n_kv_head)
    return None


def _bf16_key(x: torch.Tensor) -> torch.Tensor:
    """Monotone int32 key of bfloat16 values (consecutive bfloat16 numbers: consecutive keys)."""
    b = x.view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.where(b < 0x8000, b, 0x8000 - b)


def _bf16_from_key(k: torch.Tensor) -> torch.Tensor:
    b = torch.where(k >= 0, k, 0x8000 - k)
    b = torch.where(b >= 0x8000, b - 0x10000, b)  # to signed int16 range
    return b.to(torch.int16).view(torch.bfloat16)


def dither_to_bf16(w: torch.Tensor, step: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """bfloat16 of ``w + step * u`` (u ~ U(-1/2, 1/2) from ``gen``), kept in the closed cell
    ``|w' - w| <= step/2`` wherever that cell holds a bfloat16 number; elsewhere the
    bfloat16 nearest to w. Returns (tensor, number of entries that needed a correction)."""
    u = torch.rand(w.shape, generator=gen, dtype=torch.float32).sub_(0.5)
    w64 = w.double()
    y = u.double().mul_(step).add_(w64).to(torch.bfloat16)
    dev = y.double().sub_(w64)  # exact in float64 (two numbers of <= 24 significant bits)
    bad = (dev.abs() > step.double().mul_(0.5)).flatten().nonzero().flatten()
    n_bad = int(bad.numel())
    if n_bad:
        # one bfloat16 step back toward w, on the few entries rounded out of their cell
        yf, wb, hb = y.flatten(), w64.flatten()[bad], step.flatten()[bad].double() / 2
        yb = yf[bad]
        key = _bf16_key(yb) - torch.sign(dev.flatten()[bad]).to(torch.int32)
        yb = _bf16_from_key(key)
        still = (yb.double() - wb).abs() > hb
        if bool(still.any()):  # the cell holds no bfloat16 number: nearest to w
            yb = torch.where(still, wb.to(torch.bfloat16), yb)
        yf[bad] = yb
    return y, n_bad


def build_dithered(gguf_path: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                   seed: int = 0, verbose: bool = False) -> pathlib.Path:
    """Build the dithered copy of a llama or qwen2 GGUF (Q4_1 / Q8_0 / Q4_K / Q6_K / F32
    tensors) into ``out_dir``.

    Written into a temporary sibling folder and renamed when complete; an existing
    ``out_dir`` is replaced. Returns ``out_dir``.
    """
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = pathlib.Path(gguf_path)
    out_dir = pathlib.Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    n_head = int(model.config.num_attention_heads)
    n_kv_head = int(model.config.num_key_value_heads)
    # transformers un-permutes llama.cpp's rotary row order for llama only (qwen2 keeps its rows)
    permuted = model.config.model_type == "llama"

    params = dict(model.named_parameters(remove_duplicate=False))
    new: dict[str, torch.Tensor] = {}
    n_fixed = 0
    reader = GGUFReader(os.fspath(gguf_path))
    for t in reader.tensors:
        name = hf_name(t.name)
        if name not in params:
            raise DitherError(f"GGUF tensor {t.name} -> {name}: not a parameter of the model")
        hf = params[name].detach()
        w = dequantized(t)
        kind = t.tensor_type.name
        perm = hf_row_permutation(t.name, w.shape[0], n_head, n_kv_head) if permuted else None
        if perm is not None:
            w = w[perm]
        if w.shape != hf.shape or not torch.equal(w, hf):
            raise DitherError(f"{t.name}: dequantized GGUF tensor (row-permuted: {perm is not None}) "
                              f"differs from transformers' {name}; the name map or permutation is wrong")
        if kind == "F32":
            new[name] = hf.to(torch.bfloat16)
            continue
        step = block_steps(t)
        if perm is not None:
            step = step[perm]
        gen = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, t.name))
        new[name], nb = dither_to_bf16(w, step, gen)
        n_fixed += nb
    missing = set(params) - set(new) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    if missing:
        raise DitherError(f"model parameters without a GGUF tensor: {sorted(missing)[:5]}")

    model = model.to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in new:
                p.copy_(new[name])
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise DitherError("lm_head is not tied to embed_tokens after the update")

    # Drop the GGUF quantization: the copy is a plain bfloat16 checkpoint.
    model.hf_quantizer = None
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass
    model.config.dtype = torch.bfloat16

    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.part")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _check_saved(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(0o644)  # save_pretrained writes through a private temp file
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if verbose:
        print(f"dithered {len(new)} tensors (seed {seed}); {n_fixed} values moved back into their cell "
              f"after bfloat16 rounding")
    return out_dir


def _check_saved(folder: pathlib.Path) -> None:
    import json

    cfg = json.loads((folder / "config.json").read_text())
    if "quantization_config" in cfg:
        raise DitherError("config.json still carries a quantization_config")
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        raise DitherError(f"save_pretrained wrote no model.safetensors (or shard index) into {folder}")


__all__ = ["build_dithered", "block_steps", "dequantized", "hf_name", "hf_row_permutation",
           "rotary_row_permutation", "tensor_seed", "dither_to_bf16", "DitherError"]
