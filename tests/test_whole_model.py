"""The whole model to a budget: embeddings and head quantized by default, `bits` per parameter
over everything stored (or a target size), sensitivity allocation, resume, and bad budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import eoq
from eoq.calibrate.sensitivity import Sensitivity

from tinymodels import ARCHS, build, save, tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    out = {}
    for arch in ARCHS:
        out[arch] = save(arch, root / arch)
        tokenizer(out[arch], 320 if arch == "llama" else 300)
    return out


def stored_bits(m: dict) -> float:
    return 8 * m["totals"]["stored_bytes"] / m["totals"]["all_params"]


def safetensors_bytes(folder) -> int:
    """Every tensor byte in the folder's safetensors files, read from their headers."""
    total = 0
    for f in folder.glob("*.safetensors"):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


@pytest.mark.parametrize("arch", ARCHS)
def test_budget_met_within_half_a_percent(tiny, tmp_path, arch):
    """Default settings (self-calibration, sensitivity allocation) at several budgets: the
    safetensors' tensors average at most `bits` per parameter and at least 99.5 % of it."""
    for bits in (2.5, 4.0, 6.0):
        out = tmp_path / f"q{bits}"
        m = eoq.quantize_model(tiny[arch], out, eoq.QuantConfig(bits=bits), progress=False, verbose=False)
        assert m["allocation"]["mode"] == "sensitivity" and m["allocation"]["predicted_kl"] > 0
        assert safetensors_bytes(out) == m["totals"]["stored_bytes"]
        assert 0.995 * bits <= stored_bits(m) <= bits, (arch, bits, stored_bits(m))
        kinds = {e["kind"] for n, e in m["tensors"].items() if "embed" in n or "wte" in n or "lm_head" in n}
        assert "passthrough" not in kinds  # embeddings and head are quantized (a tied head: "tied")
    model, _ = eoq.load_quantized(out)
    assert model(torch.tensor([[1, 5, 9]])).logits.isfinite().all()


def test_target_size_and_uniform(tiny, tmp_path):
    m = eoq.quantize_model(tiny["qwen2"], tmp_path / "a", eoq.QuantConfig(target_size=100_000, calibration=None,
                                                                        awq=False), progress=False, verbose=False)
    assert 99_500 <= m["totals"]["stored_bytes"] <= 100_000
    cfg = eoq.QuantConfig(bits=3.5, calibration=None, awq=False, allocation="uniform")
    m = eoq.quantize_model(tiny["qwen2"], tmp_path / "b", cfg, progress=False, verbose=False)
    rates = {e["bits"] for e in m["tensors"].values() if e["kind"] == "quantized"}
    assert 0.995 * 3.5 <= stored_bits(m) <= 3.5
    assert max(rates) - min(rates) < 0.2  # one rate, plus what small tensors leave unspent for the next
    assert eoq.parse_size("2.1GB") == 2_100_000_000 and eoq.parse_size("1.5GiB") == 3 << 29
    with pytest.raises(ValueError, match="expected a number"):
        eoq.parse_size("2.1 gigs")


def test_allocation_follows_the_coefficients(tiny, tmp_path):
    """The same tensor gets more bits when its measured sensitivity is larger."""
    from eoq.calibrate.statistics import collect_stats

    model = build("llama", dtype=torch.float32)
    stats = collect_stats(model, [torch.randint(3, 320, (32,)) for _ in range(2)], progress=False)
    key = "model.layers.0.self_attn.q_proj.weight"
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p.dim() == 2]

    def run(c_key, out):
        c = {n: (c_key if n == key else 1.0) for n in names}  # both sums: either error model follows
        s = Sensitivity(100, dict(c), dict(c), {n: 1.0 for n in names}, {})
        return eoq.quantize_model(tiny["llama"], tmp_path / out, eoq.QuantConfig(bits=3.0), stats=stats,
                                  sensitivity=s, progress=False, verbose=False)

    low, high = run(0.01, "low"), run(100.0, "high")
    assert high["tensors"][key]["bits"] > low["tensors"][key]["bits"] + 1.0
    for m in (low, high):
        assert 0.995 * 3.0 <= stored_bits(m) <= 3.0


def test_embedding_rows_follow_their_tokens(tiny, tmp_path):
    """The tied embedding gets per-row steps from its Fisher row sums: rows of tokens the
    calibration uses get finer steps than the rest."""
    m = eoq.quantize_model(tiny["llama"], tmp_path / "q", eoq.QuantConfig(bits=4.0), progress=False, verbose=False)
    e = m["tensors"]["model.embed_tokens.weight"]
    assert e["meta"]["row_importance"] and e["meta"]["group_rows"] == 1
    from safetensors.torch import load_file
    steps = load_file(str(tmp_path / "q" / "model.safetensors"))["model.embed_tokens.weight.steps"]
    assert steps.shape == (320,) and float(steps.max() / steps.min()) > 1.5


def _killed_in_the_sensitivity_pass(folder, out, cfg) -> None:
    """A conversion run in a subprocess (1 thread) that dies once its Fisher pass ran, before keeping it."""
    code = ("import eoq, sys; eoq.quantize_model(sys.argv[1], sys.argv[2], eoq.QuantConfig.from_json(sys.argv[3]), "
            "progress=False, verbose=False)")
    env = {**os.environ, "EOQ_FAULT_IN_SENSITIVITY": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(folder), str(out), cfg.to_json()], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 75, r.stderr


