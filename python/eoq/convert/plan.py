"""What happens to each parameter, decided from the headers alone: quantize (at the
config's or a protect rule's setting), pass through, or tie; the seed, the statistics and the
error-feedback arguments each one gets; and the budget checked against what the fixed
tensors take, before any work.
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch

from ..calibrate.sensitivity import Sensitivity
from ..format import repo
from ..format.sources import Source
from ..methods.quantize import quantize_tensor
from .quant_config import QuantConfig


def tensor_seed(seed: int, name: str) -> int:
    """A per-parameter rotation seed: distinct signs per tensor, reproducible from the config."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) & 0x7FFFFFFFFFFFFFFF


def plan(source: Source, config: QuantConfig, name: str, t: torch.Tensor) -> dict:
    """{"action": quantize|passthrough|tied, "kind", "reason"/"rule", "method", "bits", ...}."""
    if name in source.tied and source.tied[name] in source.names:
        return {"action": "tied", "kind": "tied", "tied_to": source.tied[name]}
    role = source.roles.get(name, "other")
    if not t.is_floating_point():
        return {"action": "passthrough", "kind": "passthrough", "reason": "integer"}
    if t.dim() != 2:
        return {"action": "passthrough", "kind": "passthrough", "reason": "non-2d"}
    rule = config.rule_for(name)
    if rule is not None and rule.action == "passthrough":
        return {"action": "passthrough", "kind": "protected", "rule": rule.label}
    heads = {k for k, v in source.tied.items() if v == name}  # parameters tied to this one
    wanted = {
        "linear": True, "conv1d": True,
        "lm_head": config.quantize_lm_head,
        "embedding": config.quantize_embeddings or (config.quantize_lm_head and
                                                    any(source.roles.get(h) == "lm_head" for h in heads)),
    }.get(role, False)
    if rule is not None:  # a quantize rule: its own setting, whatever the defaults say
        return {"action": "quantize", "kind": "protected", "rule": rule.label, "role": role,
                "method": rule.method or config.method, "bits": config.bits if rule.bits is None else rule.bits,
                "block_size": rule.block_size if rule.block_size is not None else config.block_size,
                "options": {**config.options, **rule.options} if rule.method in (None, config.method)
                else dict(rule.options)}
    if not wanted:
        reason = role if role in ("embedding", "lm_head") else "not-linear"
        return {"action": "passthrough", "kind": "passthrough", "reason": reason}
    if t.numel() < config.min_numel:
        return {"action": "passthrough", "kind": "passthrough", "reason": "small"}
    return {"action": "quantize", "kind": "quantized", "role": role, "method": config.method, "bits": config.bits,
            "block_size": config.block_size, "options": dict(config.options)}


def stored_dtype(source: Source, config: QuantConfig) -> Optional[torch.dtype]:
    """The dtype floating tensors are stored / dequantized in: the config's, else the source's
    (a GGUF's bfloat16), else None (as they are)."""
    return getattr(torch, config.dtype) if config.dtype else source.out_dtype


def importance_for(source: Source, stats: Optional[dict], name: str) -> Optional[torch.Tensor]:
    """E[a^2] of the inputs of the module owning `name` (for a tied embedding: of the head)."""
    s = stats_for(source, stats, name)
    return None if s is None else s.mean_sq


def stats_for(source: Source, stats: Optional[dict], name: str):
    """The ActStats of the module owning `name` (for a tied embedding: of the head), or None."""
    if not stats:
        return None
    owners = [name] + [h for h, target in source.tied.items() if target == name]
    for owner in owners:
        module = owner.removesuffix(".weight")
        if module in stats:
            return stats[module]
    return None


def feedback_options(source: Source, config: QuantConfig, stats: Optional[dict], name: str, cols: int) -> dict:
    """quantize_tensor's error-feedback arguments for `name`: the covariance of its inputs
    when the config asks for feedback and the calibration measured it, else none."""
    s = stats_for(source, stats, name) if config.feedback else None
    if s is None or s.sum_outer is None or s.sum_outer.shape[0] != cols:
        return {}
    return {"hessian": s.hessian, "damp": config.feedback_damp, "hessian_tokens": s.count}


