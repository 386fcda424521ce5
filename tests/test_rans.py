"""rANS coder: byte-for-byte against the Python reference, round trips, size, determinism."""

import math

import numpy as np
import pytest
import torch

import eoq
from eoq import ops

import rans_reference as ref


def u8(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.uint8))


def entropy_bits(x: np.ndarray) -> float:
    """n * H(empirical) in bits."""
    counts = np.bincount(x, minlength=256).astype(np.float64)
    p = counts[counts > 0] / x.size
    return float(-(counts[counts > 0] * np.log2(p)).sum())


def skewed(n: int, seed: int = 0) -> np.ndarray:
    """Rounded Gaussian codes clipped to 0..31, the shape of real 5-bit weight codes."""
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.normal(16, 4, n)), 0, 31).astype(np.uint8)


@pytest.mark.parametrize("n", [0, 1, 31, 33, 1000, 65537])
@pytest.mark.parametrize("scale_bits", [10, 12, 15])
def test_matches_reference_bytes(n, scale_bits):
    x = skewed(n, seed=n)
    ours = ops.rans_encode(u8(x), scale_bits=scale_bits, chunk_size=1 << 16).numpy().tobytes()
    assert ours == ref.encode(x.tobytes(), scale_bits, 1 << 16)
    assert ref.decode(ours) == x.tobytes()


def test_reference_decodes_ours_and_ours_decodes_reference_multichunk():
    x = np.random.default_rng(1).integers(0, 256, 140_000).astype(np.uint8)  # 3 chunks of 64Ki
    stream = ref.encode(x.tobytes(), 12, 1 << 16)
    out = ops.rans_decode(torch.frombuffer(bytearray(stream), dtype=torch.uint8))
    assert out.numpy().tobytes() == x.tobytes()


def test_frequency_normalisation_matches_reference_and_never_zero():
    rng = np.random.default_rng(2)
    # One symbol dominates, 200 others occur once: each must keep frequency >= 1.
    x = np.concatenate([np.zeros(5_000_000, np.uint8), np.arange(1, 201, dtype=np.uint8)])
    rng.shuffle(x)
    info = ops.rans_info(ops.rans_encode(u8(x), scale_bits=10))
    counts = np.bincount(x, minlength=info["alphabet"])[: info["alphabet"]]
    assert all(f >= 1 for f, c in zip(info["freq"], counts) if c > 0)
    assert sum(info["freq"]) == 1 << 10
    assert info["freq"] == ref.normalize_freqs(counts.tolist(), 10)
    assert torch.equal(ops.rans_decode(ops.rans_encode(u8(x), scale_bits=10)), u8(x))


@pytest.mark.parametrize(
    "data",
    [
        np.zeros(0, np.uint8),
        np.array([7], np.uint8),
        np.full(300_001, 200, np.uint8),  # single-symbol alphabet: no bits at all
        np.arange(1_000_003, dtype=np.int64).astype(np.uint8),  # uniform over 256 symbols
        np.random.default_rng(3).integers(0, 256, 777_777).astype(np.uint8),
        skewed(1_048_577, seed=4),  # one past a whole number of chunks
    ],
    ids=["empty", "one", "single-symbol", "uniform-256", "random-256", "skewed-ragged"],
)
@pytest.mark.parametrize("chunk_size", [1 << 16, 1 << 18, 1 << 20])
def test_round_trip(data, chunk_size):
    s = ops.rans_encode(u8(data), chunk_size=chunk_size)
    assert torch.equal(ops.rans_decode(s), u8(data))
    assert ops.rans_info(s)["n_symbols"] == data.size


def test_single_symbol_alphabet_costs_only_the_header():
    s = ops.rans_encode(torch.full((1_000_000,), 9, dtype=torch.uint8))
    info = ops.rans_info(s)
    # Every chunk holds only its 32 final states: the symbols cost zero bits.
    assert info["chunk_bytes"] == [4 * 32] * info["n_chunks"]


def test_hundred_million_symbols():
    x = torch.from_numpy(skewed(100_000_000, seed=5))
    s = ops.rans_encode(x)
    assert torch.equal(ops.rans_decode(s), x)


def test_size_within_half_percent_of_entropy_on_real_5bit_codes(smollm2_path):
    """1M real 5-bit codes (SmolLM2 Linear weights, Hadamard-rotated absmax Q5)."""
    from eoq.format.gguf_weights import linear_weights

    codes = []
    for _, w in linear_weights(smollm2_path):
        rotated = ops.hadamard(w, block=64, seed=0)
        codes.append(ops.absmax_quantize(rotated, bits=5, block=32)[0].reshape(-1))
        if sum(c.numel() for c in codes) >= 1_000_000:
            break
    x = torch.cat(codes)[:1_000_000].contiguous()
    bound = entropy_bits(x.numpy()) / 8
    stored = ops.rans_encode(x).numel()
    assert bound > 0.5e6  # really 5-bit-ish codes (> 4 bits/symbol)
    assert stored <= 1.005 * bound, f"{stored} bytes vs n*H = {bound:.0f}"


