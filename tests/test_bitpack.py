"""Bit packing against numpy's packbits (little bit order), every width 1..8."""

import numpy as np
import pytest
import torch

import eoq
from eoq import ops


def reference_pack(codes: np.ndarray, k: int) -> np.ndarray:
    """Expand each code to k bits, LSB first, and pack the bit string LSB first."""
    bits = ((codes[:, None] >> np.arange(k)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bits, bitorder="little")


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 1000, 100_003])
def test_matches_reference_and_round_trips(k, n):
    codes = np.random.default_rng(k * 1000 + n).integers(0, 1 << k, n).astype(np.uint8)
    packed = ops.pack_bits(torch.from_numpy(codes), k)
    assert packed.numel() == (n * k + 7) // 8
    assert np.array_equal(packed.numpy(), reference_pack(codes, k))
    assert np.array_equal(ops.unpack_bits(packed, k, n).numpy(), codes)


def test_eight_five_bit_codes_take_five_bytes():
    assert ops.pack_bits(torch.full((8,), 31, dtype=torch.uint8), 5).numel() == 5


def test_code_too_wide_is_rejected():
    with pytest.raises(ValueError, match="index 3 does not fit in 3 bits"):
        ops.pack_bits(torch.tensor([0, 1, 7, 8], dtype=torch.uint8), 3)


@pytest.mark.parametrize("k", [0, 9])
def test_bad_width(k):
    with pytest.raises(ValueError, match="1..8"):
        ops.pack_bits(torch.zeros(4, dtype=torch.uint8), k)


def test_wrong_length_and_dirty_padding_are_corrupt():
    packed = ops.pack_bits(torch.full((10,), 5, dtype=torch.uint8), 3)  # 30 bits -> 4 bytes
    with pytest.raises(eoq.CorruptStreamError, match="need 4"):
        ops.unpack_bits(packed[:3].clone(), 3, 10)
    dirty = packed.clone()
    dirty[-1] |= 0x80
    with pytest.raises(eoq.CorruptStreamError, match="padding"):
        ops.unpack_bits(dirty, 3, 10)


def test_thread_count_does_not_change_bytes(threads):
    codes = torch.from_numpy(np.random.default_rng(0).integers(0, 32, 3_000_001).astype(np.uint8))
    out = []
    for t in threads:
        torch.set_num_threads(t)
        out.append(ops.pack_bits(codes, 5))
        assert torch.equal(ops.unpack_bits(out[-1], 5, codes.numel()), codes)
    assert torch.equal(out[0], out[1])


def test_absurd_counts_fail_on_the_length_check_not_an_allocation():
    # found by the fuzzer: n * bits used to wrap, so an empty buffer passed the length check of
    # n = 2^62 and 4 EiB were asked for; and n >= 2^63 reached pybind11 as a TypeError
    with pytest.raises(eoq.CorruptStreamError, match="bytes"):
        ops.unpack_bits(torch.empty(0, dtype=torch.uint8), 8, (1 << 62) - 1)
    with pytest.raises(eoq.CorruptStreamError, match="bytes"):
        ops.unpack_bits(torch.empty(0, dtype=torch.uint8), 8, 1 << 61)
    for n in (1 << 62, 1 << 63, 1 << 64):
        with pytest.raises(ValueError, match="n must be in"):
            ops.unpack_bits(torch.zeros(4, dtype=torch.uint8), 7, n)
