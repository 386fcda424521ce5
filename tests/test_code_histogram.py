"""The uniform quantizer's one-pass histogram (cpp/code_histogram.cpp) against its torch
reference: the counts bit for bit, each row's error within 1e-12 relative (only the
order of a float64 sum differs), at any thread count."""

import pytest
import torch

from eoq import ops


def reference(x: torch.Tensor, step: float):
    """The obvious version: round, count, square (what ecsq computed before the kernel)."""
    q = torch.round(x / step)
    qmin = int(q.min())
    hist = torch.bincount((q - qmin).long().reshape(-1))
    err = (q * step - x).pow(2).sum(1, dtype=torch.float64)
    return qmin, hist, err


def check(x, step):
    qmin, hist, err = reference(x, step)
    got = ops.code_histogram(x, step)
    assert got.qmin == qmin
    assert torch.equal(got.hist, hist)
    torch.testing.assert_close(got.row_error, err, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (257, 1000), (40, 5000)])
@pytest.mark.parametrize("step", [1e-3, 0.0137, 0.5, 3.0])
def test_matches_reference(shape, step):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0] * 7 + shape[1])) * 0.05
    check(x, step)


def test_ties_round_half_to_even():
    # Exact halves (x / step = k + 0.5): torch.round goes to the even neighbour; so must the kernel.
    x = (torch.arange(-20, 21, dtype=torch.float32) + 0.5).reshape(1, -1) * 0.25
    check(x, 0.25)
    assert int(ops.code_histogram(x, 0.25).hist.sum()) == x.numel()


def test_same_at_any_thread_count():
    x = torch.randn(1024, 3000, generator=torch.Generator().manual_seed(1))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.code_histogram(x, 0.01)
        torch.set_num_threads(max(2, old))
        b = ops.code_histogram(x, 0.01)
    finally:
        torch.set_num_threads(old)
    assert a.qmin == b.qmin and torch.equal(a.hist, b.hist) and torch.equal(a.row_error, b.row_error)


def test_given_range_and_no_error():
    x = torch.randn(64, 100, generator=torch.Generator().manual_seed(2))
    lo, hi = float(x.min()), float(x.max())
    got = ops.code_histogram(x, 0.1, x_range=(lo, hi), row_error=False)
    qmin, hist, _ = reference(x, 0.1)
    assert got.row_error is None and got.qmin == qmin and torch.equal(got.hist, hist)


def test_bad_input_is_an_error_not_a_miscount():
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="outside the given range"):
        ops.code_histogram(x, 0.1, x_range=(0.0, 0.5))  # a range narrower than x
    nan = x.clone()
    nan[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.code_histogram(nan, 0.1, x_range=(-5.0, 5.0))
    with pytest.raises(ValueError, match="step"):
        ops.code_histogram(x, 0.0)
    with pytest.raises(ValueError, match="span"):
        ops.code_histogram(x, 1e-12)  # would need ~10^12 bins: refused before any allocation
    with pytest.raises(ValueError, match="2-D float32"):
        ops.code_histogram(x.double(), 0.1)


@pytest.mark.parametrize("step", [0.3, 0.01, 2e-4])  # k = 0, and codes past 256 levels (k > 0)
def test_ecsq_rate_from_the_histogram_is_the_rate_from_the_codes(step):
    from eoq.methods import ecsq

    x = torch.randn(300, 700, generator=torch.Generator().manual_seed(4))
    q = torch.round(x / step)
    assert ecsq.counts_coded_bits(ops.code_histogram(x, step).hist) == ecsq.coded_bits(q)
    padded = torch.nn.functional.pad(ops.code_histogram(x, step).hist, (5, 9))  # empty end bins are ignored
    assert ecsq.counts_coded_bits(padded) == ecsq.coded_bits(q)


def test_ecsq_groups_merge_their_histograms():
    from eoq.methods import ecsq

    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(5))
    p = ecsq.Problem(w, group_rows=32)
    steps = [0.05, 0.2, 0.011]
    assert p.total_bits(steps, w.numel()) == ecsq.coded_bits(p.codes(steps)) + 32 * p.stored_steps


def recon_reference(x, q, row_step, top):
    """The sums as fit_recon computed them in torch before the kernel (bincount by |q|)."""
    s = row_step.double().reshape(-1, 1)
    t = x.double() / s
    w = (s ** 2).expand_as(t).reshape(-1)
    cell = q.abs().clamp(max=top + 1).long().reshape(-1)
    tf = t.reshape(-1)
    s0 = torch.bincount(cell, weights=w, minlength=top + 2)[1:top + 1]
    s1 = torch.bincount(cell, weights=w * tf * q.sign().double().reshape(-1), minlength=top + 2)[1:top + 1]
    s2 = torch.bincount(cell, weights=w * tf * tf, minlength=top + 2)[1:top + 1]
    before = (w * (tf - q.double().reshape(-1)).pow(2)).sum()
    return torch.cat([torch.stack([s0, s1, s2], 1).reshape(-1), before.reshape(1)])


@pytest.mark.parametrize("top", [1, 4])
def test_recon_sums_match_reference(top):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(50, 300, generator=g)
    row_step = torch.rand(50, generator=g) * 0.5 + 0.2
    q = torch.round(x / row_step.reshape(-1, 1))
    q[3, :20] = -q[3, :20]  # codes whose sign disagrees with x (as feedback may choose)
    got = ops.recon_sums(x, q, row_step, top)
    torch.testing.assert_close(got, recon_reference(x, q, row_step, top), rtol=1e-12, atol=1e-12)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.recon_sums(x, q, row_step, top)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, got)


def test_recon_sums_in_row_chunks_are_the_one_call_bit_for_bit():
    """A streamed tensor (ecsq.CHUNK_VALUES) adds each chunk onto the last one's sums."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(97, 130, generator=g)
    row_step = torch.rand(97, generator=g) * 0.5 + 0.2
    q = torch.round(x / row_step.reshape(-1, 1))
    whole = ops.recon_sums(x, q, row_step, 3)
    sums = None
    for r0 in range(0, 97, 10):
        sums = ops.recon_sums(x[r0:r0 + 10], q[r0:r0 + 10], row_step[r0:r0 + 10], 3, start=sums)
    assert torch.equal(sums, whole)
    with pytest.raises(ValueError, match="start"):
        ops.recon_sums(x, q, row_step, 3, start=torch.zeros(4))
