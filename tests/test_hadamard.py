"""Walsh-Hadamard against the dense Sylvester matrix (float64), signs against splitmix64."""

import numpy as np
import pytest
import torch

from eoq import ops

MASK = (1 << 64) - 1


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def ref_signs(n: int, seed: int) -> np.ndarray:
    out = []
    for j in range(n):
        z = (seed + (j + 1) * 0x9E3779B97F4A7C15) & MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        z ^= z >> 31
        out.append(-1.0 if z >> 63 else 1.0)
    return np.array(out)


@pytest.mark.parametrize("block", [1, 2, 16, 64, 128, 1024])
@pytest.mark.parametrize("seed", [None, 0, 12345])
def test_matches_dense_matrix(block, seed):
    x = np.random.default_rng(block).normal(size=(3, 4 * block)).astype(np.float32)
    y = ops.hadamard(torch.from_numpy(x), block=block, seed=seed).numpy()
    d = np.ones(block) if seed is None else ref_signs(block, seed)
    want = (x.reshape(-1, block).astype(np.float64) * d) @ sylvester(block).T
    np.testing.assert_allclose(y.reshape(-1, block), want, rtol=0, atol=2e-6 * np.sqrt(np.log2(2 * block)))


def test_signs_match_splitmix64_reference():
    for seed in (0, 1, 2**63 + 5):
        assert np.array_equal(ops.hadamard_signs(300, seed).numpy(), ref_signs(300, seed))
    s = ops.hadamard_signs(4096, 7).numpy()
    assert abs(s.mean()) < 0.05  # balanced


def test_orthonormal_and_self_inverse():
    x = torch.randn(10, 256)
    y = ops.hadamard(x)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(ops.hadamard(y), x, rtol=0, atol=1e-5)


def test_seeded_inverse():
    x = torch.randn(7, 512)
    y = ops.hadamard(x, block=128, seed=99)
    assert not torch.allclose(ops.hadamard(y, block=128, seed=99), x, atol=1e-3)  # not self-inverse with signs
    torch.testing.assert_close(ops.hadamard(y, block=128, seed=99, inverse=True), x, rtol=0, atol=1e-5)
    assert torch.equal(y, ops.hadamard(x, block=128, seed=99))  # seeds reproduce bit for bit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_and_input_untouched(dtype):
    x = torch.randn(4, 64).to(dtype)
    keep = x.clone()
    y = ops.hadamard(x)
    assert y.dtype == dtype and torch.equal(x, keep)


def test_bad_blocks():
    with pytest.raises(ValueError, match="power of two"):
        ops.hadamard(torch.zeros(4, 96))
    with pytest.raises(ValueError, match="multiple of the block"):
        ops.hadamard(torch.zeros(4, 96), block=64)


def test_thread_count_does_not_change_output(threads):
    x = torch.randn(4096, 576)
    out = []
    for t in threads:
        torch.set_num_threads(t)
        out.append(ops.hadamard(x, block=64, seed=3))
    assert torch.equal(out[0], out[1])
