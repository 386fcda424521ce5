"""The Linear weights of a llama-style GGUF checkpoint, dequantized to float32, one at a time.

GGUF lists a tensor's dimensions fastest-varying first (ne0 = in_features), the reverse of
torch's order; ``gguf.GGUFReader`` already exposes the data as a row-major array of
``[ne1, ne0]`` blocks, so the dequantized array is ``[out_features, in_features]`` as in
``torch.nn.Linear.weight`` (ffn_down of SmolLM2-135M comes out as [576, 1536]).

Note: llama.cpp's converter permutes the rows of attn_q / attn_k (rotary layout). That is a
row permutation only; block quantization along the input dimension is unaffected.
"""

from __future__ import annotations

import os
import re
from typing import Iterator, Optional, Union

import numpy as np
import torch

# GGUF tensor-name suffix -> class, in the order of a transformer block.
LINEAR_CLASSES = {
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
}
CLASS_ORDER = tuple(LINEAR_CLASSES.values())

_NAME_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def tensor_class(name: str) -> Optional[str]:
    """Class ('q', 'k', 'v', 'o', 'gate', 'up', 'down') of a GGUF block Linear weight name
    such as ``blk.3.ffn_down.weight``; None for anything else (norms, embeddings, ...)."""
    m = _NAME_RE.match(name)
    if not m:
        return None
    return LINEAR_CLASSES.get(m.group(2))


def tensor_layer(name: str) -> Optional[int]:
    """Block index of a ``blk.N.*`` tensor name, else None."""
    m = _NAME_RE.match(name)
    return int(m.group(1)) if m else None


def _dequantize(t) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    arr = dequantize(np.asarray(t.data), GGMLQuantizationType(int(t.tensor_type)))
    in_features, out_features = (int(d) for d in t.shape[:2])  # GGUF: ne0 first
    arr = np.asarray(arr, dtype=np.float32)
    if arr.size != in_features * out_features:
        raise ValueError(f"{t.name}: dequantized {arr.size} values, expected "
                         f"{out_features} x {in_features}")
    return arr.reshape(out_features, in_features)


def linear_weights(gguf_path: Union[str, os.PathLike]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, float32 tensor [out_features, in_features]) for every 2-D Linear weight
    of the transformer blocks (attn_q/k/v/output, ffn_gate/up/down), in file order.

    Streams: the file is memory-mapped and each tensor is dequantized only when yielded.
    """
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("eoq.format.gguf_weights needs the 'gguf' package: pip install gguf") from e

    reader = GGUFReader(os.fspath(gguf_path))
    for t in reader.tensors:
        if tensor_class(t.name) is None or len(t.shape) != 2:
            continue
        yield t.name, torch.from_numpy(_dequantize(t))


__all__ = ["linear_weights", "tensor_class", "tensor_layer", "LINEAR_CLASSES", "CLASS_ORDER"]
