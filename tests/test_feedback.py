"""GPTQ error feedback (cpp/gptq.h, eoq.methods.feedback): kernel against its torch reference bit for
bit, determinism, the gain over plain rounding, the covariance rules and the domain maps."""

import contextlib
import math
import re
import warnings

import pytest
import torch

from eoq import _C
from eoq import ops
from eoq.methods import feedback as fb
from eoq.methods import rotation

KERNELS = ("baseline", "avx2", "avx512")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))


def correlated_inputs(n: int, tokens: int, seed: int) -> torch.Tensor:
    """a = L z: strongly correlated input features [n, tokens] (float64)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    return mix @ torch.randn(n, tokens, generator=g, dtype=torch.float64)


def problem(rows: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g)
    a = correlated_inputs(n, 4 * n, seed)
    return w, a @ a.T


@contextlib.contextmanager
def warns(pattern: str):
    """A RuntimeWarning matching pattern is raised inside (the others are recorded, not re-emitted)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        yield
    messages = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert any(re.search(pattern, m) for m in messages), messages


def use_kernel(monkeypatch, kernel: str) -> None:
    monkeypatch.setenv("EOQ_GPTQ_KERNEL", kernel)
    w = torch.zeros(1, 1)
    try:
        _C.gptq_quantize(w, torch.ones(1, 1), torch.ones(1, 1), 1, None, 0, 0, 1)
    except ValueError as e:
        if "does not support" in str(e):
            pytest.skip(f"this CPU has no {kernel}")
        raise


# ---- 1. the kernel is its reference, bit for bit -------------------------------------------

CASES = [  # rows, n, group (None: per row), block, codebook, qmin, qmax
    (1, 1, None, 128, False, -8, 7),
    (5, 17, None, 128, False, -(2**31), 2**31 - 1),
    (37, 300, None, 128, False, -8, 7),        # clamping active (4-bit range)
    (37, 300, 64, 50, False, -2, 1),           # groups, strong clamping, block not dividing n
    (20, 129, 7, 128, True, 0, 0),              # codebook, small groups, n = block + 1
    (16, 200, None, 1, True, 0, 0),             # block 1: every update through the panel
    (33, 150, 32, 64, False, -(2**31), 2**31 - 1),
    (19, 97, None, 200, True, 0, 0),            # block > n
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows,n,group,block,codebook,qmin,qmax", CASES)
def test_kernel_matches_reference(monkeypatch, kernel, rows, n, group, block, codebook, qmin, qmax):
    use_kernel(monkeypatch, kernel)
    w, h = problem(rows, n, seed=rows * 1000 + n)
    u = fb.inverse_cholesky(h)
    g = torch.Generator().manual_seed(n)
    cols = 1 if group is None else -(-n // group)
    scale = torch.rand(rows, cols, generator=g) * 0.4 + 0.05
    # signed scales (absmax's): the sign orients [qmin, qmax], or flips the codebook
    scale = scale * torch.where(torch.rand(rows, cols, generator=g) < 0.3, -1.0, 1.0)
    levels = torch.sort(torch.randn(16, generator=g) * 1.5)[0] if codebook else None
    w0 = w.clone()
    codes, xhat = fb.gptq(w, u, scale, group, levels, qmin, qmax, block)
    ref_codes, ref_xhat = fb.gptq_reference(w, u, scale, group, levels, qmin, qmax, block)
    assert torch.equal(w, w0)  # the input is not modified
    assert codes.dtype == torch.int32 and xhat.dtype == torch.float32
    assert same_bytes(codes, ref_codes)
    assert same_bytes(xhat, ref_xhat)
    # the reconstruction is exactly what the codes and scales give
    s = scale.repeat_interleave(group or n, dim=1)[:, :n]
    recon = levels[codes.long()] * s if codebook else codes.float() * s
    assert same_bytes(xhat, recon)
    if not codebook and qmax - qmin < 100 and codes.numel() > 1000:
        assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
        assert int(codes.min()) == qmin or int(codes.max()) == qmax  # the clamp did something


def test_ties():
    """Halfway values round half to even (grid) and to the lower level (codebook)."""
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 0.25, 0.75, 3.0]])
    u = torch.eye(8)
    codes, xhat = fb.gptq(w, u, 1.0)
    assert codes.tolist() == [[0, 2, 2, 0, -2, 0, 1, 3]]
    levels = torch.tensor([0.0, 0.5, 1.0, 3.0])
    codes, xhat = fb.gptq(w, u, 1.0, levels=levels)
    # 0.25 is halfway between levels 0 and 0.5, 0.75 between 0.5 and 1: the lower index wins
    assert codes.tolist() == [[1, 2, 3, 0, 0, 0, 1, 3]]
    ref = fb.gptq_reference(w, u, 1.0, levels=levels)
    assert same_bytes(codes, ref[0]) and same_bytes(xhat, ref[1])
    # a plateau of rounded distances far from the levels: the first index wins, like argmin
    far = torch.tensor([[1e8]])
    lv = torch.tensor([0.0, 1.0, 2.0])
    assert fb.gptq(far, torch.eye(1), 1.0, levels=lv)[0].item() == 0
    assert fb.gptq_reference(far, torch.eye(1), 1.0, levels=lv)[0].item() == 0


