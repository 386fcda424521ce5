"""Every rANS code path (scalar, AVX2, AVX-512) writes and reads the same bytes.

The path is fixed per process by EOQ_RANS_DECODER, so each runs in a subprocess that
encodes a set of inputs, decodes the reference streams, fuzzes them, and prints digests.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import hashlib, json, numpy as np, torch, eoq
from eoq import ops
rng = np.random.default_rng(0)
inputs = {
    "empty": np.zeros(0, np.uint8),
    "odd": rng.integers(0, 256, 33).astype(np.uint8),
    "skewed": np.clip(np.rint(rng.normal(16, 4, 700_001)), 0, 31).astype(np.uint8),
    "six-bit": np.clip(np.rint(rng.normal(32, 9, 300_001)), 0, 63).astype(np.uint8),  # alphabet 33..64
    "alphabet-33": rng.integers(0, 33, 70_000).astype(np.uint8),
    "uniform": rng.integers(0, 256, 300_000).astype(np.uint8),
    "single": np.full(200_000, 255, np.uint8),
    "rare": np.where(rng.random(500_000) < 1e-4, rng.integers(0, 256, 500_000), 3).astype(np.uint8),
}
out = {"name": ops.rans_decoder(), "enc": {}, "dec_ok": True, "fuzz_ok": True}
for scale in (10, 12, 15):
    for key, x in inputs.items():
        t = torch.from_numpy(x)
        s = ops.rans_encode(t, scale_bits=scale, chunk_size=1 << 16)
        out["enc"][f"{key}/{scale}"] = hashlib.sha256(s.numpy().tobytes()).hexdigest()
        out["dec_ok"] &= bool(torch.equal(ops.rans_decode(s), t))
s = ops.rans_encode(torch.from_numpy(inputs["skewed"][:70_000]), chunk_size=1 << 16)
for i in range(1500):
    m = s.clone()
    m[int(rng.integers(0, m.numel()))] ^= 1 << int(rng.integers(0, 8))
    try:
        ops.rans_decode(m)
        out["fuzz_ok"] = False
    except eoq.CorruptStreamError:
        pass
print(json.dumps(out))
"""


def run_path(path: str) -> dict:
    env = dict(os.environ, EOQ_RANS_DECODER=path)
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        if "this CPU does not support it" in r.stderr:
            pytest.skip(f"this CPU has no {path} path")
        raise AssertionError(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def scalar():
    return run_path("scalar")


@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512"])
def test_path_matches_scalar(path, scalar):
    got = run_path(path)
    assert got["name"] == path
    assert got["dec_ok"] and got["fuzz_ok"]
    assert got["enc"] == scalar["enc"]


def test_unknown_path_is_an_error():
    env = dict(os.environ, EOQ_RANS_DECODER="neon9")
    r = subprocess.run([sys.executable, "-c", "import torch, eoq; eoq.ops.rans_decoder()"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "expected scalar, avx2 or avx512" in r.stderr
