"""Stand-alone loader for an eoq-quantized model folder (repo format 1).

eoq copies this file into every folder it writes. To load the model, put the folder on
sys.path (or run Python from inside it) and call:

    from load_quantized import load
    model = load()                      # the folder this file lives in, in config.json's dtype
    model = load(path, dtype=None, device="cpu")

With the ``eoq`` package importable, ``load`` hands the work to ``eoq.load_quantized``
(its fast C++ decoders). Without it, everything is done here in numpy and torch, with
no compiled extension: the manifest and checksums are verified, the codes are decoded
(EOQR rANS streams or packed bits), each weight is dequantized exactly as eoq does it,
so the tensors are bit-identical to eoq's, and the transformers model named by
config.json is built and given the weights. ``use_eoq`` picks the path: None (default)
uses eoq when it is importable, True requires it, False forces the pure path.

Lower-level helpers, for checking a folder tensor by tensor:
    read_folder(path) -> (manifest, state_dict)   every stored parameter, dequantized
    dequantize_entry(name, entry, tensors)        one manifest entry from its stored parts
    rans_decode(stream), unpack_bits(packed, bits, n), crc32c(data)

Needs numpy, torch, safetensors and transformers. The byte layouts are described in eoq's
docs/FORMAT.md.
"""

import json
import os
import zlib

import numpy as np
import torch

FORMAT = "eoq"
FORMAT_VERSION = 1
MANIFEST = "quant_manifest.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
QUANTIZED_KINDS = ("quantized", "protected")
SIDE_PARTS = {"absmax": ("scales",), "polar": ("scales", "codebook"), "turbo": ("scales", "codebook"),
              "ecsq": ("steps",)}


class CorruptStreamError(ValueError):
    """A coded stream (rANS or packed bits) is corrupt or truncated."""


class FormatError(ValueError):
    """A quantized folder that is missing, damaged, or disagrees with its manifest."""


# ---- CRC-32C (Castagnoli) ---------------------------------------------------------------------
#
# The rANS stream checks its header and every chunk of decoded symbols with CRC-32C, which
# zlib lacks. A byte-at-a-time loop in Python is far too slow for megabytes, so long inputs
# are cut into segments of _CRC_SEG bytes whose CRC registers are computed side by side
# (numpy, one step per byte position), then chained: the register after A || B is
# shift(register after A) ^ (register after B started from 0), shift being the effect of
# _CRC_SEG zero bytes, a GF(2)-linear map applied through four byte-indexed tables.

_CRC_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_CRC_SEG = 1024


def _make_crc_table() -> np.ndarray:
    c = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        c = np.where(c & 1, (c >> 1) ^ np.uint32(_CRC_POLY), c >> 1).astype(np.uint32)
    return c


_CRC_TABLE = _make_crc_table()
_CRC_TABLE_LIST = _CRC_TABLE.tolist()
_CRC_SHIFT = None  # [4, 256] uint32, built on first use


def _crc_shift_tables() -> np.ndarray:
    """Tables of the map 'register -> register after _CRC_SEG zero bytes', one per register byte."""
    global _CRC_SHIFT
    if _CRC_SHIFT is None:
        basis = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)
        for _ in range(_CRC_SEG):  # all 32 basis registers at once
            basis = _CRC_TABLE[basis & 0xFF] ^ (basis >> 8)
        v = np.arange(256, dtype=np.uint32)
        tables = np.zeros((4, 256), dtype=np.uint32)
        for i in range(4):
            for b in range(8):
                tables[i] ^= np.where((v >> b) & 1, basis[8 * i + b], 0).astype(np.uint32)
        _CRC_SHIFT = tables
    return _CRC_SHIFT