# ---- 2. deterministic bytes -----------------------------------------------------------------


def test_identical_bytes_for_threads_and_blocks(threads):
    w, h = problem(80, 200, seed=3)
    u = fb.inverse_cholesky(h)
    scale = w.std(dim=1, keepdim=True) / 3
    levels = torch.linspace(-2, 2, 9)
    for lv in (None, levels):
        results = []
        for t in threads:
            torch.set_num_threads(t)
            for block in (1, 32, 128, 1000):
                results.append(fb.gptq(w, u, scale, levels=lv, block=block))
        for c, x in results[1:]:
            assert same_bytes(c, results[0][0]) and same_bytes(x, results[0][1])


# ---- 3. feedback lowers the output error ------------------------------------------------------


def plain(w, scale, levels=None):
    """Plain rounding with the same quantizer: feedback through the identity (test 4 shows it is)."""
    return fb.gptq(w, torch.eye(w.shape[1]), scale, levels=levels)[1]


def test_feedback_beats_plain_rounding():
    n, rows = 256, 64
    a = correlated_inputs(n, 4096, seed=7)
    h = a @ a.T
    w = torch.randn(rows, n, generator=torch.Generator().manual_seed(8))
    u = fb.inverse_cholesky(h, name="synthetic")
    # uniform grid, a ~4-bit step
    step = w.std(dim=1, keepdim=True) / 3
    ratio_grid = fb.output_error(w, fb.gptq(w, u, step)[1], h) / fb.output_error(w, plain(w, step), h)
    # a 16-level Lloyd-Max codebook scaled to each row
    levels = ops.lloyd_max(4).centroids.float()
    sigma = w.std(dim=1, keepdim=True)
    ratio_cb = (fb.output_error(w, fb.gptq(w, u, sigma, levels=levels)[1], h)
                / fb.output_error(w, plain(w, sigma, levels), h))
    assert ratio_grid < 0.65, ratio_grid  # measured 0.49
    assert ratio_cb < 0.65, ratio_cb      # measured 0.49


# ---- 4. U = I is plain rounding --------------------------------------------------------------


def test_identity_is_plain_rounding():
    w = torch.randn(23, 70, generator=torch.Generator().manual_seed(4)) * 3
    scale = torch.rand(23, 3, generator=torch.Generator().manual_seed(5)) + 0.2
    s = scale.repeat_interleave(32, dim=1)[:, :70]
    codes, xhat = fb.gptq(w, torch.eye(70), scale, group=32, qmin=-4, qmax=5)
    want = torch.round(w / s).clamp(-4, 5).to(torch.int32)
    assert torch.equal(codes, want) and same_bytes(xhat, want.float() * s)  # an integer code: no -0
    levels = torch.tensor([-2.0, -0.7, 0.0, 0.4, 1.9])
    codes, xhat = fb.gptq(w, torch.eye(70), scale, group=32, levels=levels)
    want = ((w / s)[..., None] - levels).abs().argmin(-1)
    assert torch.equal(codes, want.to(torch.int32)) and same_bytes(xhat, levels[want] * s)