def test_resume_after_a_kill_in_the_sensitivity_pass(tiny, tmp_path, monkeypatch):
    """The resumed run (2 threads) keeps the sampled text and the statistics the killed one
    (1 thread) finished, redoes only the Fisher pass, and writes the uninterrupted run's bytes."""
    from eoq.calibrate import statistics as calibration
    from eoq.calibrate import sampling_blockwise

    cfg = eoq.QuantConfig(bits=3.5, calib_sequences=4, sensitivity_sequences=2)
    eoq.quantize_model(tiny["qwen2"], tmp_path / "ref", cfg, progress=False, verbose=False)
    _killed_in_the_sensitivity_pass(tiny["qwen2"], tmp_path / "out", cfg)
    partial = tmp_path / ".out.eoq-partial"
    assert not (partial / "sensitivity.safetensors").exists()
    assert (partial / "calib_samples.safetensors").is_file() and (partial / "calib_stats.safetensors").is_file()

    def redone(*args, **kwargs):
        raise AssertionError("a finished calibration stage ran again")

    monkeypatch.setattr(sampling_blockwise, "sample_ids", redone)
    monkeypatch.setattr(calibration, "collect_stats_blockwise", redone)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        eoq.quantize_model(tiny["qwen2"], tmp_path / "out", cfg, progress=False, verbose=False)
    finally:
        torch.set_num_threads(before)
    for f in ("model.safetensors", "quant_manifest.json"):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


@pytest.mark.parametrize("damage", ["shape", "ids", "garbage"])
def test_resume_refuses_damaged_samples(tiny, tmp_path, damage):
    """The kept samples are checked before use: a wrong shape, an id outside the vocabulary
    or a file that is not one is refused, naming the file."""
    from safetensors.torch import save_file

    from eoq.calibrate.sampling_blockwise import SAMPLES_FORMAT

    cfg = eoq.QuantConfig(bits=3.5, calib_sequences=4, sensitivity_sequences=2)
    _killed_in_the_sensitivity_pass(tiny["qwen2"], tmp_path / "out", cfg)
    samples = tmp_path / ".out.eoq-partial" / "calib_samples.safetensors"
    if damage == "garbage":
        samples.write_bytes(b"\x10" + bytes(40))
    else:
        from safetensors import safe_open

        with safe_open(str(samples), framework="pt") as f:
            ids = f.get_tensor("ids")
        ids = ids[:, :-1] if damage == "shape" else ids.index_fill(1, torch.tensor([3]), 10 ** 6)
        save_file({"ids": ids.contiguous()}, str(samples), metadata={"format": SAMPLES_FORMAT})
    with pytest.raises(ValueError, match="calib_samples.safetensors: the sampled calibration text"):
        eoq.quantize_model(tiny["qwen2"], tmp_path / "out", cfg, progress=False, verbose=False)


def test_budget_errors_name_the_numbers(tiny, tmp_path):
    cfg = eoq.QuantConfig(target_size=1000, calibration=None, awq=False)
    with pytest.raises(ValueError, match=r"below what the passthrough tensors alone take \(0.00[0-9] MB\)"):
        eoq.quantize_model(tiny["gpt2"], tmp_path / "q", cfg, progress=False, verbose=False)
    keep = eoq.QuantConfig(bits=2.0, calibration=None, awq=False, quantize_embeddings=False, quantize_lm_head=False)
    with pytest.raises(ValueError, match="below the smallest size the settings allow: passthrough"):
        eoq.quantize_model(tiny["llama"], tmp_path / "q", keep, progress=False, verbose=False)
    assert not (tmp_path / ".q.eoq-partial").exists()


def test_source_is_named_without_a_local_path(tiny, tmp_path):
    m = eoq.quantize_model(tiny["llama"], tmp_path / "q", eoq.QuantConfig(calibration=None, awq=False),
                           progress=False, verbose=False)
    assert m["source"]["name"] == "llama"
    text = (tmp_path / "q" / "quant_manifest.json").read_text() + (tmp_path / "q" / "README.md").read_text()
    assert str(tiny["llama"].parent) not in text
    card = (tmp_path / "q" / "README.md").read_text()
    assert "| bits per parameter, whole model |" in card
    from eoq.format.sources import hub_id_of_cache_folder
    assert hub_id_of_cache_folder(tmp_path / "hub" / "models--Org--Some-Model" / "snapshots" / "abc") == "Org/Some-Model"


def test_cli_target_size_and_keep_embeddings(tiny, tmp_path, capsys):
    from eoq.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(tiny["llama"]), "-o", str(out), "--data-free", "--target-size", "0.12MB",
                 "--no-progress"]) == 0
    m = json.loads((out / "quant_manifest.json").read_text())
    assert 0.995 * 120_000 <= m["totals"]["stored_bytes"] <= 120_000
    assert "whole model:" in capsys.readouterr().out
    out2 = tmp_path / "k"
    assert main(["quantize", str(tiny["llama"]), "-o", str(out2), "--data-free", "--keep-embeddings", "--bits", "6",
                 "--no-progress"]) == 0
    m = json.loads((out2 / "quant_manifest.json").read_text())
    assert m["tensors"]["model.embed_tokens.weight"]["kind"] == "passthrough"
    assert stored_bits(m) <= 6.0
