"""A quiet library: quantize_model prints nothing (progress bars are tqdm's, off with
progress=False) and logs to the "eoq" logger; the summary the CLI and the demo print fits one
screen whatever the number of distinct rates, and `eoq info --all` has every tensor."""

from __future__ import annotations

import logging

import pytest

import eoq
from eoq.convert.summary import summary_table

from tinymodels import save

SCREEN = 24  # lines


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A whole-model ecsq budget over a tiny Llama: every tensor its own rate."""
    root = tmp_path_factory.mktemp("summary")
    out = root / "q"
    cfg = eoq.QuantConfig(bits=4, calibration=None, awq=False)
    src = save("llama", root / "src")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("eoq")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        import contextlib
        import io

        out_text, err_text = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out_text), contextlib.redirect_stderr(err_text):
            manifest = eoq.quantize_model(src, out, cfg, progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return {"out": out, "manifest": manifest, "stdout": out_text.getvalue(), "stderr": err_text.getvalue(),
            "records": records}


def test_quantize_model_prints_nothing_and_logs_its_summary(converted):
    assert converted["stdout"] == "" and converted["stderr"] == ""
    messages = [r.getMessage() for r in converted["records"]]
    assert any("whole model:" in m and str(converted["out"]) in m for m in messages)
    assert all(r.levelno == logging.INFO for r in converted["records"])


def test_summary_is_one_row_per_kind_and_method(converted):
    manifest = converted["manifest"]
    rates = {e["bits_per_weight"] for e in manifest["tensors"].values() if e["kind"] == "quantized"}
    assert len(rates) > 3  # many distinct rates ...
    text = summary_table(manifest)
    lines = text.splitlines()
    assert len(lines) <= SCREEN  # ... one screen
    quantized = [line for line in lines if line.startswith("quantized")]
    assert len(quantized) == 1
    lo, hi = (float(x) for x in quantized[0].split()[-1].split("-"))
    assert lo == pytest.approx(min(rates), abs=0.006) and hi == pytest.approx(max(rates), abs=0.006)
    assert sum(line.startswith("  ") for line in lines) == 5  # the five largest tensors
    assert any(line.startswith("budget:") for line in lines) and any(line.startswith("whole model:") for line in lines)
    # the kinds' tensor counts add up to the manifest's
    kinds = {line.split()[0]: int(line.split()[2]) for line in lines[1:] if line.split()[0] in
             ("quantized", "passthrough", "protected", "tied")}
    assert sum(kinds.values()) == len(manifest["tensors"])


def test_info_all_lists_every_tensor(converted, capsys):
    from eoq.cli import main

    assert main(["info", str(converted["out"]), "--all"]) == 0
    out = capsys.readouterr().out
    for name in converted["manifest"]["tensors"]:
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert main(["info", str(converted["out"])]) == 0
    assert len(capsys.readouterr().out.splitlines()) <= SCREEN


def test_verbose_prints_only_when_asked(tmp_path, capsys):
    cfg = eoq.QuantConfig(method="absmax", bits=4, calibration=None, awq=False)
    src = save("llama", tmp_path / "src")
    eoq.quantize_model(src, tmp_path / "q", cfg, progress=False, verbose=True)
    out = capsys.readouterr().out
    assert "whole model:" in out and "wall time" in out
