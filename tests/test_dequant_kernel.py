"""Fused ecsq dequantization (cpp/dequant.h, eoq.format.fused): bit for bit the reference path.

The reference is what repo.dequantize_entry computes today: QuantizedTensor.dequantize (the
method's Python dequantizer, the AWQ division, the cast), transposed back for transposed
entries. Every comparison is on the raw bits (so -0.0 vs 0.0 and NaN payloads count).
Also here: the torch-version check at import (eoq/__init__.py, _build_info.py).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import eoq
from eoq.format import fused
from eoq import ops
from eoq.format import repo

BITS_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS_VIEW[a.dtype]), b.view(BITS_VIEW[b.dtype]))


def make(rows, cols, seed=0, transposed=False, codec="rans", dtype=torch.bfloat16, scale=0.02, **kw):
    """(QuantizedTensor, entry, parts) of a random weight, as the converter stores it."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    if rows * cols < 8192 and "bits" not in kw:  # the rate search cannot pay a tiny tensor's side data
        kw.setdefault("step", 0.01)
    if kw.get("awq"):
        kw.setdefault("awq_none", False)  # the AWQ path is what is tested, even where no scales would win
    qt = eoq.quantize_tensor(w, "ecsq", seed=seed + 11, **kw)
    shape = [cols, rows] if transposed else [rows, cols]
    entry, parts = repo.quantized_entry(qt, codec, "quantized", transposed, shape, None)
    return qt, entry, parts


def reference(qt, entry, dtype=None):
    w = qt.dequantize(dtype)
    return w.t().contiguous() if entry["transposed"] else w


def check(qt, entry, parts, dtypes=DTYPES):
    for dt in dtypes:
        got = fused.dequantize_fused("w", entry, parts, dt)
        assert got is not None
        assert same_bits(got, reference(qt, entry, dt)), dt
    got = fused.dequantize_fused("w", entry, parts, None)  # the entry's dtype
    assert same_bits(got, reference(qt, entry))


def check_thread_counts(qt, entry, parts):
    """The same bits with 1, 2 and 3 threads, and the reference's."""
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(fused.dequantize_fused("w", entry, parts, torch.bfloat16))
    finally:
        torch.set_num_threads(before)
    assert all(same_bits(o, outs[0]) for o in outs)
    assert same_bits(outs[0], reference(qt, entry, torch.bfloat16))


# ---- bit for bit ---------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols", [(1, 16), (7, 100), (33, 72), (65, 48), (300, 2048), (129, 1000)])
def test_matches_reference_shapes(rows, cols):
    check(*make(rows, cols))


@pytest.mark.parametrize("block", [16, 32, 64, 128, 256, 512, 1024, 2048])
def test_matches_reference_blocks(block):
    # cols 2048 + 48: padded to a multiple of 16, so the block shrinks for the ragged tail
    check(*make(37, 4096 + 40, block_size=block, step=0.01))
    check(*make(9, block, block_size=block, step=0.01))


def test_matches_reference_groups_row_importance_awq():
    check(*make(101, 200, group_rows=7))
    check(*make(50, 64, group_rows=100))  # one group larger than the tensor
    imp = torch.rand(97, generator=torch.Generator().manual_seed(1)) ** 4 + 1e-3
    check(*make(97, 72, row_importance=imp))  # one step per row
    chan = torch.rand(136, generator=torch.Generator().manual_seed(2)) + 0.1
    qt, entry, parts = make(40, 136, importance=chan, awq=True)
    assert "awq_scales" in parts
    check(qt, entry, parts)


@pytest.mark.parametrize("src", [torch.float32, torch.float16])
def test_matches_reference_source_dtypes_and_transposed(src):
    check(*make(48, 100, dtype=src))
    check(*make(30, 80, transposed=True, dtype=src))
    chan = torch.rand(80, generator=torch.Generator().manual_seed(3)) + 0.1
    check(*make(30, 80, transposed=True, importance=chan, awq=True))


def test_matches_reference_across_chunks():
    # 700 x 1008 codes: 3 rANS chunks of 2^18, rows straddling both boundaries
    qt, entry, parts = make(700, 1000, step=0.004)
    assert ops.rans_info(parts["codes"])["n_chunks"] == 3
    check(qt, entry, parts)
    # rows longer than a chunk: a row spans up to three chunks, batches hold no row start
    qt, entry, parts = make(3, (1 << 18) + 40, block_size=16, step=0.004)
    assert ops.rans_info(parts["codes"])["n_chunks"] == 4
    check(qt, entry, parts, dtypes=(torch.bfloat16,))


