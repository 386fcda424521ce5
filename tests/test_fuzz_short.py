"""A short run of each fuzz harness (tests/fuzz/, the long ASan run is `make fuzz`): a fixed
number of executions with a fixed seed against the installed extension, which must end with
exit status 0 and no finding (no exception other than the ones the API promises, no silent
wrong output, no path escape, no crash). About 15-20 s each on one core."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

import atheris  # noqa: E402,F401  (make test installs it; the fuzz run is part of the suite)

FUZZ = pathlib.Path(__file__).resolve().parent / "fuzz"

CASES = {
    # harness: (executions, libFuzzer options)
    "fuzz_rans.py": (20_000, ["-max_len=8192", "-len_control=0"]),
    "fuzz_folder.py": (2_500, ["-max_len=512", "-len_control=0"]),
}


def run_harness(harness: str, tmp_path: pathlib.Path) -> tuple[subprocess.CompletedProcess, dict]:
    runs, options = CASES[harness]
    findings, corpus = tmp_path / "findings", tmp_path / "corpus"
    findings.mkdir()
    corpus.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("LD_PRELOAD", None)
    cmd = [sys.executable, str(FUZZ / harness), f"--findings={findings}", f"-runs={runs}", "-seed=1",
           f"-artifact_prefix={findings}/", "-timeout=60", "-rss_limit_mb=6144", "-print_final_stats=1",
           *options, str(corpus)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    summaries = sorted(findings.glob("*-summary.json"))
    summary = json.loads(summaries[0].read_text()) if summaries else {}
    return r, summary


@pytest.mark.parametrize("harness", sorted(CASES))
def test_short_fuzz_run_has_no_findings(harness, tmp_path):
    r, summary = run_harness(harness, tmp_path)
    tail = r.stderr[-6000:]
    assert summary, f"{harness}: no summary written (exit status {r.returncode})\n{tail}"
    found = summary["findings"]
    assert not found, (f"{harness}: {len(found)} finding(s); reproducers in {tmp_path / 'findings'}\n"
                       + "\n".join(f"  {k}: {v.get('mutation')}: {str(v.get('message'))[:300]}"
                                   for k, v in found.items()) + f"\n{tail}")
    assert r.returncode == 0, f"{harness}: exit status {r.returncode}\n{tail}"
    assert summary["executions"] == CASES[harness][0], summary
    # the run reached past the first checks: some inputs were accepted, most rejected
    outcomes = summary["outcomes"]
    assert any(k.startswith(("decoded", "loaded")) for k in outcomes), outcomes
    assert sum(v for k, v in outcomes.items() if "Error" in k) > CASES[harness][0] // 4, outcomes