# ---- 5. degenerate covariances ------------------------------------------------------------------


@pytest.mark.parametrize("n", [60, 600])  # 600: more than one panel of the triangular inverse
def test_factor_is_the_damped_inverse(n):
    _, h = problem(1, n, seed=9)
    u = fb.inverse_cholesky(h, damp=0.01).double()
    assert torch.equal(u, torch.triu(u)) and bool((u.diagonal() > 0).all())
    hn = h / h.diagonal().mean() + 0.01 * torch.eye(n, dtype=torch.float64)
    assert torch.allclose(u.T @ u @ hn, torch.eye(n, dtype=torch.float64), atol=1e-3)
    # the scale of H does not matter
    assert torch.allclose(fb.inverse_cholesky(h * 1e6), fb.inverse_cholesky(h), rtol=1e-5, atol=1e-6)


def quantize_ok(u, n=64):
    w = torch.randn(8, n, generator=torch.Generator().manual_seed(n))
    codes, xhat = fb.gptq(w, u, w.std(dim=1, keepdim=True) / 2)
    assert bool(torch.isfinite(xhat).all())
    return w, codes, xhat


def test_rank_deficient_h_warns_and_works():
    a = correlated_inputs(64, 8, seed=1)  # 8 tokens for 64 features: rank 8
    with warns(r"model\.layers\.3\.q_proj.*8 calibration tokens"):
        u = fb.inverse_cholesky(a @ a.T, name="model.layers.3.q_proj", tokens=8)
    quantize_ok(u)


def test_zero_h_is_plain_rounding():
    with warns(r"blk\.0\.ffn_down.*zero"):
        u = fb.inverse_cholesky(torch.zeros(64, 64, dtype=torch.float64), name="blk.0.ffn_down")
    assert torch.equal(u, torch.eye(64))
    w, codes, xhat = quantize_ok(u)
    assert same_bytes(xhat, plain(w, w.std(dim=1, keepdim=True) / 2))


def test_dead_columns_are_plainly_rounded():
    a = correlated_inputs(64, 512, seed=2)
    dead = [0, 5, 17, 63]
    a[dead] = 0
    with warns(r"up_proj: 4 of 64 input columns never saw"):
        u = fb.inverse_cholesky(a @ a.T, name="up_proj")
    other = [j for j in range(64) if j not in dead]
    assert bool((u[dead][:, other] == 0).all()) and bool((u[other][:, dead] == 0).all())
    w, codes, xhat = quantize_ok(u)
    s = w.std(dim=1, keepdim=True) / 2
    original_rounded = torch.round(w[:, dead] / s).to(torch.int32).float() * s
    assert same_bytes(xhat[:, dead], original_rounded)


def test_indefinite_h_retries_then_falls_back():
    h = torch.eye(64, dtype=torch.float64)
    h[0, 1] = h[1, 0] = 3.0  # eigenvalues 4 and -2 in that 2 x 2 block
    with warns(r"attn\.k: H \+ 0\.01 .* not positive definite; retrying"):
        u = fb.inverse_cholesky(h, name="attn.k")
    assert not torch.equal(u, torch.eye(64))  # a damping of 10 x mean(diag) made it definite
    quantize_ok(u)
    h[0, 1] = h[1, 0] = 1e6
    with warns(r"attn\.v: H is not positive definite even with damping"):
        u = fb.inverse_cholesky(h, name="attn.v")
    assert torch.equal(u, torch.eye(64))