def test_size_close_to_entropy_on_skewed_codes():
    x = skewed(1_000_000, seed=6)
    stored = ops.rans_encode(u8(x)).numel()
    assert stored <= 1.005 * entropy_bits(x) / 8


def test_deterministic_across_thread_counts(threads):
    x = u8(skewed(3_000_000, seed=7))
    streams = []
    for t in threads:
        torch.set_num_threads(t)
        streams.append(ops.rans_encode(x))
        assert torch.equal(ops.rans_decode(streams[-1]), x)
    assert all(torch.equal(streams[0], s) for s in streams[1:])


@pytest.mark.parametrize("kwargs", [{"scale_bits": 9}, {"scale_bits": 16}, {"chunk_size": 1000},
                                    {"chunk_size": (1 << 16) + 1}, {"chunk_size": 1 << 21}])
def test_bad_parameters_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        ops.rans_encode(torch.zeros(10, dtype=torch.uint8), **kwargs)


def test_bad_input_types():
    with pytest.raises(ValueError, match="uint8"):
        ops.rans_encode(torch.zeros(10, dtype=torch.int32))
    with pytest.raises(ValueError, match="1-D"):
        ops.rans_encode(torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(TypeError):
        ops.rans_decode(b"EOQR")


def test_corrupt_stream_error_is_a_value_error_and_exported():
    assert issubclass(eoq.CorruptStreamError, ValueError)
    with pytest.raises(eoq.CorruptStreamError, match="magic"):
        ops.rans_decode(torch.zeros(64, dtype=torch.uint8))
    with pytest.raises(eoq.CorruptStreamError, match="truncated"):
        ops.rans_decode(torch.tensor(list(b"EOQR"), dtype=torch.uint8))


def test_crc32c_known_value_and_paths_agree():
    data = torch.tensor(list(b"123456789"), dtype=torch.uint8)
    assert ops.crc32c(data) == 0xE3069283
    rnd = torch.from_numpy(np.random.default_rng(8).integers(0, 256, 1001).astype(np.uint8))
    assert ops.crc32c(rnd) == eoq._C.crc32c(rnd, True) == ref.crc32c(rnd.numpy().tobytes())


def crc32c_extend_reference(data: bytes, value: int) -> int:
    """Bitwise CRC32C continuing from a previous CRC32C (register = ~value)."""
    crc = value ^ 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# lengths that exercise the byte tail, the 8-byte loop and both three-chain block sizes
@pytest.mark.parametrize("na,nb", [(0, 0), (0, 9), (9, 0), (1, 7), (13, 3 * 256 + 5), (3 * 4096 + 3, 40_000)])
def test_crc32c_extend(na, nb):
    rng = np.random.default_rng(na + nb)
    a = rng.integers(0, 256, na).astype(np.uint8)
    b = rng.integers(0, 256, nb).astype(np.uint8)
    whole = ops.crc32c(u8(np.concatenate([a, b])))
    first = ops.crc32c(u8(a))
    assert ops.crc32c(u8(b), first) == whole == eoq._C.crc32c(u8(b), True, first)
    assert whole == ref.crc32c(a.tobytes() + b.tobytes())
    if nb < 1000:  # the bitwise reference is slow
        assert ops.crc32c(u8(b), first) == crc32c_extend_reference(b.tobytes(), first)
    assert ops.crc32c(u8(b), 0x12345678) == eoq._C.crc32c(u8(b), True, 0x12345678)
    for bad in (-1, 1 << 32, 1.5, True):
        with pytest.raises(ValueError, match="previous CRC32C"):
            ops.crc32c(u8(b), bad)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                                   torch.bfloat16, torch.float32, torch.float64, torch.bool, torch.complex64])
def test_crc32c_tensor_is_the_crc_of_the_little_endian_bytes(dtype):
    g = torch.Generator().manual_seed(3)
    t = (torch.randn(37, 29, generator=g) * 100).to(dtype)
    raw = t.numpy().tobytes() if dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()
    assert ops.crc32c_tensor(t) == ref.crc32c(raw)
    assert ops.crc32c_tensor(t, 77) == ops.crc32c(u8(np.frombuffer(raw, np.uint8).copy()), 77)
    # non-contiguous: the bytes of its contiguous copy
    tt = t.t()
    assert ops.crc32c_tensor(tt) == ref.crc32c(tt.contiguous().view(torch.uint8).numpy().tobytes())
    assert ops.crc32c_tensor(t[:0]) == 0


