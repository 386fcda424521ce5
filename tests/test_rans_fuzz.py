"""Fuzzing the decoder: mutated or truncated valid streams must raise CorruptStreamError
(or, never seen but allowed, decode to the original); never crash, never return other data."""

import numpy as np
import pytest
import torch

import eoq
from eoq import ops


def streams():
    rng = np.random.default_rng(0)
    small = np.clip(np.rint(rng.normal(8, 3, 70_000)), 0, 15).astype(np.uint8)  # 2 chunks of 64Ki
    tiny = rng.integers(0, 256, 100).astype(np.uint8)
    ones = np.full(1000, 3, np.uint8)
    for x in (small, tiny, ones):
        t = torch.from_numpy(x)
        yield t, ops.rans_encode(t, chunk_size=1 << 16)


def check(mutated: torch.Tensor, original: torch.Tensor):
    try:
        out = ops.rans_decode(mutated)
    except eoq.CorruptStreamError:
        return "raised"
    assert torch.equal(out, original), "corrupt stream decoded to different data without an error"
    return "same"


@pytest.mark.parametrize("seed", range(3))
def test_random_bit_flips(seed):
    rng = np.random.default_rng(seed)
    for x, s in streams():
        for _ in range(1000):
            m = s.clone()
            for _ in range(int(rng.integers(1, 4))):
                pos = int(rng.integers(0, m.numel()))
                m[pos] ^= 1 << int(rng.integers(0, 8))
            check(m, x)


def test_byte_overwrites():
    rng = np.random.default_rng(10)
    for x, s in streams():
        for _ in range(1500):
            m = s.clone()
            pos = int(rng.integers(0, m.numel()))
            m[pos] = int(rng.integers(0, 256))
            check(m, x)


def test_truncations_and_extensions():
    rng = np.random.default_rng(11)
    for x, s in streams():
        cuts = set(range(0, min(200, s.numel()))) | {int(c) for c in rng.integers(0, s.numel(), 500)}
        for cut in sorted(cuts):
            with pytest.raises(eoq.CorruptStreamError):
                ops.rans_decode(s[:cut].clone())
        with pytest.raises(eoq.CorruptStreamError, match="extra bytes"):
            ops.rans_decode(torch.cat([s, torch.zeros(2, dtype=torch.uint8)]))


def test_every_single_byte_of_a_small_stream():
    x = torch.from_numpy(np.random.default_rng(12).integers(0, 7, 300).astype(np.uint8))
    s = ops.rans_encode(x, chunk_size=1 << 16)
    for pos in range(s.numel()):
        for delta in (1, 0x80):
            m = s.clone()
            m[pos] ^= delta
            assert check(m, x) == "raised"
