"""Damaged and hostile folders (tests/adversarial.py) fail with a clear FormatError on every
loader: eoq.read_state_dict, eoq.load_quantized, transformers' from_pretrained after
``import eoq``, and the folder's own load_quantized.py without eoq. Each loader runs in a
subprocess under an address-space cap, so a memory bomb fails the test, not the machine."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

import eoq
from eoq.calibrate.statistics import collect_stats
from tinymodels import build, save, with_outliers

import adversarial

LOADERS = ("read_state_dict", "load_quantized", "from_pretrained", "standalone")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("adversarial")
    src = save("llama", root / "src")
    stats = with_outliers(collect_stats(build("llama"), [torch.randint(3, 320, (64,)) for _ in range(4)],
                                        progress=False))
    rules = [eoq.ProtectRule("down_proj", regex=True, action="quantize", method="absmax", bits=4),
             eoq.ProtectRule(r"layers\.1\.mlp\.up_proj", regex=True, action="quantize", method="polar", bits=3),
             eoq.ProtectRule(r"layers\.0\.self_attn\.o_proj", regex=True, action="quantize", method="ecsq", bits=10)]
    cfg = eoq.QuantConfig(bits=4, allocation="proxy", protect=rules)
    base = root / "base"
    eoq.quantize_model(src, base, cfg, stats=stats, progress=False, verbose=False)
    names = adversarial.make_cases(base, root / "cases")
    return base, root / "cases", names


def test_the_base_folder_loads_everywhere(cases):
    base, _, _ = cases
    sd = eoq.read_state_dict(base)
    m = eoq.format.repo.read_manifest(base)
    methods = {e.get("method") for e in m["tensors"].values()}
    assert {"ecsq", "absmax", "polar"} <= methods
    assert any(e.get("meta", {}).get("low_bits", 0) > 0 for e in m["tensors"].values())  # codes past 8 bits
    assert any("awq_scales" in e.get("parts", {}) for e in m["tensors"].values())
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    for name, t in sd.items():
        assert torch.equal(model.state_dict()[name], t.to(torch.bfloat16)), name


@pytest.mark.parametrize("kind", LOADERS)
def test_every_mutation_fails_clearly(cases, kind, tmp_path):
    base, root, names = cases
    out = tmp_path / "results.json"
    here = pathlib.Path(__file__).parent
    r = subprocess.run([sys.executable, str(here / "adversarial.py"), kind, str(root), str(out), str(base)],
                       capture_output=True, text=True, timeout=900, cwd=here)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(names)
    bad = {case: res for case, res in results.items() if res[0] != "FormatError"}
    assert not bad, f"{kind}: {len(bad)} of {len(results)} mutations did not fail with FormatError:\n" + \
        "\n".join(f"  {c}: {t}: {msg[:300]}" for c, (t, msg) in sorted(bad.items()))
    vague = {c: msg for c, (_, msg) in results.items() if not msg.strip()}
    assert not vague, f"{kind}: empty messages for {sorted(vague)}"