def row_importance_for(source: Source, sens: Optional[Sensitivity], name: str) -> tuple[Optional[torch.Tensor], int]:
    """(row weights, tokens) of a vocabulary tensor (token embedding / output head), else (None, 0)."""
    if sens is None or name not in source.vocab:
        return None, 0
    heads_input = source.vocab[name] == "input" or any(source.vocab.get(h) == "input"
                                                       for h, t in source.tied.items() if t == name)
    return sens.row_weights(name, input_embedding=heads_input)


def tied_entry(source: Source, config: QuantConfig, name: str, p: dict) -> dict:
    """A tied parameter's entry: stored under the parameter it is tied to, so from the header alone."""
    spec = source.spec(name)
    want = stored_dtype(source, config)
    dt = want if want is not None and spec.is_floating_point() else spec.dtype
    return {"kind": "tied", "tied_to": p["tied_to"], "shape": list(spec.shape), "dtype": repo.dtype_name(dt),
            "stored_bytes": 0}


def budget_bits(source: Source, config: QuantConfig) -> float:
    """The whole model's budget in bits: target_size bytes, else bits x every parameter (tied once)."""
    if config.target_size is not None:
        return 8.0 * config.target_size
    return float(config.bits) * sum(source.spec(n).numel() for n in source.names
                                    if n not in source.tied or source.tied[n] not in source.names)


def check_budget(source: Source, config: QuantConfig, plans: dict, specs: dict) -> None:
    """Before any work: the budget must cover the passthrough tensors (exactly known from the
    headers), the protect rules' tensors (at their bits) and every allocated tensor at the
    lowest rate allowed (allocation_range[0])."""
    if not config.whole_model_budget:
        return
    dtype = stored_dtype(source, config)
    fixed = protected = weights = 0
    for name, p in plans.items():
        t = specs[name]
        if p["action"] == "passthrough":
            fixed += t.numel() * (torch.empty(0, dtype=dtype if dtype is not None and t.is_floating_point()
                                              else t.dtype).element_size())
        elif p["action"] == "quantize" and p["kind"] == "protected":
            protected += float(p["bits"]) * t.numel() / 8
        elif p["action"] == "quantize":
            weights += t.numel()
    budget = budget_bits(source, config)
    what = f"{config.target_size} bytes" if config.target_size is not None else f"{config.bits} bits per parameter"
    if 8 * fixed > budget:
        raise ValueError(f"{source.name}: the budget ({what}: {budget / 8 / 1e6:.3f} MB) is below what the "
                         f"passthrough tensors alone take ({fixed / 1e6:.3f} MB); raise the budget or quantize more "
                         f"tensors")
    floor = 8 * (fixed + protected) + weights * config.allocation_range[0]
    if floor > budget:
        raise ValueError(f"{source.name}: the budget ({what}: {budget / 8 / 1e6:.3f} MB) is below the smallest "
                         f"size the settings allow: passthrough {fixed / 1e6:.3f} MB + protected ~{protected / 1e6:.3f} "
                         f"MB + {weights:,} quantized weights at {config.allocation_range[0]} bits/weight = "
                         f"{floor / 8 / 1e6:.3f} MB; raise the budget or lower allocation_range[0]")


def check_settings(config: QuantConfig) -> None:
    """Try the method settings (default and every quantize rule) on a small random weight, so
    a bad option fails at once, before any work or partial folder exists."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    settings = [(config.method, config.bits, config.block_size, config.options)]
    for r in config.protect:
        if r.action == "quantize":
            method = r.method or config.method
            options = {**config.options, **r.options} if method == config.method else r.options
            settings.append((method, config.bits if r.bits is None else r.bits,
                             r.block_size if r.block_size is not None else config.block_size, options))
    for method, bits, block, options in settings:
        if block is not None and block > 64:
            block = None  # the block rule needs a wider weight; the setting itself is checked below
        quantize_tensor(w, method, bits, block, name=f"QuantConfig ({method})", **options)