def test_bad_covariance_raises():
    with pytest.raises(ValueError, match="x.y: H must be square"):
        fb.inverse_cholesky(torch.zeros(3, 4), name="x.y")
    with pytest.raises(ValueError, match="x.y: H must be finite"):
        fb.inverse_cholesky(torch.full((3, 3), float("nan")), name="x.y")
    with pytest.raises(ValueError, match="negative diagonal"):
        fb.inverse_cholesky(-torch.eye(3), name="x.y")
    with pytest.raises(ValueError, match="damp"):
        fb.inverse_cholesky(torch.eye(3), damp=-1)


# ---- 6. the covariance in the rotated and the AWQ-scaled domains ---------------------------------


@pytest.mark.parametrize("cols,preferred,seed", [(40, 512, 11), (64, 32, None), (200, 64, 5)])
def test_rotate_hessian(cols, preferred, seed):
    block, padded = rotation.choose_block(cols, preferred)
    g = torch.Generator().manual_seed(cols)
    w = torch.randn(6, cols, generator=g)
    a = torch.randn(cols, 300, generator=g)
    x = rotation.rotate(w, block, padded, seed)                # rows M w_pad
    ar = rotation.rotate(a.T.contiguous(), block, padded, seed)  # rows M a_pad, one per token
    assert torch.allclose(x @ ar.T, w @ a, rtol=1e-4, atol=1e-3)
    h = a.double() @ a.double().T
    hr = fb.rotate_hessian(h, block, padded, seed)
    assert hr.shape == (padded, padded) and hr.dtype == torch.float64
    assert torch.allclose(hr, ar.double().T @ ar.double(), rtol=1e-5, atol=1e-3)
    # an error made in the rotated domain costs the same once mapped back
    er = torch.randn(6, padded, generator=g)
    e = rotation.unrotate(er, block, cols, seed)
    assert math.isclose(fb.output_error(er, torch.zeros_like(er), hr), fb.output_error(e, torch.zeros_like(e), h),
                        rel_tol=1e-5)


def test_feedback_in_the_rotated_domain():
    cols, rows, seed = 120, 32, 3
    block, padded = rotation.choose_block(cols, 512)  # padded 128: the rotated H is singular
    a = correlated_inputs(cols, 2048, seed=4)
    h = a @ a.T
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(5))
    x = rotation.rotate(w, block, padded, seed)
    u = fb.inverse_cholesky(fb.rotate_hessian(h, block, padded, seed), name="rotated")
    step = x.std(dim=1, keepdim=True) / 3
    fed = rotation.unrotate(fb.gptq(x, u, step)[1], block, cols, seed)
    rounded = rotation.unrotate(plain(x, step), block, cols, seed)
    assert fb.output_error(w, fed, h) < 0.8 * fb.output_error(w, rounded, h)


def test_scale_hessian():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(5, 30, generator=g, dtype=torch.float64)
    a = torch.randn(30, 100, generator=g, dtype=torch.float64)
    s = torch.rand(30, generator=g, dtype=torch.float64) * 3 + 0.1
    ws, as_ = w * s, a / s[:, None]  # AWQ: w' = w s, inputs a / s, the same outputs
    assert torch.allclose(ws @ as_, w @ a)
    hs = fb.scale_hessian(a @ a.T, s)
    assert torch.allclose(hs, as_ @ as_.T, rtol=1e-12)
    wq = torch.round(ws * 4) / 4  # any quantization of the scaled weight
    assert math.isclose(fb.output_error(ws, wq, hs), fb.output_error(w, wq / s, a @ a.T), rel_tol=1e-9)
    with pytest.raises(ValueError, match="col_scale must be finite and > 0"):
        fb.scale_hessian(a @ a.T, -s)


# ---- 7. bad arguments ----------------------------------------------------------------------------


