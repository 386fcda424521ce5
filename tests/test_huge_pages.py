"""`import eoq` puts large CPU tensors on transparent huge pages (eoq/__init__.py's docstring).

Each check runs in a fresh interpreter: PyTorch reads THP_MEM_ALLOC_ENABLE once per process.
"""

import json
import os
import subprocess
import sys

import pytest

# a fresh process imports eoq (optionally torch first), faults a 256 MiB tensor in, and reports
# the switch's value, the minor faults the fill took and the huge pages it holds
PROBE = r"""
import json, os, resource, sys
if sys.argv[1] == "torch-first":
    import torch
import eoq, torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.empty(64 << 20, dtype=torch.float32)
x.fill_(1.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
huge = [int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")]
print(json.dumps({"switch": os.environ.get("THP_MEM_ALLOC_ENABLE"), "faults": faults, "huge_kib": huge[0]}))
"""

PAGES_4K = (256 << 20) // 4096  # what the fill faults without huge pages


def _probe(order: str = "eoq-first", **env) -> dict:
    run_env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    run_env.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE, order], env=run_env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "absent"
    return text[text.index("[") + 1:text.index("]")]


needs_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() not in ("always", "madvise"),
                               reason="transparent huge pages are off or absent on this kernel")


def test_switch_set_unless_the_user_set_it():
    assert _probe()["switch"] == "1"
    assert _probe(THP_MEM_ALLOC_ENABLE="0")["switch"] == "0"


@needs_thp
@pytest.mark.parametrize("order", ["eoq-first", "torch-first"])
def test_large_tensor_faults_in_huge_pages(order):
    on = _probe(order)
    assert on["huge_kib"] >= 128 << 10, on  # most of the 256 MiB on 2 MiB pages
    assert on["faults"] < PAGES_4K // 16, on


# in "always" mode the kernel gives huge pages unasked, so only "madvise" shows the switch off
@pytest.mark.skipif(_thp_mode() != "madvise", reason="huge pages are given only when asked for in madvise mode")
def test_user_can_turn_it_off():
    off = _probe(THP_MEM_ALLOC_ENABLE="0")
    assert off["huge_kib"] == 0, off
    assert off["faults"] > PAGES_4K // 2, off
