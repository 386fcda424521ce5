"""QuantConfig: every knob of a conversion, with a JSON round trip.

The config is written into the output (``quant_manifest.json`` and ``config.json``'s
``quantization_config``), so a folder says how it was made and the same config and seed
reproduce it byte for byte. Knobs that cannot change the output (progress bars, thread
count) are arguments of ``quantize_model``, not fields here.

Protect rules pick tensors by exact name or by regular expression (``re.search``) and
either keep them as they are (``action="passthrough"``) or give them their own setting
(``action="quantize"`` with any of method / bits / block_size / options). The first rule
that matches wins.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Optional

from ..methods import METHODS
from ..methods import ecsq as _ecsq

MAX_RATE = _ecsq.MAX_BITS  # the highest per-tensor rate an allocation may give (ecsq codes past 8 bits)

CODECS = ("auto", "rans", "packed")
FEEDBACKS = (None, "gptq")
ALLOCATIONS = ("sensitivity", "proxy", "uniform")
ALLOCATION_ALIASES = {"global": "proxy"}  # the name of "proxy" before the whole-model budget
CALIBRATION_OFF = (None, "", "none")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class ProtectRule:
    pattern: str
    regex: bool = False
    action: str = "passthrough"          # or "quantize"
    method: Optional[str] = None         # the rule's own setting when action == "quantize"
    bits: Optional[float] = None
    block_size: Optional[int] = None
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.action not in ("passthrough", "quantize"):
            raise ValueError(f"protect rule {self.pattern!r}: action must be 'passthrough' or 'quantize', "
                             f"got {self.action!r}")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"protect rule {self.pattern!r}: unknown method {self.method!r}")
        if self.regex:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"protect rule {self.pattern!r}: not a valid regular expression ({e})") from e

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None if self.regex else name == self.pattern

    @property
    def label(self) -> str:
        return ("re:" if self.regex else "") + self.pattern


@dataclasses.dataclass
class QuantConfig:
    method: str = "ecsq"
    # ecsq: a budget over the *whole model*: every stored tensor (codes, side data, passthrough
    # tensors) together averages at most `bits` per parameter. Fixed-rate methods: their code width.
    bits: float = 4.0
    target_size: Optional[int] = None    # ecsq: a budget in bytes instead of `bits` (e.g. parse_size("2.1GB"))
    block_size: Optional[int] = None     # None: the method's default
    seed: int = 0
    # How the ecsq budget is spread over tensors (eoq.convert.allocate): "sensitivity" (the default
    # with calibration) by each tensor's measured effect on the output KL divergence
    # (eoq.calibrate.sensitivity); "proxy" by each tensor's own relative output error; "uniform": one rate
    # for every quantized tensor. Each rate stays within allocation_range bits/weight.
    # None: "sensitivity" for ecsq with calibration, "proxy" for ecsq data-free, "uniform" for
    # the fixed-rate methods.
    allocation: Optional[str] = None
    allocation_range: list = dataclasses.field(default_factory=lambda: [1.5, 10.0])
    codec: str = "auto"                  # auto: the smaller of rANS and packed, per tensor
    options: dict = dataclasses.field(default_factory=dict)   # passed to the method
    # Activation weighting (the default): statistics of every Linear's inputs on calibration
    # text weight the error the methods minimise; awq adds AWQ's per-channel scales.
    calibration: Optional[str] = "self"  # a text file, a datasets name, "self" (model-sampled) or None
    calib_sequences: int = 16
    calib_seq_len: int = 512
    calib_self_len: int = 128            # tokens per sequence when calibration == "self" (sampled in one batch)
    sensitivity_sequences: int = 8       # calibration sequences the Fisher pass uses (one backward pass each)
    awq: bool = True
    # Error feedback (eoq.methods.feedback): "gptq" quantizes every weight with GPTQ-style feedback over
    # its inputs' covariance (collected by the calibration pass; needs calibration), on the
    # method's own grid; feedback_damp is the relative damping of the covariance.
    feedback: Optional[str] = None
    feedback_damp: float = 0.01
    # Which tensors: every floating 2-D weight by default, the token embedding and the output
    # head included (a tied pair is stored once); False keeps them in 16 bits.
    quantize_embeddings: bool = True
    quantize_lm_head: bool = True
    min_numel: int = 4096                # smaller 2-D weights stay as they are
    protect: list = dataclasses.field(default_factory=list)   # ProtectRule
    max_shard_size: int = 2 << 30        # bytes per safetensors shard
    dtype: Optional[str] = None          # floating tensors stored / dequantized in this dtype (None: the source's)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig: unknown method {self.method!r}; choose from {sorted(METHODS)}")
        rate_target = getattr(METHODS[self.method], "RATE_TARGET", False)
        self.allocation = ALLOCATION_ALIASES.get(self.allocation, self.allocation)
        if self.calibration in CALIBRATION_OFF:
            self.calibration = None
        if self.allocation is None:  # sensitivity needs a calibration pass; data-free, the proxy
            self.allocation = "uniform" if not rate_target else "proxy" if self.calibration is None else "sensitivity"
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"QuantConfig: allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        lo, hi = (float(b) for b in self.allocation_range)
        self.allocation_range = [lo, hi]  # a list: the config must equal its own JSON round trip
        if not 0 < lo < hi <= MAX_RATE:
            raise ValueError(f"QuantConfig: allocation_range must be (lo, hi) with 0 < lo < hi <= {MAX_RATE:g}, "
                             f"got {self.allocation_range}")
        if self.allocation != "uniform" and not rate_target:
            raise ValueError(f"QuantConfig: allocation={self.allocation!r} needs a method with a continuous rate "
                             f"(ecsq), not {self.method!r}; use allocation='uniform'")
        if self.target_size is not None:
            self.target_size = int(self.target_size)
            if not rate_target:
                raise ValueError(f"QuantConfig: target_size needs a method with a continuous rate (ecsq), "
                                 f"not {self.method!r}")
            if self.target_size <= 0:
                raise ValueError(f"QuantConfig: target_size must be a positive number of bytes, got {self.target_size}")
        if self.codec not in CODECS:
            raise ValueError(f"QuantConfig: codec must be one of {CODECS}, got {self.codec!r}")
        if not float(self.bits) > 0:
            raise ValueError(f"QuantConfig: bits must be positive, got {self.bits}")
        if int(self.max_shard_size) < 1:
            raise ValueError(f"QuantConfig: max_shard_size must be positive, got {self.max_shard_size}")
        if int(self.sensitivity_sequences) < 1:
            raise ValueError(f"QuantConfig: sensitivity_sequences must be >= 1, got {self.sensitivity_sequences}")
        if self.dtype is not None and self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"QuantConfig: dtype must be one of {FLOAT_DTYPES} or None, got {self.dtype!r}")
        if self.calibration in CALIBRATION_OFF:
            self.calibration = None
        if self.awq and self.calibration is None:
            raise ValueError("QuantConfig: awq=True needs calibration (a text path, a datasets name or 'self'); "
                             "pass awq=False for a data-free conversion")
        if self.feedback not in FEEDBACKS:
            raise ValueError(f"QuantConfig: feedback must be one of {FEEDBACKS}, got {self.feedback!r}")
        if self.feedback and self.calibration is None:
            raise ValueError(f"QuantConfig: feedback={self.feedback!r} needs calibration (the inputs' covariance); "
                             f"give calibration= or feedback=None")
        self.feedback_damp = float(self.feedback_damp)
        if not 0 < self.feedback_damp < 10:
            raise ValueError(f"QuantConfig: feedback_damp must be in (0, 10), got {self.feedback_damp}")
        self.protect = [r if isinstance(r, ProtectRule) else ProtectRule(**r) for r in self.protect]

    @property
    def whole_model_budget(self) -> bool:
        """Whether `bits` / target_size is a budget for the whole model (a rate-target method)."""
        return bool(getattr(METHODS[self.method], "RATE_TARGET", False))

    @property
    def data_free(self) -> bool:
        return self.calibration is None

    def rule_for(self, name: str) -> Optional[ProtectRule]:
        return next((r for r in self.protect if r.matches(name)), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"QuantConfig: unknown fields {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        return cls.from_dict(json.loads(text))


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
    """'2.1GB' / '500MB' / '1.5GiB' / '123456' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in SIZE_UNITS:
        raise ValueError(f"size {text!r}: expected a number with an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB)")
    return int(round(float(m.group(1)) * SIZE_UNITS[unit]))
