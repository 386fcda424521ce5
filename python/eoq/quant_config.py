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

from .methods import METHODS

CODECS = ("auto", "rans", "packed")
ALLOCATIONS = ("uniform", "global")
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
    bits: float = 4.0                    # per method: integer bits, or ecsq's coded rate in bits/weight
    block_size: Optional[int] = None     # None: the method's default
    seed: int = 0
    # "uniform": every quantized tensor at `bits`; "global" (ecsq): per-tensor rates by equal
    # slope (eoq.allocate) whose weighted mean over those tensors is `bits`, each within
    # allocation_range bits/weight.
    allocation: str = "uniform"
    allocation_range: list = dataclasses.field(default_factory=lambda: [2.0, 8.0])
    codec: str = "auto"                  # auto: the smaller of rANS and packed, per tensor
    options: dict = dataclasses.field(default_factory=dict)   # passed to the method
    # Activation weighting (the default): statistics of every Linear's inputs on calibration
    # text weight the error the methods minimise; awq adds AWQ's per-channel scales.
    calibration: Optional[str] = "self"  # a text file, a datasets name, "self" (model-sampled) or None
    calib_sequences: int = 16
    calib_seq_len: int = 512
    calib_self_len: int = 128            # tokens per sequence when calibration == "self" (sampled in one batch)
    awq: bool = True
    # Which tensors.
    quantize_embeddings: bool = False
    quantize_lm_head: bool = False
    min_numel: int = 4096                # smaller 2-D weights stay as they are
    protect: list = dataclasses.field(default_factory=list)   # ProtectRule
    max_shard_size: int = 2 << 30        # bytes per safetensors shard
    dtype: Optional[str] = None          # floating tensors stored / dequantized in this dtype (None: the source's)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig: unknown method {self.method!r}; choose from {sorted(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"QuantConfig: allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        lo, hi = (float(b) for b in self.allocation_range)
        self.allocation_range = [lo, hi]  # a list: the config must equal its own JSON round trip
        if not 0 < lo < hi <= 8:
            raise ValueError(f"QuantConfig: allocation_range must be (lo, hi) with 0 < lo < hi <= 8, "
                             f"got {self.allocation_range}")
        if self.allocation == "global" and self.method != "ecsq":
            raise ValueError(f"QuantConfig: allocation='global' needs method 'ecsq' (a continuous rate), "
                             f"not {self.method!r}")
        if self.allocation == "global" and not lo <= float(self.bits) <= hi:
            raise ValueError(f"QuantConfig: bits {self.bits} lies outside allocation_range {self.allocation_range}")
        if self.codec not in CODECS:
            raise ValueError(f"QuantConfig: codec must be one of {CODECS}, got {self.codec!r}")
        if not float(self.bits) > 0:
            raise ValueError(f"QuantConfig: bits must be positive, got {self.bits}")
        if int(self.max_shard_size) < 1:
            raise ValueError(f"QuantConfig: max_shard_size must be positive, got {self.max_shard_size}")
        if self.dtype is not None and self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"QuantConfig: dtype must be one of {FLOAT_DTYPES} or None, got {self.dtype!r}")
        if self.calibration in CALIBRATION_OFF:
            self.calibration = None
        if self.awq and self.calibration is None:
            raise ValueError("QuantConfig: awq=True needs calibration (a text path, a datasets name or 'self'); "
                             "pass awq=False for a data-free conversion")
        self.protect = [r if isinstance(r, ProtectRule) else ProtectRule(**r) for r in self.protect]

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