@pytest.mark.parametrize("bits", [8, 9, 11])
def test_matches_reference_wide_codes(bits):
    # codes past 8 bits: the levels are hi << low_bits | low, the low bits stored packed
    qt, entry, parts = make(70, 1000, bits=bits, block_size=128)
    assert entry["meta"]["low_bits"] >= 1 and "low" in parts
    check(qt, entry, parts)
    qt, entry, parts = make(40, 200, bits=bits, transposed=True, block_size=16, group_rows=3)
    check(qt, entry, parts)
    chan = torch.rand(136, generator=torch.Generator().manual_seed(4)) + 0.1
    qt, entry, parts = make(300, 136, bits=bits, importance=chan, awq=True)
    assert entry["meta"].get("low_bits", 0) >= 1
    check(qt, entry, parts)


def test_wide_codes_across_chunks_and_threads():
    qt, entry, parts = make(700, 1000, bits=9)
    assert ops.rans_info(parts["codes"])["n_chunks"] == 3 and entry["meta"]["low_bits"] >= 1
    check_thread_counts(qt, entry, parts)
    qt, entry, parts = make(45, 100, codec="packed", step=1e-4)
    assert entry["codec"] == "packed" and entry["meta"].get("low_bits", 0) >= 1
    check(qt, entry, parts)


@pytest.mark.parametrize("bits", [1.5, 2, 3])
def test_matches_reference_fitted_reconstruction(bits):
    qt, entry, parts = make(300, 1000, bits=bits, block_size=128)
    assert entry["meta"].get("recon") and "recon" in parts
    check(qt, entry, parts)
    qt, entry, parts = make(40, 200, bits=bits, transposed=True, block_size=16, group_rows=3)
    check(qt, entry, parts)
    chan = torch.rand(136, generator=torch.Generator().manual_seed(4)) + 0.1
    qt, entry, parts = make(300, 136, bits=bits, importance=chan, awq=True)
    check(qt, entry, parts)
    with pytest.raises(ValueError, match="recon"):
        fused.dequantize_fused("w", entry, {k: v for k, v in parts.items() if k != "recon"}, torch.bfloat16)


def test_wide_codes_bad_low_part_raises():
    qt, entry, parts = make(40, 256, bits=8, block_size=64)
    with pytest.raises(ValueError, match="low"):
        fused.dequantize_fused("w", entry, dict(parts, low=parts["low"][:-1]), torch.bfloat16)
    with pytest.raises(ValueError, match="low"):
        fused.dequantize_fused("w", entry, {k: v for k, v in parts.items() if k != "low"}, torch.bfloat16)
    with pytest.raises(ValueError, match="low_bits"):
        fused.dequantize_fused("w", dict(entry, meta=dict(entry["meta"], low_bits=9)), parts, torch.bfloat16)


def test_packed_codec():
    qt, entry, parts = make(45, 100, codec="packed")
    assert entry["codec"] == "packed"
    check(qt, entry, parts)


def test_thread_count_does_not_change_the_bytes():
    qt, entry, parts = make(1200, 1000, step=0.004)  # 5 chunks
    check_thread_counts(qt, entry, parts)


def test_extreme_values_round_like_torch():
    # steps spanning the fp16 range (subnormal and overflowing outputs) and a large offset
    qt, entry, parts = make(64, 64, step=1e-3, group_rows=1)
    for steps in (torch.logspace(-30, 8, 64), torch.logspace(-8, 3, 64)):
        p = dict(parts, steps=steps.float())
        qt.side["steps"] = p["steps"]
        for dt in DTYPES:
            assert same_bits(fused.dequantize_fused("w", entry, p, dt), reference(qt, entry, dt))


