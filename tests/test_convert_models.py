"""End to end on the real test models: SmolLM2-135M (from its GGUF) and all-MiniLM-L6-v2
(a plain HF folder, BERT): convert, load, use."""

from __future__ import annotations

import pytest
import torch

import eoq
from eoq.testing import models as testmodels
from eoq.evaluate.embeddings import sentence_embeddings

SENTENCES = [
    "The cat sat on the mat.", "A dog is playing in the park.", "Quantum computers use qubits.",
    "The stock market fell sharply today.", "She plays the violin beautifully.", "Paris is the capital of France.",
    "Rain is expected tomorrow afternoon.", "He fixed the bug in the compiler.", "Bread is baked in an oven.",
    "The committee approved the new budget.", "Mountains are covered with snow in winter.",
    "Neural networks learn from data.",
]


@pytest.fixture(scope="module")
def smollm2_eoq(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "q"
    # The default: ecsq, 4 bits per parameter of the whole model, statistics and the sensitivity
    # pass on text the model samples itself, AWQ.
    manifest = eoq.quantize_model(testmodels.smollm2_gguf(), out, progress=False, verbose=False)
    return out, manifest


def test_smollm2_manifest(smollm2_eoq):
    out, m = smollm2_eoq
    t = m["tensors"]
    assert m["source"]["kind"] == "gguf" and "quantization_config" not in (out / "config.json").read_text().split(
        '"quant_method": "eoq"')[0].split("quantization_config")[1:]
    assert t["lm_head.weight"]["kind"] == "tied"
    assert sum(e["kind"] == "quantized" for e in t.values()) == 30 * 7 + 1  # + the tied embedding / head
    assert t["model.embed_tokens.weight"]["meta"]["row_importance"]
    assert 0.995 * 4.0 <= m["totals"]["bits_per_weight_all"] <= 4.0  # everything stored, every parameter
    assert m["allocation"]["mode"] == "sensitivity" and m["allocation"]["predicted_kl"] > 0
    assert m["calibration"]["source"] == "self" and m["calibration"]["tokens"] == 16 * 128
    assert m["calibration"]["sensitivity_tokens"] == 8 * 129  # BOS + 128 sampled tokens
    assert m["source"]["name"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    # smaller than the GGUF it came from, every file of the folder counted
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) < testmodels.smollm2_gguf().stat().st_size
    # AWQ searched for every tensor; scales stored exactly where they beat none (awq_alpha null)
    quantized = [e for e in t.values() if e["kind"] == "quantized"]
    assert all("awq_alpha" in e["meta"] for e in quantized)
    assert all(("awq_scales" in e["parts"]) == (e["meta"]["awq_alpha"] is not None) for e in quantized)
    assert any("awq_scales" in e["parts"] for e in quantized)
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_smollm2_loads_and_agrees_with_the_base(smollm2_eoq, smollm2_model, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    out, _ = smollm2_eoq
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = smollm2_tokenizer
    text = ("The history of the city begins in the Roman period, when a small settlement grew on the river bank. "
            "In the middle ages it became a centre of trade and learning, and its university was founded in")
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = smollm2_model(ids).logits.float()
        quant = model(ids).logits.float()
    agree = (base.argmax(-1) == quant.argmax(-1)).float().mean()
    lp, lq = base.log_softmax(-1), quant.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    # SmolLM2-135M is fragile at 4 bits: data-free ecsq gives KL ~0.26 on WikiText, absmax Q4
    # 0.31, the calibrated default ~0.09 (measured when this test was written).
    assert agree > 0.75 and kl < 0.2, (agree, kl)
    gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    words = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split()
    assert len(words) >= 3 and len(set(words)) >= 2, words


@pytest.fixture(scope="module")
def minilm_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(SENTENCES * 20))
    return path


def test_minilm_converts_and_embeds_like_the_base(tmp_path, minilm_text):
    from transformers import AutoModel, AutoTokenizer

    folder = testmodels.minilm()
    cfg = eoq.QuantConfig(calibration=str(minilm_text), calib_sequences=8, calib_seq_len=64)
    m = eoq.quantize_model(folder, tmp_path / "q", cfg, progress=False, verbose=False)
    assert m["calibration"]["source"] == str(minilm_text) and m["calibration"]["tokens"] == 8 * 64
    # 6 Linear a layer, the pooler, the word and position embeddings (token types: too small)
    assert sum(e["kind"] == "quantized" for e in m["tensors"].values()) == 6 * 6 + 3
    assert m["tensors"]["embeddings.word_embeddings.weight"]["meta"]["row_importance"]  # token counts
    assert m["allocation"]["mode"] == "proxy" and "no output distribution" in m["allocation"]["note"]
    assert (tmp_path / "q" / "modules.json").is_file() and (tmp_path / "q" / "1_Pooling").is_dir()
    tok = AutoTokenizer.from_pretrained(tmp_path / "q")
    base = AutoModel.from_pretrained(folder).eval()
    quant = AutoModel.from_pretrained(tmp_path / "q").eval()
    assert type(quant).__name__ == "BertModel"
    a = sentence_embeddings(base, tok, SENTENCES)
    b = sentence_embeddings(quant, tok, SENTENCES)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.98, cos


def test_minilm_default_config_converts_without_self_calibration(tmp_path):
    """An encoder cannot sample its own calibration text: the default config still converts it,
    data-free, with a warning, and the manifest and card say why."""
    with pytest.warns(UserWarning, match="cannot generate"):
        m = eoq.quantize_model(testmodels.minilm(), tmp_path / "q", progress=False, verbose=False)
    assert m["calibration"] == {"source": None, "requested": "self", "reason": "BertModel cannot generate"}
    e = m["tensors"]["encoder.layer.0.attention.self.query.weight"]
    assert e["kind"] == "quantized" and "awq_scales" not in e["parts"]
    assert "BertModel cannot generate" in (tmp_path / "q" / "README.md").read_text()


def test_eval_of_the_converted_smollm2_against_its_base(smollm2_eoq, tmp_path, capsys):
    """`eoq eval` on the converted folder against the GGUF: the same windows through both models."""
    import json

    from eoq.cli import main

    out, _ = smollm2_eoq
    text = tmp_path / "text.txt"
    text.write_text(" ".join(SENTENCES * 40))
    rc = main(["eval", str(out), "--text", str(text), "--base", str(testmodels.smollm2_gguf()), "--n-ctx", "128",
               "--max-windows", "3", "--out", str(tmp_path / "ev"), "--no-progress"])
    assert rc == 0
    assert "KLD mean" in capsys.readouterr().out
    s = json.loads((tmp_path / "ev" / "eval_summary.json").read_text())
    r = s["result"]
    assert (r["protocol"], r["windows"], r["tokens"]) == ("llama.cpp", 3, 3 * 63)
    assert 0 < r["kld"]["mean"] < 1 and 0.5 < r["same_top1"] < 1 and r["ppl"] > 1 and r["base"]["ppl"] > 1
    assert s["model"]["kind"] == "eoq" and s["base"]["kind"] == "gguf"
    assert s["model"]["fingerprint"] != s["base"]["fingerprint"]
    gens = json.loads((tmp_path / "ev" / "sample_generations.json").read_text())
    assert len(gens) == 4 and all(g["model"].strip() and g["base"].strip() for g in gens)


def test_eval_of_an_encoder_is_embedding_cosine(tmp_path, minilm_text):
    from eoq.evaluate.compare import evaluate

    q = tmp_path / "q"
    eoq.quantize_model(testmodels.minilm(), q, eoq.QuantConfig(calibration=None, awq=False), progress=False,
                       verbose=False)
    s = evaluate(q, str(minilm_text), base=testmodels.minilm(), out_dir=q, progress=False)
    c = s["result"]["cosine"]
    assert s["result"]["protocol"] == "embedding-cosine" and s["result"]["sentences"] >= 1
    assert 0.9 < c["min"] <= c["p1"] <= c["mean"] <= 1.0  # data-free 4 bits, one 256-token input
    from eoq.convert.card import write_card
    assert "cosine similarity to the base" in write_card(q).read_text()
