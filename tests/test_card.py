"""The model card (eoq card) and the hub upload's dry run (eoq push --dry-run), offline."""

from __future__ import annotations

import json

import pytest
import torch

import eoq
from eoq.cli import main
from eoq.evaluate.compare import evaluate_tokens

from tinymodels import build, save


@pytest.fixture
def folder(tmp_path):
    src = save("llama", tmp_path / "src")
    out = tmp_path / "q"
    eoq.quantize_model(src, out, eoq.QuantConfig(calibration=None, awq=False,
                                                 protect=[eoq.ProtectRule("lm_head", regex=True)]),
                       progress=False, verbose=False)
    return out


def test_card_front_matter_and_sections(folder):
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "eoq" in card.data.tags and "eoq-ecsq" in card.data.tags
    text = card.text
    for section in ("## Snapshot", "## Storage", "## Evaluation", "## How to load", "## Reproduce", "## Limitations"):
        assert section in text, section
    assert "Not evaluated yet" in text and "regex `lm_head`: kept as is" in text
    assert "AutoModelForCausalLM.from_pretrained" in text and "from load_quantized import load" in text


def test_card_carries_the_evaluation_and_base_model(folder, capsys):
    base = build("llama", dtype=torch.float32)
    quant = eoq.load_quantized(folder, dtype=torch.float32)[0]
    ids = torch.randint(3, 320, (200,), generator=torch.Generator().manual_seed(0))
    result = evaluate_tokens(quant, ids, base, "llama.cpp", 64, bos_id=1, progress=False)
    summary = {"model": {"kind": "eoq", "name": str(folder)}, "text": {"source": "random.txt", "sha256_16": "0" * 16,
                                                                        "tokens": 200}, "result": result}
    (folder / "eval_summary.json").write_text(json.dumps(summary))
    (folder / "sample_generations.json").write_text(json.dumps([
        {"prompt": "Say hi", "model": "Hello there, how are you?", "base": "Hi!"}]))
    assert main(["card", str(folder), "--base-model", "someone/tiny-llama"]) == 0
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "someone/tiny-llama" and card.data.base_model_relation == "quantized"
    assert f"{result['ppl']:.4f}" in card.text and f"{result['base']['ppl']:.4f}" in card.text
    assert "this model: Hello there, how are you?" in card.text
    # A degenerate generation is left out, with the reason.
    (folder / "sample_generations.json").write_text(json.dumps([
        {"prompt": "Say hi", "model": "the the the the the the the the the the", "base": "Hi!"}]))
    main(["card", str(folder)])
    text = (folder / "README.md").read_text()
    assert "Left out" in text and "repetitive output" in text and "the the the" not in text


def test_push_dry_run_lists_the_folder(folder, capsys):
    (folder / ".hidden").write_text("x")
    assert main(["push", str(folder), "someone/tiny-eoq", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[-1] for line in out.splitlines() if line.strip() and not line.startswith("would")}
    assert {"model.safetensors", "quant_manifest.json", "config.json", "README.md", "load_quantized.py",
            "generation_config.json"} <= listed
    assert ".hidden" not in listed and "would upload" in out


def test_push_refuses_a_damaged_folder(folder, capsys):
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-50] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert main(["push", str(folder), "someone/tiny-eoq", "--dry-run"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