def test_write_into_out():
    qt, entry, parts = make(20, 72)
    out = torch.full((20, 72), 7.0, dtype=torch.bfloat16)
    assert fused.dequantize_fused("w", entry, parts, torch.bfloat16, out=out) is out
    assert same_bits(out, reference(qt, entry, torch.bfloat16))
    qt, entry, parts = make(20, 72, transposed=True)
    out = torch.empty(72, 20, dtype=torch.float16)
    assert fused.dequantize_fused("w", entry, parts, torch.float16, out=out) is out
    assert same_bits(out, reference(qt, entry, torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        fused.dequantize_fused("w", entry, parts, torch.float16, out=torch.empty(20, 72, dtype=torch.float16))


def test_scalar_kernel_matches_too():
    # the kernel is chosen once per process: run the scalar one in a child
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        import test_dequant_kernel as t
        from eoq import ops
        assert ops.dequant_kernel() == "scalar", ops.dequant_kernel()
        t.check(*t.make(33, 100))
        t.check(*t.make(300, 1000, step=0.004))
        t.check(*t.make(17, 1024, block_size=1024, step=0.01))
        t.check(*t.make(17, 256, block_size=16, step=0.01))
        chan = torch.rand(80) + 0.1
        t.check(*t.make(30, 80, transposed=True, importance=chan, awq=True))
        t.check(*t.make(70, 1000, bits=9, block_size=128))
        t.check(*t.make(40, 200, bits=8, block_size=16, transposed=True))
        t.check(*t.make(300, 1000, bits=2, block_size=64))
        print("ok")
    """)
    env = dict(os.environ, EOQ_DEQUANT_KERNEL="scalar")
    r = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_roundings_match_torch():
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = torch.from_numpy(bits.view(np.float32).copy())
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 65504.0, 65520.0, 65519.99, 6.1e-5, 5.96e-8,
                            2.98e-8, 2.99e-8, 1e-45, 3.3895e38, -3.3895e38, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])
    x = torch.cat([x[torch.isfinite(x)], special, torch.randn(10_000) * 1e-6, torch.randn(10_000) * 6e4])
    assert torch.equal(ops._C.round_bits(x, True), x.to(torch.bfloat16).view(torch.int16).int() & 0xFFFF)
    assert torch.equal(ops._C.round_bits(x, False), x.to(torch.float16).view(torch.int16).int() & 0xFFFF)


# ---- what the kernel does not handle: None, the caller takes the reference path ----------------

def test_returns_none_for_what_it_does_not_handle():
    qt, entry, parts = make(16, 64)
    assert fused.dequantize_fused("w", dict(entry, method="absmax"), parts, None) is None
    assert fused.dequantize_fused("w", dict(entry, codec="zstd"), parts, None) is None
    assert fused.dequantize_fused("w", entry, parts, torch.float64) is None
    assert fused.dequantize_fused("w", entry, dict(parts, steps=parts["steps"].double()), None) is None
    assert fused.dequantize_fused("w", entry, dict(parts, extra=torch.zeros(1)), None) is None
    # steps so large that float32 could overflow inside the transform
    assert fused.dequantize_fused("w", entry, dict(parts, steps=torch.tensor([1e36])), None) is None
    assert fused.handles(entry) and not fused.handles(dict(entry, method="polar"))


# ---- bad input: a clear error, before anything is allocated or decoded ---------------------------

def test_bad_side_parts_raise():
    qt, entry, parts = make(30, 64, group_rows=4)
    n = parts["steps"].numel()
    assert n == 8
    with pytest.raises(ValueError, match=r"w\.steps: expected 8 values"):
        fused.dequantize_fused("w", entry, dict(parts, steps=torch.ones(7)), None)
    with pytest.raises(ValueError, match=r"w\.steps: expected 8 values"):
        fused.dequantize_fused("w", entry, dict(parts, steps=torch.ones(30)), None)
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        s = parts["steps"].clone()
        s[3] = bad
        with pytest.raises(ValueError, match=r"w\.steps: value .* at index 3 is not finite and positive"):
            fused.dequantize_fused("w", entry, dict(parts, steps=s), None)
    for bad in (float("nan"), 0.0):
        a = torch.ones(64, dtype=torch.float16)
        a[5] = bad
        with pytest.raises(ValueError, match=r"w\.awq_scales: value .* at index 5"):
            fused.dequantize_fused("w", entry, dict(parts, awq_scales=a), None)
    with pytest.raises(ValueError, match=r"w\.awq_scales: expected 64 values"):
        fused.dequantize_fused("w", entry, dict(parts, awq_scales=torch.ones(63, dtype=torch.float16)), None)
    with pytest.raises(ValueError, match="needs the parts codes and steps"):
        fused.dequantize_fused("w", entry, {"codes": parts["codes"]}, None)


@pytest.mark.parametrize("field,value,match", [
    ("qshape", [30, 0], "qshape"),
    ("qshape", "30x64", "qshape"),
    ("code_shape", [30, 80], "code_shape"),
    ("seed", -1, "seed"),
    ("transposed", "no", "transposed"),
    ("meta.rotation_block", 48, "power of two"),
    ("meta.rotation_block", 8, "rotation_block"),
    ("meta.rotation_block", 1 << 17, "rotation_block"),
    ("meta.padded_cols", 63, "padded_cols"),
    ("meta.padded_cols", 72, "not a multiple"),
    ("meta.offset", 2 ** 31 - 255, "offset"),
    ("meta.offset", 1.5, "offset"),
    ("meta.offset", True, "offset"),
    ("meta.group_rows", 0, "group_rows"),
])
def test_bad_entry_fields_raise(field, value, match):
    qt, entry, parts = make(30, 64)
    entry = dict(entry, meta=dict(entry["meta"]))
    if field.startswith("meta."):
        entry["meta"][field[5:]] = value
    else:
        entry[field] = value
    with pytest.raises(ValueError, match=match) as e:
        fused.dequantize_fused("w", entry, parts, None)
    assert str(e.value).startswith("w")


def test_stream_count_is_checked_before_decoding():
    qt, entry, parts = make(30, 64)
    other = make(31, 64)[2]["codes"]  # a valid stream of 31 x 64 codes
    with pytest.raises(eoq.CorruptStreamError, match=r"w\.codes: .*declares 1984 codes, expected 1920"):
        fused.dequantize_fused("w", entry, dict(parts, codes=other), None)
    # a few hundred KB declaring 2^31 codes is refused at once, nothing allocated
    import test_rans
    big = test_rans.free_stream(1 << 31)
    with pytest.raises(eoq.CorruptStreamError, match="declares 2147483648 codes"):
        fused.dequantize_fused("w", entry, dict(parts, codes=big), None)


def test_corrupt_streams_raise():
    qt, entry, parts = make(700, 1000, step=0.004)  # 3 chunks, rows straddling
    s = parts["codes"]
    info = ops.rans_info(s)
    starts = np.cumsum([info["header_bytes"]] + info["chunk_bytes"])
    for c in range(3):
        bad = s.clone()
        bad[int(starts[c]) + 200] ^= 0x5A  # a word early in chunk c: the prefix of a straddling row
        with pytest.raises(eoq.CorruptStreamError, match=rf"w\.codes: rANS chunk {c} of 3"):
            fused.dequantize_fused("w", entry, dict(parts, codes=bad), None)
    bad = s.clone()
    bad[int(starts[1]) + 5] ^= 0x01  # an initial state of chunk 1
    with pytest.raises(eoq.CorruptStreamError, match="rANS chunk 1 of 3"):
        fused.dequantize_fused("w", entry, dict(parts, codes=bad), None)
    with pytest.raises(eoq.CorruptStreamError, match="truncated"):
        fused.dequantize_fused("w", entry, dict(parts, codes=s[:-1].clone()), None)
    with pytest.raises(eoq.CorruptStreamError, match="header checksum"):
        bad = s.clone()
        bad[info["header_bytes"] - 6] ^= 1  # a chunk's index entry
        fused.dequantize_fused("w", entry, dict(parts, codes=bad), None)
    qt, entry, parts = make(45, 100, codec="packed")
    with pytest.raises(eoq.CorruptStreamError, match=r"w\.codes: packed buffer"):
        fused.dequantize_fused("w", entry, dict(parts, codes=parts["codes"][:-1].clone()), None)


def test_ops_ecsq_dequantize_checks_arguments():
    qt, entry, parts = make(10, 64)
    m = entry["meta"]
    args = dict(rows=10, cols=64, padded_cols=64, block=m["rotation_block"], seed=entry["seed"], offset=m["offset"],
                steps=parts["steps"], recon=parts.get("recon"))
    w = ops.ecsq_dequantize(parts["codes"], **args)
    assert same_bits(w, qt.dequantize(torch.bfloat16))
    codes = ops.rans_decode(parts["codes"])
    assert same_bits(ops.ecsq_dequantize(codes, **args, codec="codes"), w)
    with pytest.raises(ValueError, match="rows \\* padded_cols"):
        ops.ecsq_dequantize(codes[:-1], **args, codec="codes")
    with pytest.raises(ValueError, match="dtype"):
        ops.ecsq_dequantize(parts["codes"], **args, dtype=torch.int8)
    with pytest.raises(ValueError, match="codec"):
        ops.ecsq_dequantize(parts["codes"], **args, codec="zip")
    with pytest.raises(ValueError, match="steps given"):
        ops.ecsq_dequantize(parts["codes"], **dict(args, steps=torch.ones(2)))
    with pytest.raises(ValueError, match="padded_cols"):
        ops.ecsq_dequantize(parts["codes"], **dict(args, padded_cols=48))
    with pytest.raises(ValueError, match="out must be"):
        ops.ecsq_dequantize(parts["codes"], **args, out=torch.empty(10, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="offset"):
        ops.ecsq_dequantize(parts["codes"], **dict(args, offset=2 ** 31))


# ---- the torch-version check at import ---------------------------------------------------------

def test_import_refuses_another_torch():
    from eoq import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__.split("+")[0]
    code = textwrap.dedent("""
        import sys, torch
        torch.__version__ = "9.99.0+cu999"
        try:
            import eoq
        except ImportError as e:
            print(e)
        else:
            print("imported")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    msg = r.stdout
    assert "built against torch " + _build_info.TORCH_VERSION in msg and "torch 9.99.0 is installed" in msg, r.stderr
    assert "pip install --no-build-isolation --force-reinstall --no-deps eoq" in msg
    assert f"torch=={_build_info.TORCH_VERSION}" in msg
    # a local label alone ("+cpu") is no mismatch
    code = code.replace("9.99.0+cu999", _build_info.TORCH_VERSION + "+whatever")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "imported", r.stdout + r.stderr
