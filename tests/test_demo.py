"""`make demo` end to end (data-free, to keep it short): the SmolLM2 GGUF converted, loaded
with from_pretrained, generating, its sizes in a table that fits one screen, the folder
smaller than the GGUF, and the evaluation against the base on a text file."""

from __future__ import annotations

import json

from eoq import demo

SCREEN = 24


def test_demo_runs_end_to_end(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog near the river bank, "
                             f"and the people of the town watch it from the old stone bridge." for i in range(200)))
    out = tmp_path / "demo"
    rc = demo.main(["--data-free", "--out", str(out), "--no-progress", "--text", str(text), "--max-windows", "2",
                    "--json", str(tmp_path / "demo.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    for section in ("== quantize", "== load with from_pretrained", "== greedy generations", "== sizes",
                    "== evaluation against the base"):
        assert section in printed
    sizes = printed.split("== sizes\n")[1].split("\n== evaluation")[0].splitlines()
    assert len(sizes) <= SCREEN and any(line.startswith("whole model:") for line in sizes)
    assert "the eoq folder is SMALLER than its GGUF input" in printed
    figures = json.loads((tmp_path / "demo.json").read_text())
    assert figures["folder_bytes"] < figures["gguf_bytes"]
    assert all(s["eoq"] for s in figures["samples"])
    assert figures["evaluation"]["kld"]["mean"] > 0 and (out / "eval_summary.json").is_file()