def test_crc32c_tensor_chains_over_tensors_and_checks_arguments():
    ts = [torch.arange(1000, dtype=torch.float32), torch.ones(7, dtype=torch.bfloat16), torch.zeros(0, dtype=torch.int64)]
    v = 0
    for t in ts:
        v = ops.crc32c_tensor(t, v)
    assert v == ref.crc32c(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in ts))
    assert ops.crc32c_tensor(torch.tensor(3.0).conj()) == ops.crc32c_tensor(torch.tensor(3.0))
    z = torch.tensor([1 + 2j], dtype=torch.complex64)
    assert ops.crc32c_tensor(z.conj()) == ops.crc32c_tensor(torch.tensor([1 - 2j], dtype=torch.complex64))
    with pytest.raises(TypeError):
        ops.crc32c_tensor(b"abc")
    with pytest.raises(ValueError, match="dense"):
        ops.crc32c_tensor(torch.eye(3).to_sparse())


def free_stream(n: int, chunk: int = 1 << 20, n_chunks=None) -> torch.Tensor:
    """A valid stream of n zero symbols, one symbol of frequency M: every symbol costs 0 bits,
    so each chunk is its 128 bytes of states alone (2^31 symbols in ~280 KB)."""
    import struct
    n_chunks = -(-n // chunk) if n_chunks is None else n_chunks
    crcs = {}
    head = b"EOQR" + bytes([1, 12, 32, 0]) + struct.pack("<QIIH", n, chunk, n_chunks, 1) + struct.pack("<H", 1 << 12)
    for c in range(n_chunks):
        m = min(chunk, n - c * chunk)
        if m not in crcs:
            crcs[m] = ops.crc32c(torch.zeros(m, dtype=torch.uint8))
        head += struct.pack("<II", 128, crcs[m])
    head += struct.pack("<I", ref.crc32c(head))
    payload = struct.pack("<32I", *([1 << 16] * 32))
    return u8(np.frombuffer(head + payload * n_chunks, np.uint8).copy())


def test_expected_count_is_checked_before_allocating():
    small = free_stream(3 * 65536 + 5, chunk=65536)
    assert torch.equal(ops.rans_decode(small), torch.zeros(3 * 65536 + 5, dtype=torch.uint8))
    assert torch.equal(ops.rans_decode(small, expected=3 * 65536 + 5), torch.zeros(3 * 65536 + 5, dtype=torch.uint8))
    big = free_stream(1 << 31)
    assert big.numel() < 300_000 and ops.rans_info(big)["n_symbols"] == 1 << 31
    import time
    t0 = time.perf_counter()
    with pytest.raises(eoq.CorruptStreamError, match=f"declares {1 << 31} symbols, expected 1000"):
        ops.rans_decode(big, expected=1000)
    with pytest.raises(eoq.CorruptStreamError, match="expected"):
        ops.rans_decode(big, out=torch.empty(1000, dtype=torch.uint8), expected=1000)
    assert time.perf_counter() - t0 < 1.0  # nothing decoded, nothing of 2 GiB allocated
    with pytest.raises(eoq.CorruptStreamError, match="more than any stream"):
        ops.rans_decode(small, expected=1 << 64)
    for bad in (-1, 2.0, True, "5"):
        with pytest.raises(ValueError, match="expected must be"):
            ops.rans_decode(small, expected=bad)
    assert ops.rans_decode(small, expected=np.int64(3 * 65536 + 5)).numel() == 3 * 65536 + 5


def test_declared_count_near_2_to_64_is_rejected():
    # n + chunk - 1 would wrap to a small number: the chunk count must still be ceil(n / chunk).
    with pytest.raises(eoq.CorruptStreamError, match="chunk count"):
        ops.rans_info(free_stream((1 << 64) - 1, chunk=65536, n_chunks=0))
    # a chunk index longer than the stream is refused before anything is sized from it
    s = free_stream(65536, chunk=65536).numpy().tobytes()
    forged = bytearray(s[:20]) + (0xFFFFFFFF).to_bytes(4, "little") + s[24:]
    forged[8:16] = ((0xFFFFFFFF) * 65536).to_bytes(8, "little")
    with pytest.raises(eoq.CorruptStreamError, match="chunk index"):
        ops.rans_info(u8(np.frombuffer(bytes(forged), np.uint8).copy()))


def test_decode_into_a_given_buffer():
    x = u8(skewed(100_000, seed=9))
    s = ops.rans_encode(x)
    buf = torch.empty(100_000, dtype=torch.uint8)
    assert ops.rans_decode(s, out=buf).data_ptr() == buf.data_ptr()
    assert torch.equal(buf, x)
    with pytest.raises(ValueError, match="out has 99999 elements"):
        ops.rans_decode(s, out=torch.empty(99_999, dtype=torch.uint8))
    with pytest.raises(ValueError, match="contiguous 1-D uint8"):
        ops.rans_decode(s, out=torch.empty(100_000, dtype=torch.int16))
