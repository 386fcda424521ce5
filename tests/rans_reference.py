"""A slow, obvious Python EOQR encoder/decoder (docs/FORMAT.md), the reference the C++ coder
is compared against byte for byte. Pure Python integers: no overflow, no tricks."""

import math
import struct

LANES = 32
L = 1 << 16


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def normalize_freqs(counts, scale_bits):
    M = 1 << scale_bits
    n = sum(counts)
    if n == 0:
        return [0] * len(counts)
    f = [max(1, c * M // n) if c else 0 for c in counts]
    total = sum(f)
    while total != M:
        grow = total < M
        best, best_cost = None, 0.0
        for s, c in enumerate(counts):
            if not c or (not grow and f[s] <= 1):
                continue
            cost = -c * math.log2((f[s] + 1.0) / f[s]) if grow else c * math.log2(f[s] / (f[s] - 1.0))
            if best is None or cost < best_cost:
                best, best_cost = s, cost
        f[best] += 1 if grow else -1
        total += 1 if grow else -1
    return f


def _encode_chunk(sym, freq, cum, scale_bits):
    x = [L] * LANES
    words = []
    for i in range(len(sym) - 1, -1, -1):
        s = sym[i]
        f = freq[s]
        j = i % LANES
        if x[j] >= f << (32 - scale_bits):
            words.append(x[j] & 0xFFFF)
            x[j] >>= 16
        x[j] = ((x[j] // f) << scale_bits) + (x[j] % f) + cum[s]
    words.reverse()
    return struct.pack(f"<{LANES}I", *x) + struct.pack(f"<{len(words)}H", *words)


def encode(symbols: bytes, scale_bits=12, chunk_size=1 << 18) -> bytes:
    n = len(symbols)
    counts = [0] * 256
    for s in symbols:
        counts[s] += 1
    alphabet = 256
    while alphabet and counts[alphabet - 1] == 0:
        alphabet -= 1
    freq = normalize_freqs(counts[:alphabet], scale_bits)
    cum = [sum(freq[:s]) for s in range(alphabet)]
    n_chunks = -(-n // chunk_size)
    chunks = [symbols[c * chunk_size:(c + 1) * chunk_size] for c in range(n_chunks)]
    payloads = [_encode_chunk(c, freq, cum, scale_bits) for c in chunks]
    head = b"EOQR" + struct.pack("<BBBBQIIH", 1, scale_bits, LANES, 0, n, chunk_size, n_chunks, alphabet)
    head += struct.pack(f"<{alphabet}H", *freq)
    for p, c in zip(payloads, chunks):
        head += struct.pack("<II", len(p), crc32c(c))
    head += struct.pack("<I", crc32c(head))
    return head + b"".join(payloads)


def decode(stream: bytes) -> bytes:
    """Decodes a valid stream (no corruption handling: the C++ decoder is tested for that)."""
    scale_bits, n, chunk_size, n_chunks, alphabet = (stream[5],) + struct.unpack_from("<QIIH", stream, 8)
    freq = struct.unpack_from(f"<{alphabet}H", stream, 26)
    pos = 26 + 2 * alphabet
    sizes = [struct.unpack_from("<I", stream, pos + 8 * c)[0] for c in range(n_chunks)]
    pos += 8 * n_chunks + 4
    slot_sym = [s for s in range(alphabet) for _ in range(freq[s])]
    cum = [sum(freq[:s]) for s in range(alphabet)]
    mask = (1 << scale_bits) - 1
    out = bytearray()
    for c in range(n_chunks):
        m = min(chunk_size, n - c * chunk_size)
        x = list(struct.unpack_from(f"<{LANES}I", stream, pos))
        words = struct.unpack_from(f"<{(sizes[c] - 4 * LANES) // 2}H", stream, pos + 4 * LANES)
        rp = 0
        for i in range(m):
            j = i % LANES
            s = slot_sym[x[j] & mask]
            out.append(s)
            x[j] = freq[s] * (x[j] >> scale_bits) + (x[j] & mask) - cum[s]
            if x[j] < L:
                x[j] = (x[j] << 16) | words[rp]
                rp += 1
        assert rp == len(words) and all(v == L for v in x)
        pos += sizes[c]
    return bytes(out)