def test_bad_arguments_raise():
    w, u, s = torch.randn(4, 10), torch.eye(10), torch.ones(4, 1)
    u_nan = torch.eye(10)
    u_nan[0, 3] = float("nan")
    bad = [
        (dict(w=torch.randn(10)), "w must be 2-D"),
        (dict(w=torch.full((4, 10), float("inf"))), "w must be finite"),
        (dict(u=torch.eye(9)), r"u must be \[10, 10\]"),
        (dict(u=torch.zeros(10, 10)), "u's diagonal must be finite and > 0"),
        (dict(u=u_nan), "u's upper triangle must be finite"),
        (dict(scale=torch.ones(3, 1)), "scale has 3 values|scale must be"),
        (dict(scale=torch.ones(4, 2)), "say how many weight columns"),
        (dict(scale=torch.ones(4, 3), group=5), r"scale must be \[rows, ceil\(n / group\)\] = \[4, 2\]"),
        (dict(scale=torch.ones(4, 2), group=4), r"= \[4, 3\]"),
        (dict(scale=torch.tensor([[1.0], [float("nan")], [1.0], [1.0]])), "scale must be finite and non-zero"),
        (dict(scale=torch.zeros(4, 1)), "scale must be finite and non-zero"),
        (dict(levels=torch.tensor([0.0, 2.0, 1.0])), "levels must be sorted"),
        (dict(levels=torch.tensor([0.0, float("nan")])), "levels must be finite"),
        (dict(levels=torch.tensor([])), "at least one"),
        (dict(qmin=3, qmax=2), r"qmin \(3\) must not exceed qmax \(2\)"),
        (dict(qmin=-(2**31) - 1), "qmin must be in"),
        (dict(group=0), "group must be in"),
        (dict(block=0), "block must be in"),
        (dict(u=torch.eye(10, dtype=torch.int64)), "u must be a floating-point tensor"),
    ]
    for kwargs, match in bad:
        args = dict(w=w, u=u, scale=s) | kwargs
        for fn in (fb.gptq, fb.gptq_reference):
            with pytest.raises(ValueError, match=match):
                fn(**args)


def test_kernel_checks_its_arguments():
    """The bindings and the kernel refuse bad input even past the Python checks."""
    w, u, s = torch.randn(4, 10), torch.eye(10), torch.ones(4, 1)
    q = (-8, 7, 128)
    with pytest.raises(ValueError, match="levels must be strictly increasing"):
        _C.gptq_quantize(w, u, s, 10, torch.tensor([0.0, 0.0]), *q)
    with pytest.raises(ValueError, match=r"scale must be \[rows, ceil\(n / group\)\]"):
        _C.gptq_quantize(w, u, s, 3, None, *q)
    with pytest.raises(ValueError, match="u must be"):
        _C.gptq_quantize(w, torch.eye(9), s, 10, None, *q)
    with pytest.raises(ValueError, match="U's diagonal must be finite and > 0"):
        _C.gptq_quantize(w, -u, s, 10, None, *q)
    with pytest.raises(ValueError, match="scales must be finite and non-zero"):
        _C.gptq_quantize(w, u, 0 * s, 10, None, *q)
    with pytest.raises(ValueError, match="qmin <= qmax"):
        _C.gptq_quantize(w, u, s, 10, None, 8, 7, 128)
    with pytest.raises(ValueError, match="float32"):
        _C.gptq_quantize(w.double(), u, s, 10, None, *q)


def test_divergence_and_kernel_override_raise(monkeypatch):
    w = torch.randn(20, 50)
    u = torch.triu(torch.full((50, 50), 1e30))  # no damped inverse covariance looks like this
    u.diagonal().fill_(1.0)
    with pytest.raises(ValueError, match="row 0 became non-finite at column"):
        fb.gptq(w, u, 0.01)
    monkeypatch.setenv("EOQ_GPTQ_KERNEL", "sse9")
    with pytest.raises(ValueError, match="EOQ_GPTQ_KERNEL must be baseline, avx2 or avx512"):
        fb.gptq(w, torch.eye(50), 0.01)


def test_empty():
    codes, xhat = fb.gptq(torch.zeros(0, 5), torch.eye(5), torch.ones(0, 1), group=5)
    assert codes.shape == (0, 5) and xhat.shape == (0, 5)
    codes, xhat = fb.gptq(torch.zeros(3, 0), torch.zeros(0, 0), torch.ones(3, 1))
    assert codes.shape == (3, 0)