def _crc32c_small(data) -> int:
    t, c = _CRC_TABLE_LIST, 0xFFFFFFFF
    for b in bytes(data):
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def crc32c_many(arrays) -> list:
    """CRC-32C of each 1-D uint8 array (or bytes) in `arrays`, computed together."""
    arrays = [np.frombuffer(a, dtype=np.uint8) if isinstance(a, (bytes, bytearray)) else np.asarray(a, np.uint8)
              for a in arrays]
    out = [0] * len(arrays)
    big = [i for i, a in enumerate(arrays) if a.size >= 2 * _CRC_SEG]
    for i, a in enumerate(arrays):
        if a.size < 2 * _CRC_SEG:
            out[i] = _crc32c_small(a.tobytes())
    if not big:
        return out
    # Every array right-aligned in rows of n_seg segments: leading zeros leave a register
    # that starts at 0 at 0. The initial value 0xFFFFFFFF of a reflected CRC acts as the
    # complement of the first four data bytes, so those are flipped and every register starts at 0.
    n_seg = max(-(-arrays[i].size // _CRC_SEG) for i in big)
    width = n_seg * _CRC_SEG
    mat = np.zeros((len(big), width), dtype=np.uint8)
    for r, i in enumerate(big):
        a = arrays[i]
        mat[r, width - a.size:] = a
        mat[r, width - a.size:width - a.size + 4] ^= 0xFF
    cols = np.ascontiguousarray(mat.reshape(-1, _CRC_SEG).T)  # [byte position, segment]
    del mat
    reg = np.zeros(cols.shape[1], dtype=np.uint32)
    for k in range(_CRC_SEG):
        reg = _CRC_TABLE[(reg ^ cols[k]) & 0xFF] ^ (reg >> 8)
    reg = reg.reshape(len(big), n_seg)
    sh = _crc_shift_tables()
    c = np.zeros(len(big), dtype=np.uint32)
    for s in range(n_seg):
        c = sh[0][c & 0xFF] ^ sh[1][(c >> 8) & 0xFF] ^ sh[2][(c >> 16) & 0xFF] ^ sh[3][c >> 24] ^ reg[:, s]
    for r, i in enumerate(big):
        out[i] = int(c[r]) ^ 0xFFFFFFFF
    return out


def crc32c(data) -> int:
    """CRC-32C of bytes or a uint8 array (check value 0xE3069283 for b"123456789")."""
    return crc32c_many([data])[0]


# ---- EOQR rANS streams --------------------------------------------------------------------------

_LANES = 32
_L = 1 << 16
_MIN_CHUNK, _MAX_CHUNK = 1 << 16, 1 << 20
_BATCH_SYMBOLS = 1 << 25  # symbols decoded side by side per batch: bounds the scratch memory


def _as_bytes(stream) -> bytes:
    if isinstance(stream, torch.Tensor):
        return stream.detach().cpu().contiguous().numpy().tobytes()
    return bytes(np.asarray(stream, dtype=np.uint8).tobytes()) if isinstance(stream, np.ndarray) else bytes(stream)


def _u(buf: bytes, pos: int, size: int, what: str) -> int:
    if len(buf) - pos < size:
        raise CorruptStreamError(f"rANS stream truncated: header ends inside '{what}' at byte {pos} of {len(buf)}")
    return int.from_bytes(buf[pos:pos + size], "little")


def rans_parse(stream) -> dict:
    """The validated header of an EOQR stream, with the checks of eoq's C++ reader."""
    buf = _as_bytes(stream)
    if len(buf) < 4 or buf[:4] != b"EOQR":
        raise CorruptStreamError("not an EOQR rANS stream (bad magic)" if len(buf) >= 4 else
                                 f"rANS stream truncated: header ends inside 'magic' at byte 0 of {len(buf)}")
    if _u(buf, 4, 1, "version") != 1:
        raise CorruptStreamError(f"unsupported EOQR version {buf[4]} (this loader reads 1)")
    h = {"scale_bits": _u(buf, 5, 1, "scale_bits")}
    if not 10 <= h["scale_bits"] <= 15:
        raise CorruptStreamError(f"bad scale_bits {h['scale_bits']}")
    if _u(buf, 6, 1, "lanes") != _LANES:
        raise CorruptStreamError(f"bad lane count {buf[6]}")
    if _u(buf, 7, 1, "flags") != 0:
        raise CorruptStreamError("reserved flags are set")
    n, chunk = _u(buf, 8, 8, "n_symbols"), _u(buf, 16, 4, "chunk_size")
    if not _MIN_CHUNK <= chunk <= _MAX_CHUNK or chunk % _LANES:
        raise CorruptStreamError(f"bad chunk_size {chunk}")
    n_chunks = _u(buf, 20, 4, "n_chunks")
    if n_chunks != -(-n // chunk):
        raise CorruptStreamError(f"chunk count {n_chunks} does not match {n} symbols")
    alphabet = _u(buf, 24, 2, "alphabet")
    if alphabet > 256:
        raise CorruptStreamError("alphabet larger than 256")
    if (alphabet == 0) != (n == 0):
        raise CorruptStreamError("alphabet size inconsistent with length")
    pos = 26
    _u(buf, pos, 2 * alphabet, "frequency table")
    freq = np.frombuffer(buf, dtype="<u2", count=alphabet, offset=pos).astype(np.int64)
    pos += 2 * alphabet
    if alphabet and (int(freq.sum()) != 1 << h["scale_bits"] or freq[-1] == 0):
        raise CorruptStreamError("frequency table does not sum to 2^scale_bits")
    if (len(buf) - pos) // 8 < n_chunks:
        raise CorruptStreamError("rANS stream truncated inside the chunk index")
    index = np.frombuffer(buf, dtype="<u4", count=2 * n_chunks, offset=pos).reshape(n_chunks, 2).astype(np.int64)
    pos += 8 * n_chunks
    if _u(buf, pos, 4, "header crc") != crc32c(buf[:pos]):
        raise CorruptStreamError("header checksum mismatch")
    pos += 4
    sizes = index[:, 0]
    for c in range(n_chunks):
        if sizes[c] < 4 * _LANES or (sizes[c] - 4 * _LANES) % 2:
            raise CorruptStreamError(f"chunk {c} has an impossible size")
    total = pos + int(sizes.sum())
    if total != len(buf):
        raise CorruptStreamError(f"rANS stream is {'truncated' if len(buf) < total else 'followed by extra bytes'}: "
                                 f"header says {total} bytes, got {len(buf)}")
    h.update(buf=buf, n_symbols=n, chunk_size=chunk, n_chunks=n_chunks, alphabet=alphabet, freq=freq,
             chunk_bytes=sizes, chunk_crc=index[:, 1], header_bytes=pos)
    return h


def _decode_tables(h: dict):
    """Per slot of [0, 2^scale_bits): its symbol, its frequency, and slot - cum[symbol]."""
    freq = h["freq"]
    sym = np.repeat(np.arange(len(freq), dtype=np.int64), freq)
    cum = np.cumsum(freq) - freq
    bias = np.arange(sym.size, dtype=np.int64) - cum[sym]
    return sym.astype(np.uint8), freq[sym].astype(np.uint32), bias.astype(np.uint32)


class _Chunk:
    __slots__ = ("stream", "index", "m", "lo", "states", "words", "crc")


def _chunks_of(k: int, h: dict) -> list:
    buf, out, off = h["buf"], [], h["header_bytes"]
    for c in range(h["n_chunks"]):
        ch = _Chunk()
        ch.stream, ch.index, ch.lo = k, c, c * h["chunk_size"]
        ch.m = min(h["n_symbols"] - ch.lo, h["chunk_size"])
        nw = (int(h["chunk_bytes"][c]) - 4 * _LANES) // 2
        ch.states = np.frombuffer(buf, dtype="<u4", count=_LANES, offset=off).astype(np.uint32)
        ch.words = np.frombuffer(buf, dtype="<u2", count=nw, offset=off + 4 * _LANES)
        ch.crc = int(h["chunk_crc"][c])
        off += int(h["chunk_bytes"][c])
        out.append(ch)
    return out


def _decode_batch(chunks: list, tables: list, headers: list) -> tuple:
    """Decodes chunks (any streams) side by side; returns (symbols [C, groups * 32], errors)."""
    # Longest first, so the chunks still in their whole groups are always a prefix.
    chunks = sorted(chunks, key=lambda ch: -ch.m)
    C = len(chunks)
    full = np.array([ch.m // _LANES for ch in chunks], dtype=np.int64)
    rem = np.array([ch.m % _LANES for ch in chunks], dtype=np.int64)
    n_groups = -(-chunks[0].m // _LANES)
    out = np.zeros((C, n_groups, _LANES), dtype=np.uint8)

    # All the streams' slot tables and all the chunks' words in one array each, so that one
    # gather serves every lane of every chunk.
    streams = sorted({ch.stream for ch in chunks})
    tbase, parts, off = {}, [], 0
    for k in streams:
        tbase[k] = off
        parts.append(tables[k])
        off += tables[k][0].size
    sym_t = np.concatenate([p[0] for p in parts])
    freq_t = np.concatenate([p[1] for p in parts])
    bias_t = np.concatenate([p[2] for p in parts])
    n_words = np.array([ch.words.size for ch in chunks], dtype=np.int64)
    wbase = np.concatenate([[0], np.cumsum(n_words)[:-1]]).astype(np.int64)
    # A corrupt chunk may read past its own words: the padding keeps every read in bounds;
    # its word count check below rejects it.
    pad = np.zeros(chunks[0].m + _LANES, dtype=np.uint32)
    words = np.concatenate([ch.words.astype(np.uint32) for ch in chunks] + [pad])

    x = np.stack([ch.states for ch in chunks])
    sb = np.array([[headers[ch.stream]["scale_bits"]] for ch in chunks], dtype=np.uint32)
    mask = (np.uint32(1) << sb) - np.uint32(1)
    base = np.array([[tbase[ch.stream]] for ch in chunks], dtype=np.uint32)
    uniform = bool((sb == sb[0, 0]).all())
    # rp - 1 + the chunk's first word, per chunk: lane j needing a word reads wptr + (how
    # many lanes up to j need one), the lanes' reads being in lane order.
    wptr = wbase - 1
    # active[g]: how many chunks (longest first) still have a whole group g
    active = np.searchsorted(-full, -np.arange(int(full[0])), side="left").tolist()
    s_, m_ = (int(sb[0, 0]), int(mask[0, 0])) if uniform else (None, None)
    for g, k in enumerate(active):
        xs = x[:k]
        slot = (xs & m_ if uniform else xs & mask[:k]) + base[:k]
        out[:k, g] = sym_t[slot]
        xs = freq_t[slot] * (xs >> s_ if uniform else xs >> sb[:k]) + bias_t[slot]
        need = xs < _L
        pos = np.cumsum(need, axis=1)
        w = words[wptr[:k, None] + pos]
        x[:k] = np.where(need, (xs << 16) | w, xs)
        wptr[:k] += pos[:, -1]
    # The partial last group of each chunk that has one: only its first rem lanes decode.
    part = np.nonzero(rem)[0]
    if part.size:
        lane_ok = np.arange(_LANES)[None, :] < rem[part, None]
        xs = x[part]
        slot = (xs & mask[part]) + base[part]
        xs2 = freq_t[slot] * (xs >> sb[part]) + bias_t[slot]
        need = (xs2 < _L) & lane_ok
        pos = np.cumsum(need, axis=1)
        w = words[wptr[part, None] + pos]
        x[part] = np.where(lane_ok, np.where(need, (xs2 << 16) | w, xs2), xs)
        wptr[part] += pos[:, -1]
        out[part, full[part]] = np.where(lane_ok, sym_t[slot], 0)

    read = wptr + 1 - wbase
    errors = {}
    for r, ch in enumerate(chunks):
        if read[r] > n_words[r]:
            errors[(ch.stream, ch.index)] = "chunk payload ends before its last symbol"
        elif read[r] < n_words[r]:
            errors[(ch.stream, ch.index)] = "chunk payload has unread words"
        elif not (x[r] == _L).all():
            errors[(ch.stream, ch.index)] = "final state check failed"
    flat = out.reshape(C, -1)
    crcs = crc32c_many([flat[r, :ch.m] for r, ch in enumerate(chunks)])
    for r, ch in enumerate(chunks):
        if (ch.stream, ch.index) not in errors and crcs[r] != ch.crc:
            errors[(ch.stream, ch.index)] = "checksum of decoded symbols mismatch"
    return chunks, flat, errors


def rans_decode_many(streams) -> list:
    """Decodes several EOQR streams (bytes, uint8 arrays or tensors) into uint8 arrays.

    The 32 interleaved lanes of every chunk of every stream advance together, one numpy
    step per group of 32 symbols. A corrupt stream raises CorruptStreamError (a
    ValueError) with the checks and messages of eoq's C++ decoder; its ``stream``
    attribute is the index of the stream.
    """
    headers = []
    for k, s in enumerate(streams):
        try:
            headers.append(rans_parse(s))
        except CorruptStreamError as e:
            e.stream = k
            raise
    results = [np.empty(h["n_symbols"], dtype=np.uint8) for h in headers]
    tables = [_decode_tables(h) if h["n_symbols"] else None for h in headers]
    chunks = []
    for k, h in enumerate(headers):
        for ch in _chunks_of(k, h):
            if (ch.states < _L).any():
                raise _chunk_error(headers, k, ch.index, "initial state below 2^16")
            chunks.append(ch)
    batch, size = [], 0
    for i, ch in enumerate(chunks):
        batch.append(ch)
        size += ch.m
        if size >= _BATCH_SYMBOLS or i == len(chunks) - 1:
            done, flat, errors = _decode_batch(batch, tables, headers)
            if errors:
                (k, c), msg = min(errors.items())
                raise _chunk_error(headers, k, c, msg)
            for r, d in enumerate(done):
                results[d.stream][d.lo:d.lo + d.m] = flat[r, :d.m]
            batch, size = [], 0
    return results


def _chunk_error(headers, k, c, msg) -> CorruptStreamError:
    e = CorruptStreamError(f"rANS chunk {c} of {headers[k]['n_chunks']}: {msg}")
    e.stream = k
    return e


def rans_decode(stream) -> np.ndarray:
    """Decodes one EOQR stream into a uint8 array (see rans_decode_many)."""
    return rans_decode_many([stream])[0]


# ---- packed bits --------------------------------------------------------------------------------


def unpack_bits(packed, bits: int, n: int) -> np.ndarray:
    """n codes of `bits` bits, LSB first (eoq.ops.pack_bits); checks the byte count and padding."""
    p = np.asarray(packed.numpy() if isinstance(packed, torch.Tensor) else packed, dtype=np.uint8).reshape(-1)
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width must be in 1..8, got {bits}")
    total = n * bits
    if p.size != -(-total // 8):
        raise CorruptStreamError(f"packed codes: {p.size} bytes for {n} codes of {bits} bits "
                                 f"(expected {-(-total // 8)})")
    if total % 8 and int(p[-1]) >> (total % 8):
        raise CorruptStreamError("unpack_bits: padding bits of the last byte are not zero")
    b = np.unpackbits(p, bitorder="little")[:total].reshape(n, bits)
    return np.packbits(b, axis=1, bitorder="little").reshape(n)


# ---- the seeded Walsh-Hadamard transform ----------------------------------------------------------


def hadamard_signs(n: int, seed: int) -> torch.Tensor:
    """The n signs of the seed: bit 63 of the j-th splitmix64 output (docs/FORMAT.md)."""
    with np.errstate(over="ignore"):
        j = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF) + j * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy(np.where(z >> np.uint64(63), -1.0, 1.0).astype(np.float32))


def inverse_hadamard(x: torch.Tensor, block: int, seed) -> torch.Tensor:
    """ops.hadamard(x, block, seed, inverse=True) along the last dimension, float32.

    Bit-identical to eoq's kernel (cpp/hadamard.cpp) because every float operation is the
    same one: the butterflies stage by stage (h = 1, 2, 4, ...; x[j], x[j+h] <- a+b, a-b),
    then each value times float(1/sqrt(block)) * sign[j] (the sign applied after, for the inverse).
    """
    if block < 1 or block & (block - 1):
        raise ValueError(f"hadamard: block must be a power of two, got {block}")
    shape = x.shape
    v = x.to(torch.float32).reshape(-1, block)
    h = 1
    while h < block:
        v = v.reshape(-1, block // (2 * h), 2, h)
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        v = torch.stack((a + b, a - b), dim=2)
        h *= 2
    v = v.reshape(-1, block)
    scale = torch.tensor(1.0 / (float(block) ** 0.5), dtype=torch.float32)  # double, then rounded to float
    mult = scale * hadamard_signs(block, seed) if seed is not None else scale
    return (v * mult).reshape(shape)


# ---- dequantization -----------------------------------------------------------------------------


def _dtype(name, where: str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"{where}: unknown dtype {name!r}")
    return dt


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _is_quantized(entry: dict) -> bool:
    return entry.get("kind") in QUANTIZED_KINDS and "method" in entry


def _part_order(parts) -> list:
    """codes first, then the side parts by name: the order the checksum covers."""
    return (["codes"] if "codes" in parts else []) + sorted(p for p in parts if p != "codes")


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


def verify_entry(name: str, entry: dict, tensors: dict) -> None:
    """Checks the stored tensors against the entry: parts, dtypes, shapes, then the checksum."""
    if _is_quantized(entry):
        specs = entry.get("parts")
        if not isinstance(specs, dict) or "codes" not in specs:
            raise FormatError(f"{name}: the manifest lists no 'codes' part")
        missing = sorted(set(specs) - set(tensors))
        if missing:
            raise FormatError(f"{name}: stored parts {missing} are missing")
        checks = [(f"{name}.{p}", tensors[p], specs[p]) for p in specs]
        order = [tensors[p] for p in _part_order(specs)]
    else:
        if "tensor" not in tensors:
            raise FormatError(f"{name}: the tensor is missing")
        checks = [(name, tensors["tensor"], entry)]
        order = [tensors["tensor"]]
    for what, t, spec in checks:
        want = _dtype(spec.get("dtype"), what)
        if t.dtype != want or list(t.shape) != [int(s) for s in spec.get("shape", [])]:
            raise FormatError(f"{what}: stored as {_dtype_name(t.dtype)} {list(t.shape)}, the manifest says "
                              f"{spec.get('dtype')} {spec.get('shape')}")
    if "checksum" in entry:
        crc = 0
        for t in order:
            crc = zlib.crc32(_tensor_bytes(t), crc)
        got = f"crc32:{crc & 0xFFFFFFFF:08x}"
        if got != entry["checksum"]:
            raise FormatError(f"{name}: checksum mismatch (stored bytes give {got}, the manifest says "
                              f"{entry['checksum']}); the file is damaged")


def decode_codes(name: str, entry: dict, stream, decoded=None) -> torch.Tensor:
    """The entry's codes as a uint8 tensor of code_shape (decoded: an already rANS-decoded array)."""
    shape = [int(s) for s in entry["code_shape"]]
    n = int(np.prod(shape, dtype=np.int64))
    try:
        if decoded is not None:
            codes = decoded
        elif entry.get("codec") == "rans":
            codes = rans_decode(stream)
        elif entry.get("codec") == "packed":
            codes = unpack_bits(_tensor_bytes(stream), int(entry["code_bits"]), n)
        else:
            raise FormatError(f"{name}: unknown codec {entry.get('codec')!r}")
    except CorruptStreamError as e:
        raise FormatError(f"{name}.codes: corrupt code stream ({e})") from e
    if codes.size != n:
        raise FormatError(f"{name}.codes: decodes to {codes.size} codes, the manifest says {shape}")
    return torch.from_numpy(np.ascontiguousarray(codes)).view(shape)


def _absmax(entry, codes, p) -> torch.Tensor:
    # cpp/absmax.cpp: float(int(code) - 2^(bits-1)) * float(scale16), one scale per block of a row
    rows, cols = entry["qshape"]
    bits, block = int(entry["code_bits"]), int(entry["block_size"])
    if not 2 <= bits <= 8 or not 16 <= block <= 256:
        raise FormatError(f"absmax: bits {bits} / block {block} out of range")
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise FormatError(f"absmax: code {int(codes.max())} does not fit in {bits} bits")
    nb = -(-cols // block)
    values = (codes.reshape(rows, cols).to(torch.int32) - (1 << (bits - 1))).to(torch.float32)
    scales = p["scales"].float().reshape(rows, nb)
    if cols == nb * block:  # the same products, without materialising a scale per weight
        return (values.view(rows, nb, block) * scales.unsqueeze(-1)).view(rows, cols)
    return values * scales.repeat_interleave(block, dim=1)[:, :cols]


def _centroids(codes, codebook) -> torch.Tensor:
    if codes.numel() and int(codes.max()) >= codebook.numel():
        raise FormatError(f"code {int(codes.max())} has no centroid (codebook of {codebook.numel()})")
    return codebook.to(torch.float32)[codes.long()]


def _polar(entry, codes, p) -> torch.Tensor:
    rows, cols = entry["qshape"]
    meta = entry["meta"]
    block, padded = int(meta["rotation_block"]), int(meta["padded_cols"])
    c = _centroids(codes, p["codebook"]).view(rows, padded // block, block)
    x = c * p["scales"].float().unsqueeze(-1)
    seed = int(entry["seed"]) if meta.get("random_signs", True) else None
    return inverse_hadamard(x.reshape(rows, padded), block, seed)[:, :cols].contiguous()


def _turbo(entry, codes, p) -> torch.Tensor:
    rows, cols = entry["qshape"]
    meta = entry["meta"]
    block, padded, dim = int(meta["rotation_block"]), int(meta["padded_cols"]), int(meta["dim"])
    c = _centroids(codes, p["codebook"]).view(rows, padded // dim, dim)
    x = (c * p["scales"].float().unsqueeze(-1)).reshape(rows, padded)
    return inverse_hadamard(x, block, int(entry["seed"]))[:, :cols].contiguous()


def _ecsq(entry, codes, p) -> torch.Tensor:
    rows, cols = entry["qshape"]
    meta = entry["meta"]
    q = codes.float() + int(meta["offset"])
    g = rows if not meta.get("group_rows") else int(meta["group_rows"])
    per_row = p["steps"].repeat_interleave(g)[:rows].unsqueeze(1)
    return inverse_hadamard(q * per_row, int(meta["rotation_block"]), int(entry["seed"]))[:, :cols].contiguous()


_DEQUANTIZE = {"absmax": _absmax, "polar": _polar, "turbo": _turbo, "ecsq": _ecsq}


def dequantize_entry(name: str, entry: dict, tensors: dict, dtype=None, codes=None) -> torch.Tensor:
    """One stored parameter from its manifest entry and stored tensors, verified first.

    tensors: part name -> tensor (``codes``, ``scales``, ...; ``tensor`` for a passthrough
    entry). The result equals eoq's (``QuantizedTensor.dequantize`` and the transpose back)
    bit for bit, in the entry's dtype or `dtype`. codes: the codes already rANS-decoded
    (read_folder decodes many streams together), else they are decoded here.
    """
    if entry.get("kind") == "tied":
        raise FormatError(f"{name}: a tied entry stores nothing (it is {entry.get('tied_to')!r})")
    verify_entry(name, entry, tensors)
    return _dequantize(name, entry, tensors, dtype, codes)


def _dequantize(name: str, entry: dict, tensors: dict, dtype, codes) -> torch.Tensor:
    """dequantize_entry after verify_entry."""
    dtype = _dtype(dtype, "dtype") if dtype is not None else None
    if not _is_quantized(entry):
        t = tensors["tensor"]
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t
    out_dtype = dtype or _dtype(entry["dtype"], name)
    method = entry["method"]
    if method not in _DEQUANTIZE:
        raise FormatError(f"{name}: unknown method {method!r}")
    absent = [s for s in SIDE_PARTS[method] if s not in tensors]
    if absent:
        raise FormatError(f"{name}: {method} needs the parts {absent}")
    q = decode_codes(name, entry, tensors["codes"], codes)
    try:
        w = _DEQUANTIZE[method](entry, q, tensors)
        if "awq_scales" in tensors:  # AWQ scaled the input columns before quantizing
            w = w / tensors["awq_scales"].float()
        w = w.to(out_dtype)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{name}: cannot dequantize ({type(e).__name__}: {e})") from e
    if entry.get("transposed"):
        w = w.t().contiguous()
    if list(w.shape) != [int(s) for s in entry["shape"]]:
        raise FormatError(f"{name}: dequantizes to {list(w.shape)}, the manifest says {entry['shape']}")
    return w


# ---- the folder -----------------------------------------------------------------------------------


def read_manifest(path) -> dict:
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise FormatError(f"{path}: no {MANIFEST}; not an eoq-quantized folder")
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"{file}: unreadable or not JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise FormatError(f"{file}: not an eoq manifest (format {got!r}, expected {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{file}: format version {manifest.get('format_version')!r} is not supported by this "
                          f"loader (it reads version {FORMAT_VERSION})")
    if not isinstance(manifest.get("tensors"), dict):
        raise FormatError(f"{file}: no 'tensors' table")
    return manifest


def _stored_names(name: str, entry: dict) -> dict:
    """part -> safetensors tensor name."""
    if _is_quantized(entry):
        return {p: f"{name}.{p}" for p in entry.get("parts", {})}
    return {"tensor": name}


class _Files:
    """The folder's safetensors files, opened once each."""

    def __init__(self, path):
        self.path, self.open, self.weight_map = path, {}, None

    def locate(self, key: str) -> str:
        """The file holding key, for an entry without "file": from the shard index, else the single file."""
        if self.weight_map is None:
            index = os.path.join(self.path, INDEX)
            try:
                with open(index, encoding="utf-8") as f:
                    self.weight_map = json.load(f)["weight_map"]
            except FileNotFoundError:
                self.weight_map = {}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise FormatError(f"{index}: unreadable shard index ({e})") from e
        return self.weight_map.get(key, WEIGHTS)

    def get(self, file: str, key: str, owner: str) -> torch.Tensor:
        if not isinstance(file, str) or os.path.basename(file) != file or not file.endswith(".safetensors"):
            raise FormatError(f"{owner}: bad file name {file!r} in the manifest")
        if file not in self.open:
            from safetensors import safe_open

            full = os.path.join(self.path, file)
            if not os.path.isfile(full):
                raise FormatError(f"{full}: missing (the manifest stores {owner} there)")
            try:
                self.open[file] = safe_open(full, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise FormatError(f"{full}: not a readable safetensors file ({e})") from e
        f = self.open[file]
        if key not in f.keys():
            raise FormatError(f"{os.path.join(self.path, file)}: tensor {key!r} is missing")
        return f.get_tensor(key)


def _read_entry(files: _Files, name: str, entry: dict) -> dict:
    keys = _stored_names(name, entry)
    file = entry.get("file") or files.locate(next(iter(keys.values())))
    tensors = {p: files.get(file, key, name) for p, key in keys.items()}
    try:
        verify_entry(name, entry, tensors)
    except FormatError as e:
        raise FormatError(f"{os.path.join(files.path, str(file))}: {e}") from e
    return file, tensors


def read_folder(path, dtype=None) -> tuple:
    """(manifest, state_dict): every stored parameter, verified and dequantized.

    Tied entries are left out (the model ties them); the marker tensor is ignored. rANS
    streams are decoded a few tens of millions of codes at a time, many side by side.
    """
    manifest = read_manifest(path)
    files = _Files(path)
    entries = manifest["tensors"]
    state = {}
    pending, size = [], 0

    def flush():
        decoded = _decode_streams([(f"{os.path.join(path, f)}: {n}", t["codes"]) for n, f, e, t in pending])
        for (n, _, e, t), codes in zip(pending, decoded):
            state[n] = _dequantize(n, e, t, dtype, codes)
        pending.clear()

    for name in sorted(entries):
        entry = entries[name]
        if not isinstance(entry, dict) or "kind" not in entry:
            raise FormatError(f"{path}: manifest entry {name!r} has no kind")
        if entry["kind"] == "tied":
            continue
        file, tensors = _read_entry(files, name, entry)
        if _is_quantized(entry) and entry.get("codec") == "rans":
            pending.append((name, file, entry, tensors))
            size += int(np.prod(entry["code_shape"], dtype=np.int64))
            if size >= _BATCH_SYMBOLS:
                flush()
                size = 0
        else:
            state[name] = _dequantize(name, entry, tensors, dtype, None)
    if pending:
        flush()
    return manifest, {n: state[n] for n in sorted(state)}


def _decode_streams(items) -> list:
    """rans_decode_many over (label, stream) pairs; a corrupt stream's error names its label."""
    try:
        return rans_decode_many([s for _, s in items])
    except CorruptStreamError as e:
        raise FormatError(f"{items[getattr(e, 'stream', 0)][0]}.codes: corrupt code stream ({e})") from e


# ---- the model ------------------------------------------------------------------------------------


def _eoq_loader(required: bool):
    try:
        import eoq
    except ImportError as e:
        if required:
            raise ImportError(f"use_eoq=True but eoq is not importable ({e})") from e
        return None
    fn = getattr(eoq, "load_quantized", None)
    if fn is None and required:
        raise ImportError(f"use_eoq=True but this eoq ({getattr(eoq, '__version__', '?')}) has no load_quantized")
    return fn


def read_config(path):
    """config.json as transformers reads it, without its quantization_config."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights given to the model are plain tensors
    return config


def config_dtype(config):
    """The dtype config.json records (what from_pretrained's dtype="auto" uses), or None."""
    # (transformers 5 calls it dtype, and warns on reading the older torch_dtype)
    dt = getattr(config, "dtype", None) if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    if dt is None or dt == "auto":
        return None
    dt = _dtype(dt, "config.json dtype")
    return dt if dt.is_floating_point else None


def build_model(path, state_dict: dict, manifest: dict, config=None, device="cpu"):
    """The transformers model of config.json with the weights of state_dict, in eval mode.

    Every parameter must come from state_dict, or be tied to one that does (by the model's
    own tying, or by a manifest "tied" entry).
    """
    import transformers

    config = config if config is not None else read_config(path)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise FormatError(f"{os.path.join(path, 'config.json')}: architecture {archs[:1]} is not a transformers "
                          f"model class")
    floats = [t.dtype for t in state_dict.values() if t.is_floating_point()]
    model = _construct(cls, config, max(set(floats), key=floats.count) if floats else None)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.unexpected_keys:
        raise FormatError(f"{path}: {len(result.unexpected_keys)} stored parameters are not in {archs[0]}: "
                          f"{sorted(result.unexpected_keys)[:8]}")
    entries = manifest["tensors"]
    tied = {k: entries[k].get("tied_to") for k in result.missing_keys
            if isinstance(entries.get(k), dict) and entries[k].get("kind") == "tied"}
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, target in tied.items():
        if target not in state_dict:
            raise FormatError(f"{path}: {key} is tied to {target!r}, which is not stored")
        if key in params and params[key].data_ptr() != params.get(target, params[key]).data_ptr():
            # The model does not tie them itself: give it the stored copy they share.
            model.load_state_dict({key: state_dict[target]}, strict=False, assign=True)
    # What the model ties itself (transformers' save_pretrained may leave a tied head out of
    # the checkpoint, and so out of the manifest) is covered by the parameter it now shares.
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state_dict if k in params}
    missing = sorted(k for k in result.missing_keys if k in params and id(params[k]) not in loaded)
    if missing:
        raise FormatError(f"{path}: {len(missing)} parameters of {archs[0]} are not in the folder: {missing[:8]}")
    model.to(device)
    return model.eval()


def _construct(cls, config, dtype):
    """The model skeleton, under dtype as the default (as from_pretrained builds it) and
    without the random initialisation that every weight replaces anyway."""
    before = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # an older transformers: pay for the initialisation
            return cls(config)
        with no_init_weights():
            return cls(config)
    finally:
        torch.set_default_dtype(before)


def load(path=None, dtype=None, device="cpu", use_eoq=None):
    """The quantized model in `path` (default: this file's folder), dequantized, in eval mode.

    dtype: a torch dtype (or its name) for the floating-point weights; None takes the dtype
    config.json records (like from_pretrained's dtype="auto"). use_eoq: None uses eoq when it
    is importable, True requires it, False forces the pure numpy/torch path.
    """
    path = os.path.abspath(path if path is not None else os.path.dirname(os.path.abspath(__file__)))
    if isinstance(dtype, str):
        dtype = _dtype(dtype, "dtype")
    if use_eoq is not False:
        fn = _eoq_loader(required=use_eoq is True)
        if fn is not None:
            model, _manifest = fn(path, dtype=dtype, device=device)
            return model
    read_manifest(path)  # a clear error before transformers meets an unknown folder
    config = read_config(path)
    manifest, state = read_folder(path, dtype=dtype or config_dtype(config))
    return build_model(path, state, manifest, config=config, device=device)


__all__ = ["load", "read_folder", "read_manifest", "dequantize_entry", "verify_entry", "decode_codes", "build_model",
           "read_config", "rans_decode", "rans_decode_many", "rans_parse", "unpack_bits", "crc32c", "crc32c_many",
           "inverse_hadamard", "hadamard_signs", "CorruptStreamError", "FormatError"]
