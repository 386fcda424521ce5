"""Block absmax against a plain numpy reference, bit for bit (codes and fp16 scales)."""

import numpy as np
import pytest
import torch

from eoq import ops

f32 = np.float32


def ref_block(x, bits, w=None):
    """Scalar reference of one block (cpp/absmax.h), in the same float32/float64 steps."""
    nmax = 1 << (bits - 1)

    def quantize_with(d):
        dq = f32(np.float16(f32(d)))
        idq = f32(1) / dq if dq != 0 else f32(0)
        q = np.clip(np.rint(x * idq), -nmax, nmax - 1).astype(f32)
        err = 0.0
        for i in range(len(x)):
            r = float(x[i]) - float(f32(q[i] * dq))
            err += (1.0 if w is None else float(w[i])) * r * r
        return err, dq, (q + nmax).astype(np.uint8)

    m = f32(0)
    for v in x:
        if abs(v) > abs(m):
            m = v
    if m == 0:
        return quantize_with(0.0)[1:]
    best = quantize_with(f32(m / f32(-nmax)))
    if w is None:
        return best[1:]
    for t in range(-9, 10):
        iscale = f32(-(f32(nmax) + f32(0.1) * f32(t)) / m)
        q = np.clip(np.rint(iscale * x), -nmax, nmax - 1).astype(f32)
        sumlx = suml2 = 0.0
        for i in range(len(x)):
            sumlx += float(w[i]) * float(x[i]) * float(q[i])
            suml2 += float(w[i]) * float(q[i]) * float(q[i])
        if suml2 <= 0:
            continue
        cand = quantize_with(f32(sumlx / suml2))
        if cand[0] < best[0]:
            best = cand
    return best[1:]


def ref_quantize(w, bits, block, importance=None):
    rows, cols = w.shape
    nb = -(-cols // block)
    codes = np.zeros((rows, cols), np.uint8)
    scales = np.zeros((rows, nb), np.float16)
    for r in range(rows):
        for k in range(nb):
            sl = slice(k * block, min(cols, (k + 1) * block))
            imp = None if importance is None else importance[sl]
            d, c = ref_block(w[r, sl], bits, imp)
            scales[r, k], codes[r, sl] = np.float16(d), c
    return codes, scales


def weights(rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(5, (rows, cols)).astype(f32) * f32(0.02)
    w[0, :5] = 0  # a partly zero row
    if rows > 1:
        w[1] = 0  # an all-zero row: scale 0, codes at the midpoint
    return w


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("block,cols", [(16, 48), (32, 100), (64, 64), (128, 200), (256, 300)])
def test_plain_matches_reference(bits, block, cols):
    w = weights(5, cols, seed=bits)
    codes, scales = ops.absmax_quantize(torch.from_numpy(w), bits, block)
    rc, rs = ref_quantize(w, bits, block)
    assert np.array_equal(codes.numpy(), rc)
    assert np.array_equal(scales.numpy().view(np.uint16), rs.view(np.uint16))
    deq = ops.absmax_dequantize(codes, scales, bits, block).numpy()
    nb = np.repeat(rs.astype(f32), block, axis=1)[:, :cols]
    assert np.array_equal(deq, (rc.astype(f32) - f32(1 << (bits - 1))) * nb)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_importance_search_matches_reference_and_lowers_weighted_error(bits):
    w = weights(6, 96, seed=10 + bits)
    imp = np.random.default_rng(bits).gamma(0.5, 1.0, 96).astype(f32)
    codes, scales = ops.absmax_quantize(torch.from_numpy(w), bits, 32, importance=torch.from_numpy(imp))
    rc, rs = ref_quantize(w, bits, 32, imp)
    assert np.array_equal(codes.numpy(), rc)
    assert np.array_equal(scales.numpy().view(np.uint16), rs.view(np.uint16))

    def werr(c, s):
        return float(((ops.absmax_dequantize(c, s, bits, 32).numpy() - w) ** 2 * imp).sum())

    plain = ops.absmax_quantize(torch.from_numpy(w), bits, 32)
    assert werr(codes, scales) < werr(*plain)


def test_extreme_value_uses_the_bottom_level_and_codes_are_in_range():
    w = torch.tensor([[0.5, -1.0, 0.25, 1.0] * 8], dtype=torch.float32)
    codes, scales = ops.absmax_quantize(w, 4, 32)
    assert float(scales[0, 0]) == pytest.approx(1 / 8)
    assert int(codes[0, 1]) == 0 and int(codes[0, 3]) == 15  # +1.0 clips to +7/8
    assert int(codes.max()) < 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_accepted_and_error_shrinks_with_bits(dtype):
    w = torch.from_numpy(weights(64, 256, seed=3)).to(dtype)
    errs = []
    for bits in range(2, 9):
        c, s = ops.absmax_quantize(w, bits, 32)
        assert c.dtype == torch.uint8 and s.dtype == torch.float16
        errs.append(float(((ops.absmax_dequantize(c, s, bits, 32) - w.float()) ** 2).mean()))
    assert all(a > b for a, b in zip(errs, errs[1:]))
    # ~4x less error per extra bit at high rate
    assert errs[-2] / errs[-1] > 3


def test_bad_inputs_name_the_problem():
    w = torch.zeros(4, 64)
    with pytest.raises(ValueError, match="bits"):
        ops.absmax_quantize(w, 1, 32)
    with pytest.raises(ValueError, match="block"):
        ops.absmax_quantize(w, 4, 8)
    with pytest.raises(ValueError, match="2-D"):
        ops.absmax_quantize(torch.zeros(64), 4, 32)
    bad = w.clone()
    bad[2, 17] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite weight at \[2, 17\]"):
        ops.absmax_quantize(bad, 4, 32)
    with pytest.raises(ValueError, match="overflows fp16"):
        ops.absmax_quantize(torch.full((1, 32), 1e9), 4, 32)
    with pytest.raises(ValueError, match="importance has 3 values"):
        ops.absmax_quantize(w, 4, 32, importance=torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        ops.absmax_quantize(w, 4, 32, importance=-torch.ones(64))
    with pytest.raises(ValueError, match="codes must be < 2"):
        ops.absmax_dequantize(torch.full((4, 64), 16, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.float16), 4, 32)


def test_thread_count_does_not_change_output(threads):
    w = torch.from_numpy(weights(512, 576, seed=4))
    imp = torch.rand(576)
    out = []
    for t in threads:
        torch.set_num_threads(t)
        out.append(ops.absmax_quantize(w, 4, 32, importance=imp))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
