"""ecsq on a tensor too large to hold rotated (ecsq.CHUNK_VALUES): rotated chunk by chunk on
every pass, in bf16 as it comes from the file. The result must be the whole-tensor path's
bit for bit (codes, steps, reconstruction, metadata), whatever the chunk size; the chunk
size is made small here so that small tensors stream."""

import pytest
import torch

from eoq.convert import allocate
from eoq import quantize_tensor
from eoq.methods import ecsq, ecsq_search
from eoq.methods.quantized import check_weight


def weight(rows=600, cols=384, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * torch.linspace(0.5, 2, cols)).to(dtype)


def both(monkeypatch, fn):
    """fn() with the whole-tensor path, then streamed in chunks of 4096 values (10 rows of 384)."""
    monkeypatch.setattr(ecsq, "CHUNK_VALUES", 1 << 24)
    whole = fn()
    monkeypatch.setattr(ecsq, "CHUNK_VALUES", 4096)
    return whole, fn()


def same(a, b):
    assert torch.equal(a.codes, b.codes)
    assert a.meta == b.meta
    assert a.side.keys() == b.side.keys()
    for k in a.side:
        assert torch.equal(a.side[k], b.side[k]), k


@pytest.mark.parametrize("case", ["plain", "rows", "awq", "high-rate", "step", "float32", "bracketed"])
def test_streamed_is_the_whole_path_bit_for_bit(monkeypatch, case):
    w = weight(dtype=torch.float32 if case == "float32" else torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    imp = torch.rand(w.shape[1], generator=g) + 0.1
    kw = {"importance": imp}
    bits = 3.0
    if case in ("rows", "awq", "bracketed"):
        kw.update(row_importance=torch.rand(w.shape[0], generator=g) ** 4 * 100, row_tokens=1000)
    if case == "awq":
        kw["awq"] = True
    if case == "high-rate":  # codes past 8 bits: low bits split off chunk by chunk
        bits = 10.0
    if case == "step":
        kw["step"] = 0.05
    if case == "bracketed":  # the step search's sample-first path
        monkeypatch.setattr(ecsq_search, "SEARCH_SAMPLE", 8192)
    whole, streamed = both(monkeypatch, lambda: quantize_tensor(w, "ecsq", bits, seed=3, name="t", **kw))
    same(whole, streamed)
    if case == "high-rate":
        assert streamed.meta.get("low_bits", 0) > 0
    if case in ("plain", "rows"):
        assert "recon" in streamed.meta  # 3 bits: the fitted reconstruction is exercised too
    if case == "awq":
        assert streamed.meta["awq_alpha"] is not None


def test_streamed_problem_holds_no_rotated_copy(monkeypatch):
    monkeypatch.setattr(ecsq, "CHUNK_VALUES", 4096)
    w = weight()
    p = ecsq.Problem(w, stream=True)
    assert p.streamed and p.rotated is None and p.x is None and len(p.spans) == 60  # 10 rows of 384 a chunk
    assert p.w.dtype == torch.bfloat16  # kept as given; each chunk is converted on its own
    assert not ecsq.Problem(w).streamed  # only when asked: feedback and lam need the whole
    assert not ecsq.Problem(w, stream=True, group_rows=8).streamed


def test_curves_are_the_same_streamed(monkeypatch):
    w = weight(seed=4)
    g = torch.Generator().manual_seed(5)
    imp = torch.rand(w.shape[1], generator=g) + 0.1
    rows_w = torch.rand(w.shape[0], generator=g) ** 4 * 100
    whole, streamed = both(monkeypatch, lambda: allocate.rd_curve(w, imp, None, 1, 1.5, 8.0, rows_w, 1000))
    assert whole[0] == streamed[0]
    assert whole[1] == streamed[1]


def test_kept_dtype_is_checked_chunk_by_chunk(monkeypatch):
    from eoq.methods import quantized as quantized

    monkeypatch.setattr(quantized, "CHECK_ROWS_VALUES", 1000)
    w = weight()
    assert check_weight(w, "t", keep_dtype=True).dtype == torch.bfloat16
    assert check_weight(w, "t").dtype == torch.float32
    w[517, 33] = float("inf")
    with pytest.raises(ValueError, match=r"t: non-finite value inf at \[517, 33\]"):
        check_weight(w, "t", keep_dtype=True)


def test_which_tensors_stream():
    n = 2 * ecsq.CHUNK_VALUES + 1
    assert ecsq.streams(n)
    assert not ecsq.streams(2 * ecsq.CHUNK_VALUES)
    assert not ecsq.streams(n, hessian=torch.eye(2))
    assert not ecsq.streams(n, lam=1.0)
    assert not ecsq.streams(n, group_rows=64)


def test_a_conversion_is_byte_identical_streamed(tmp_path, monkeypatch):
    # Every tensor of more than two 256-value chunks streamed: the same folder, byte for byte.
    import eoq
    from tinymodels import save

    folder = save("qwen2", tmp_path / "m")
    cfg = eoq.QuantConfig(bits=3.5, calibration=None, awq=False)
    out = {}
    for chunk in (1 << 24, 256):
        monkeypatch.setattr(ecsq, "CHUNK_VALUES", chunk)
        eoq.quantize_model(folder, tmp_path / str(chunk), cfg, progress=False, verbose=False)
        out[chunk] = {p.name: p.read_bytes() for p in sorted((tmp_path / str(chunk)).iterdir()) if p.is_file()}
    assert out[256] == out[1 << 24]


def test_sums_that_choose_are_the_same_at_any_thread_count():
    # torch's sum() splits a large reduction by thread: its last bits moved with the thread
    # count (6 of these 20 weighted errors did), and with them AWQ's alpha choice and the
    # vocabulary's row multipliers (stored steps). exact_sum does not move.
    from eoq.methods.quantized import exact_sum

    old = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = []
            for i in range(20):
                g = torch.Generator().manual_seed(i)
                w = torch.randn(256, 4096, generator=g)
                w_hat = w + torch.randn(256, 4096, generator=g) * 0.01
                got.append(weighted_from(w, w_hat, torch.rand(4096, generator=g)).hex())
            rows = torch.rand(49152, generator=torch.Generator().manual_seed(99)) ** 6 * 1e4
            got.append(ecsq.row_multipliers(rows, 1e5))
            got.append(exact_sum(torch.randn(1, 300_000, generator=torch.Generator().manual_seed(7))).hex())
            out[threads] = got
    finally:
        torch.set_num_threads(old)
    for a, b in zip(out[1], out[2]):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def weighted_from(w, w_hat, imp):
    from eoq.methods.quantized import weighted_error

    return weighted_error(w, w_hat, imp)


def test_exact_sum_is_the_sum_and_chunks_give_the_whole_blocks():
    from eoq.methods.quantized import block_sums, exact_sum

    t = torch.randn(37, 1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert exact_sum(t) == pytest.approx(float(t.sum()), rel=1e-12)
    import math
    assert math.fsum(block_sums(t[:10]) + block_sums(t[10:])) == exact_sum(t)
