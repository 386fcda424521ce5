"""Lloyd-Max codebooks: known Gaussian optima, the sphere law, sorted-boundary assignment."""

import math

import numpy as np
import pytest
import torch

from eoq import ops

# Max (1960) / Lloyd (1982): MSE of the optimal 2^b-level quantiser of N(0, 1).
GAUSSIAN_MSE = {1: 1 - 2 / math.pi, 2: 0.1175, 3: 0.03454, 4: 0.009497, 5: 0.002499}


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_gaussian_mse_matches_theory(bits):
    cb = ops.lloyd_max(bits)
    assert cb.mse == pytest.approx(GAUSSIAN_MSE[bits], rel=0.01)
    c = cb.centroids.numpy()
    assert np.all(np.diff(c) > 0) and np.allclose(c, -c[::-1], atol=1e-6)  # sorted, symmetric
    np.testing.assert_allclose(cb.boundaries.numpy(), (c[1:] + c[:-1]) / 2)


def test_known_centroids_two_bits():
    # Max's table: levels +-0.4528, +-1.5104 for 4 levels.
    np.testing.assert_allclose(ops.lloyd_max(2).centroids.numpy(), [-1.5104, -0.4528, 0.4528, 1.5104], atol=2e-3)


def test_reported_mse_matches_monte_carlo():
    cb = ops.lloyd_max(3)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=2_000_000).astype(np.float32))
    codes = ops.codebook_quantize(x, cb.boundaries)
    mse = float(((ops.codebook_dequantize(codes, cb.centroids) - x) ** 2).mean())
    assert mse == pytest.approx(cb.mse, rel=0.01)


@pytest.mark.parametrize("dim", [8, 128, 1024])
def test_sphere_law(dim):
    cb = ops.lloyd_max(4, density="sphere", dim=dim)
    rng = np.random.default_rng(dim)
    v = rng.normal(size=(200_000, dim))
    x = torch.from_numpy((v[:, 0] / np.linalg.norm(v, axis=1)).astype(np.float32))
    codes = ops.codebook_quantize(x, cb.boundaries)
    mse = float(((ops.codebook_dequantize(codes, cb.centroids) - x) ** 2).mean())
    assert mse == pytest.approx(cb.mse, rel=0.03)
    assert np.all(np.abs(cb.centroids.numpy()) < 1)
    if dim >= 128:  # the law tends to N(0, 1/dim)
        assert cb.mse * dim == pytest.approx(GAUSSIAN_MSE[4], rel=0.03)


@pytest.mark.parametrize("bits", [1, 6, 8])
def test_all_widths_converge(bits):
    cb = ops.lloyd_max(bits, grid=16385)
    assert cb.centroids.numel() == 1 << bits and cb.boundaries.numel() == (1 << bits) - 1
    # Panter-Dite high-rate approximation sqrt(3) pi / 2 * 4^-b for large b
    if bits >= 6:
        assert cb.mse == pytest.approx(math.sqrt(3) * math.pi / 2 * 4.0**-bits, rel=0.1)


def test_grid_and_iterations_configurable():
    coarse = ops.lloyd_max(4, grid=257, iters=5)
    assert coarse.iterations == 5
    fine = ops.lloyd_max(4, grid=32769)
    assert fine.mse < coarse.mse


def test_codebook_quantize_matches_searchsorted(threads):
    b = torch.tensor([-1.0, -0.25, 0.0, 0.5, 2.0])
    x = torch.from_numpy(np.random.default_rng(1).normal(size=100_001).astype(np.float32))
    x[:5] = b  # exactly on a boundary: goes up
    want = np.searchsorted(b.numpy(), x.numpy(), side="right")
    for t in threads:
        torch.set_num_threads(t)
        assert np.array_equal(ops.codebook_quantize(x, b).numpy(), want)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        ops.lloyd_max(9)
    with pytest.raises(ValueError, match="dim"):
        ops.lloyd_max(3, density="sphere")
    with pytest.raises(ValueError, match="dim >= 3"):
        ops.lloyd_max(3, density="sphere", dim=2)
    with pytest.raises(ValueError, match="density"):
        ops.lloyd_max(3, density="laplace")
    with pytest.raises(ValueError, match="non-finite value at index 2"):
        ops.codebook_quantize(torch.tensor([0.0, 1.0, float("inf")]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="increasing"):
        ops.codebook_quantize(torch.zeros(3), torch.tensor([1.0, 0.0]))
