"""Stand-alone loader for an eoq-quantized model folder (repo format 2).

eoq copies this file into every folder it writes. To load the model, put the folder on
sys.path (or run Python from inside it) and call:

    from load_quantized import load
    model = load()                      # the folder this file lives in, in config.json's dtype
    model = load(path, dtype=None, device="cpu")

With the ``eoq`` package importable, ``load`` hands the work to ``eoq.load_quantized``
(its fast C++ decoders). Without it, everything is done here in numpy and torch, with
no compiled extension: the folder is checked as eoq checks it (every manifest field by type
and range, the shard index, each safetensors header, the stored tensors against the
manifest, every checksum, the side tensors' values) before anything is decoded, then the
codes are decoded (EOQR rANS streams or packed bits), each weight is dequantized exactly as
eoq does it, so the tensors are bit-identical to eoq's, and the transformers model named by
config.json is built and given the weights. ``use_eoq`` picks the path: None (default)
uses eoq when it is importable, True requires it, False forces the pure path.

A folder that is damaged, or was written to deceive, raises FormatError (a ValueError)
naming the file, the tensor and the problem; no length or shape read from the folder is
used to allocate memory before it has been checked.

Lower-level helpers, for checking a folder tensor by tensor:
    read_folder(path) -> (manifest, state_dict)   every stored parameter, verified and dequantized
    read_manifest(path), validate_manifest(manifest, where)
    dequantize_entry(name, entry, tensors)        one manifest entry from its stored parts
    entry_checksum(name, entry, tensors), manifest_checksum(manifest)
    rans_decode(stream), unpack_bits(packed, bits, n), crc32c(data, value)

Needs numpy, torch and transformers. The byte layouts are described in eoq's
docs/FORMAT.md.
"""

import json
import math
import mmap
import os
import re
import struct

import numpy as np
import torch

FORMAT = "eoq"
FORMAT_VERSION = 2
MANIFEST = "quant_manifest.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MARKER_TEXT = "eoq-quantized weights: `import eoq` before from_pretrained, or use load_quantized.py"
QUANTIZED_KINDS = ("quantized", "protected")
KINDS = ("quantized", "protected", "passthrough", "tied")
METHODS = ("absmax", "polar", "turbo", "ecsq")
SIDE_PARTS = {"absmax": ("scales",), "polar": ("scales", "codebook"), "turbo": ("scales", "codebook"),
              "ecsq": ("steps",)}
# ecsq's optional parts: low (raw low bits, exactly when meta.low_bits > 0) and recon (fitted
# reconstruction points, exactly when meta.recon > 0)
OPTIONAL_PARTS = ("awq_scales", "low", "recon")
PART_DTYPES = {"codes": "uint8", "scales": "float16", "steps": "float32", "codebook": "float32",
               "awq_scales": "float16", "low": "uint8", "recon": "float32"}
MAX_RECON = 8
MAX_LOW_BITS = 8  # ecsq levels (hi << low_bits | lo) span less than 2^16
# torch dtype names a stored tensor may have, and their safetensors names
DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int64", "int32", "int16",
          "int8", "uint8", "bool")
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
             "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
             "BOOL": "bool"}
MAX_MANIFEST_BYTES = 256 << 20  # a manifest is ~1 KB a tensor; refuse to parse a bomb
MAX_WEIGHT = 1e37               # the largest weight magnitude side tensors may imply (float32 tops out at 3.4e38)
MAX_HEADER = 100 << 20          # safetensors' own limit on the JSON header
MAX_DIMS = 8
MAX_NUMEL = 1 << 40
MIN_BLOCK, MAX_BLOCK = 16, 1 << 16
MAX_TENSORS = 1 << 20
CHECKSUM = re.compile(r"crc32c:[0-9a-f]{8}\Z")
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors\Z")


class CorruptStreamError(ValueError):
    """A coded stream (rANS or packed bits) is corrupt or truncated."""


class FormatError(ValueError):
    """A quantized folder that is missing, damaged, or disagrees with its manifest; the
    message names the file, the tensor and the problem."""


# ---- CRC-32C (Castagnoli) ---------------------------------------------------------------------
#
# The rANS stream checks its header and every chunk of decoded symbols with CRC-32C, and the
# manifest's checksums are CRC-32C too; zlib lacks it. A byte-at-a-time loop in Python is far
# too slow for megabytes, so long inputs are cut into segments of _CRC_SEG bytes whose CRC
# registers are computed side by side (numpy, one step per word position), then chained: the
# register after A || B is shift(register after A) ^ (register after B started from 0), shift
# being the effect of _CRC_SEG zero bytes, a GF(2)-linear map applied through four
# byte-indexed tables. A CRC continued from a previous value (crc32c(b, crc32c(a)) ==
# crc32c(a + b)) starts its register at that value's complement, which for a long input acts
# as that register xor-ed into the first four bytes.

_CRC_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_CRC_SEG = 1024
_CRC_PIECE = 1 << 24    # crc32c() works through long inputs this many bytes at a time


def _make_crc_table() -> np.ndarray:
    c = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        c = np.where(c & 1, (c >> 1) ^ np.uint32(_CRC_POLY), c >> 1).astype(np.uint32)
    return c


_CRC_TABLE = _make_crc_table()
_CRC_TABLE_LIST = _CRC_TABLE.tolist()
# slice-by-4: _CRC_TABLES4[k][b] is the register after byte b then k zero bytes, so four
# bytes (one little-endian word xor-ed into the register) take one step of four lookups
_CRC_TABLES4 = [_CRC_TABLE]
for _ in range(3):
    _CRC_TABLES4.append((_CRC_TABLES4[-1] >> 8) ^ _CRC_TABLE[_CRC_TABLES4[-1] & 0xFF])
_CRC_SHIFT = None  # [4, 256] uint32, built on first use
_CRC_SHIFT_LISTS = None


def _crc_shift_tables() -> np.ndarray:
    """Tables of the map 'register -> register after _CRC_SEG zero bytes', one per register byte."""
    global _CRC_SHIFT, _CRC_SHIFT_LISTS
    if _CRC_SHIFT is None:
        basis = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)
        for _ in range(_CRC_SEG):  # all 32 basis registers at once
            basis = _CRC_TABLE[basis & 0xFF] ^ (basis >> 8)
        v = np.arange(256, dtype=np.uint32)
        tables = np.zeros((4, 256), dtype=np.uint32)
        for i in range(4):
            for b in range(8):
                tables[i] ^= np.where((v >> b) & 1, basis[8 * i + b], 0).astype(np.uint32)
        _CRC_SHIFT, _CRC_SHIFT_LISTS = tables, [t.tolist() for t in tables]
    return _CRC_SHIFT


def _crc_value(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) <= 0xFFFFFFFF:
        raise ValueError(f"value must be a previous CRC-32C, an int in [0, 2^32), got {value!r}")
    return int(value)


def _crc32c_small(data, value: int = 0) -> int:
    t, c = _CRC_TABLE_LIST, value ^ 0xFFFFFFFF
    for b in bytes(data):
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _u8_view(a) -> np.ndarray:
    """A 1-D uint8 view (no copy when possible) of bytes, a numpy array or a tensor."""
    if isinstance(a, (bytes, bytearray, memoryview)):
        return np.frombuffer(a, dtype=np.uint8)
    if isinstance(a, torch.Tensor):
        return _tensor_bytes(a)
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return a.reshape(-1)


def crc32c_many(arrays, values=None) -> list:
    """CRC-32C of each 1-D uint8 array (or bytes) in `arrays`, computed together; values[i]
    (default 0) is the CRC-32C of bytes preceding arrays[i], which the result continues."""
    arrays = [_u8_view(a) for a in arrays]
    values = [0] * len(arrays) if values is None else [_crc_value(v) for v in values]
    out = [0] * len(arrays)
    big = [i for i, a in enumerate(arrays) if a.size >= 2 * _CRC_SEG]
    for i, a in enumerate(arrays):
        if a.size < 2 * _CRC_SEG:
            out[i] = _crc32c_small(a.tobytes(), values[i])
    if not big:
        return out
    # Every array right-aligned in rows of n_seg segments: leading zeros leave a register
    # that starts at 0 at 0. The initial register (0xFFFFFFFF for a fresh CRC) acts as that
    # register xor-ed into the first four data bytes, so those are xor-ed and every register
    # starts at 0.
    n_seg = max(-(-arrays[i].size // _CRC_SEG) for i in big)
    width = n_seg * _CRC_SEG
    mat = np.zeros((len(big), width), dtype=np.uint8)
    for r, i in enumerate(big):
        a = arrays[i]
        mat[r, width - a.size:] = a
        init = values[i] ^ 0xFFFFFFFF
        mat[r, width - a.size:width - a.size + 4] ^= np.array([(init >> (8 * k)) & 0xFF for k in range(4)],
                                                              dtype=np.uint8)
    # [word position, segment]: the segments' words side by side, four bytes a step
    cols = np.ascontiguousarray(mat.view("<u4").reshape(-1, _CRC_SEG // 4).T)
    del mat
    t0, t1, t2, t3 = _CRC_TABLES4
    reg = np.zeros(cols.shape[1], dtype=np.uint32)
    for k in range(_CRC_SEG // 4):
        c = reg ^ cols[k]
        reg = t3[c & 0xFF] ^ t2[(c >> 8) & 0xFF] ^ t1[(c >> 16) & 0xFF] ^ t0[c >> 24]
    del cols
    reg = reg.reshape(len(big), n_seg)
    sh = _crc_shift_tables()
    if len(big) == 1:  # one register: Python ints beat numpy scalars
        s0, s1, s2, s3 = _CRC_SHIFT_LISTS
        c = 0
        for r in reg[0].tolist():
            c = s0[c & 0xFF] ^ s1[(c >> 8) & 0xFF] ^ s2[(c >> 16) & 0xFF] ^ s3[c >> 24] ^ r
        out[big[0]] = c ^ 0xFFFFFFFF
        return out
    c = np.zeros(len(big), dtype=np.uint32)
    for s in range(n_seg):
        c = sh[0][c & 0xFF] ^ sh[1][(c >> 8) & 0xFF] ^ sh[2][(c >> 16) & 0xFF] ^ sh[3][c >> 24] ^ reg[:, s]
    for r, i in enumerate(big):
        out[i] = int(c[r]) ^ 0xFFFFFFFF
    return out


def crc32c(data, value: int = 0) -> int:
    """CRC-32C of bytes, a uint8 array or a tensor's raw bytes (check value 0xE3069283 for
    b"123456789"), continuing `value`, the CRC-32C of the bytes before: crc32c(b, crc32c(a))
    == crc32c(a + b). Long inputs are taken _CRC_PIECE bytes at a time (bounded scratch memory)."""
    a, value = _u8_view(data), _crc_value(value)
    if a.size <= _CRC_PIECE:
        return crc32c_many([a], [value])[0]
    for start in range(0, a.size, _CRC_PIECE):
        value = crc32c_many([a[start:start + _CRC_PIECE]], [value])[0]
    return value


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's elements' bytes, row-major (the safetensors layout), as a 1-D uint8 array."""
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)

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


def rans_parse(stream, expected=None) -> dict:
    """The validated header of an EOQR stream, with the checks of eoq's C++ reader.

    expected: the number of symbols the caller knows the stream must hold (an entry's
    code_shape); the declared count is compared with it as soon as the header has been read
    and its checksum checked, before any output is allocated (a few crafted bytes may
    declare 2^36 symbols)."""
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
    if _u(buf, pos, 4, "header crc") != crc32c(memoryview(buf)[:pos]):
        raise CorruptStreamError("header checksum mismatch")
    pos += 4
    if expected is not None and n != expected:
        raise CorruptStreamError(f"the stream declares {n} symbols, {expected} expected")
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


def rans_decode_many(streams, expected=None) -> list:
    """Decodes several EOQR streams (bytes, uint8 arrays or tensors) into uint8 arrays.

    expected: for each stream, the number of symbols it must hold (None: any), checked
    against its header before anything is allocated.

    The 32 interleaved lanes of every chunk of every stream advance together, one numpy
    step per group of 32 symbols. A corrupt stream raises CorruptStreamError (a
    ValueError) with the checks and messages of eoq's C++ decoder; its ``stream``
    attribute is the index of the stream.
    """
    headers = []
    expected = [None] * len(streams) if expected is None else list(expected)
    if len(expected) != len(streams):
        raise ValueError(f"{len(streams)} streams but {len(expected)} expected counts")
    for k, s in enumerate(streams):
        try:
            headers.append(rans_parse(s, expected[k]))
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


def rans_decode(stream, expected=None) -> np.ndarray:
    """Decodes one EOQR stream into a uint8 array (see rans_decode_many)."""
    return rans_decode_many([stream], [expected])[0]


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



# ---- validation: every manifest field before it is trusted ---------------------------------------
#
# As eoq.validate: every entry's kind, shapes, dtypes, method parameters and stored parts are
# checked against each other and against fixed ranges before anything is allocated from them
# (a qshape of [2^28, 64] must fail here or at the stream's declared length, never after a
# 64 GB allocation), and every checksum must be present.


def _fail(where: str, msg: str):
    raise FormatError(f"{where}: {msg}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _want_int(where: str, field: str, v, lo: int, hi: int) -> int:
    if not _is_int(v) or not lo <= v <= hi:
        _fail(where, f"{field} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _want_whole(where: str, field: str, v, lo: int, hi: int) -> int:
    """An integer, possibly written as a float (4.0): the fixed-rate methods' bits."""
    if not _is_num(v) or not float(v).is_integer() or not lo <= v <= hi:
        _fail(where, f"{field} must be a whole number in [{lo}, {hi}], got {v!r}")
    return int(v)


def _want_shape(where: str, field: str, v, dims=None) -> list:
    if not isinstance(v, list) or len(v) > MAX_DIMS or not all(_is_int(s) and 0 <= s <= MAX_NUMEL for s in v):
        _fail(where, f"{field} must be a list of at most {MAX_DIMS} non-negative integers, got {v!r}")
    if dims is not None and len(v) != dims:
        _fail(where, f"{field} must have {dims} dimensions, got {v!r}")
    if math.prod(v) > MAX_NUMEL:
        _fail(where, f"{field} {v} holds more than 2^40 values")
    return v


def _want_pow2(where: str, field: str, v, lo: int, hi: int) -> int:
    _want_int(where, field, v, lo, hi)
    if v & (v - 1):
        _fail(where, f"{field} must be a power of two, got {v}")
    return v


def _expect(where: str, field: str, got, want) -> None:
    if got != want:
        _fail(where, f"{field} is {got!r}, the entry's shapes need {want!r}")


def validate_manifest(manifest, where: str = MANIFEST) -> dict:
    """Every field a reader uses, for every entry (eoq.validate); returns the manifest."""
    if not isinstance(manifest, dict):
        _fail(where, "the manifest is not a JSON object")
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict) or not 0 < len(tensors) <= MAX_TENSORS:
        _fail(where, f"'tensors' must be an object of 1 to {MAX_TENSORS} entries")
    for name, entry in tensors.items():
        validate_entry(name, entry, f"{where}: tensor {name!r}")
    for name, entry in tensors.items():
        if entry["kind"] == "tied":
            target = tensors.get(entry["tied_to"])
            if target is None or target["kind"] == "tied":
                _fail(f"{where}: tensor {name!r}", f"tied_to {entry['tied_to']!r} is not a stored tensor")
            if target["shape"] != entry["shape"]:
                _fail(f"{where}: tensor {name!r}", f"shape {entry['shape']} differs from the shape "
                      f"{target['shape']} of {entry['tied_to']!r} it is tied to")
    marker = manifest.get("marker")
    if marker is None and any(_is_quantized(e) for e in tensors.values()):
        _fail(where, "quantized entries but no marker (the marker keeps eoq-less loaders from loading garbage)")
    if marker is not None and (not isinstance(marker, str) or not _is_quantized(tensors.get(marker))):
        _fail(where, f"marker {marker!r} is not a quantized tensor of the manifest")
    # Two entries must not claim the same stored tensor (an entry "x.codes" beside the parts of "x").
    owner = {} if marker is None else {marker: f"the marker ({marker})"}
    for name, entry in tensors.items():
        if entry["kind"] == "tied":
            continue
        for key in _stored_names(name, entry).values():
            if key in owner:
                _fail(f"{where}: tensor {name!r}", f"stores {key!r}, which is also {owner[key]}")
            owner[key] = f"stored by {name!r}"
    if not isinstance(manifest.get("checksum"), str) or not CHECKSUM.match(manifest["checksum"]):
        _fail(where, f"the manifest checksum is missing or malformed ({manifest.get('checksum')!r})")
    return manifest


def validate_entry(name, entry, where: str, stored: bool = True) -> None:
    """One entry's fields by type and range (stored=False: without the 'file' it lives in,
    for an entry checked on its own)."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        _fail(where, "tensor names must be non-empty strings of at most 1024 characters")
    if not isinstance(entry, dict):
        _fail(where, "the entry is not a JSON object")
    kind = entry.get("kind")
    if kind not in KINDS:
        _fail(where, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(entry.get("checksum"), str) or not CHECKSUM.match(entry["checksum"]):
        _fail(where, f"checksum is missing or malformed ({entry.get('checksum')!r}); every entry must have one")
    shape = _want_shape(where, "shape", entry.get("shape"))
    if entry.get("dtype") not in DTYPES:
        _fail(where, f"dtype must be one of {', '.join(DTYPES)}, got {entry.get('dtype')!r}")
    if kind == "tied":
        if not isinstance(entry.get("tied_to"), str):
            _fail(where, f"tied_to must name a tensor, got {entry.get('tied_to')!r}")
        return
    file = entry.get("file")
    if (stored or file is not None) and (not isinstance(file, str) or not FILE_NAME.match(file)):
        _fail(where, f"file must be a plain *.safetensors file name in the folder, got {file!r}")
    if "method" in entry:
        _validate_quantized(where, entry, shape)
    elif kind == "quantized":
        _fail(where, "a quantized entry has no method")


def _validate_quantized(where: str, entry: dict, shape: list) -> None:
    method = entry["method"]
    if method not in METHODS:
        _fail(where, f"method must be one of {', '.join(METHODS)}, got {method!r}")
    rows, cols = _want_shape(where, "qshape", entry.get("qshape"), dims=2)
    if rows < 1 or cols < 1:
        _fail(where, f"qshape {entry['qshape']} is empty")
    transposed = entry.get("transposed")
    if not isinstance(transposed, bool):
        _fail(where, f"transposed must be true or false, got {transposed!r}")
    if shape != ([cols, rows] if transposed else [rows, cols]):
        _fail(where, f"shape {shape} does not match qshape {entry['qshape']} (transposed: {transposed})")
    _want_int(where, "seed", entry.get("seed"), 0, (1 << 64) - 1)
    code_bits = _want_int(where, "code_bits", entry.get("code_bits"), 1, 8)
    codec = entry.get("codec")
    if codec not in ("rans", "packed"):
        _fail(where, f"codec must be 'rans' or 'packed', got {codec!r}")
    code_shape = _want_shape(where, "code_shape", entry.get("code_shape"))
    meta = entry.get("meta")
    if not isinstance(meta, dict):
        _fail(where, f"meta must be an object, got {meta!r}")
    if not _is_num(entry.get("bits")):
        _fail(where, f"bits must be a finite number, got {entry.get('bits')!r}")
    parts = _validate_parts(where, entry, method)
    n_codes = math.prod(code_shape)
    if codec == "packed" and parts["codes"] != [-(-n_codes * code_bits // 8)]:
        _fail(where, f"packed codes of {n_codes} codes at {code_bits} bits take {-(-n_codes * code_bits // 8)} "
                     f"bytes, parts.codes says {parts['codes']}")
    for part in ("low", "recon"):
        if part in parts and method != "ecsq":
            _fail(where, f"parts.{part} belongs to ecsq entries only, not {method}")
    if "awq_scales" in parts and parts["awq_scales"] != [cols]:
        _fail(where, f"awq_scales must have one value per input feature ({cols}), parts say {parts['awq_scales']}")
    if method == "absmax":
        bits = _want_whole(where, "bits", entry["bits"], 2, 8)
        block = _want_int(where, "block_size", entry.get("block_size"), 16, 256)
        _expect(where, "code_shape", code_shape, [rows, cols])
        _expect(where, "code_bits", code_bits, bits)
        _expect(where, "parts.scales", parts["scales"], [rows, -(-cols // block)])
        return
    block = _want_pow2(where, "meta.rotation_block", meta.get("rotation_block"), MIN_BLOCK, MAX_BLOCK)
    padded = _want_int(where, "meta.padded_cols", meta.get("padded_cols"), cols, cols + MIN_BLOCK - 1)
    if padded % block:
        _fail(where, f"meta.padded_cols {padded} is not a multiple of the rotation block {block}")
    _expect(where, "code_shape", code_shape, [rows, padded])
    if method == "ecsq":
        _expect(where, "block_size", entry.get("block_size"), block)
        k = _want_int(where, "meta.low_bits", meta.get("low_bits", 0), 0, MAX_LOW_BITS)
        _want_int(where, "meta.offset", meta.get("offset"), -(1 << 31), (1 << 31) - (256 << k))
        if k:
            _expect(where, "parts.low", parts.get("low"), [-(-rows * padded * k // 8)])
        elif "low" in parts:
            _fail(where, "parts.low is stored but meta.low_bits is 0")
        m = _want_int(where, "meta.recon", meta.get("recon", 0), 0, MAX_RECON)
        if m and k:
            _fail(where, "meta.recon (fitted reconstruction) and meta.low_bits exclude each other")
        if m:
            _expect(where, "parts.recon", parts.get("recon"), [m])
        elif "recon" in parts:
            _fail(where, "parts.recon is stored but meta.recon is 0")
        g = meta.get("group_rows")
        if g is not None:
            _want_int(where, "meta.group_rows", g, 1, rows)
        _expect(where, "parts.steps", parts["steps"], [1 if g is None else -(-rows // g)])
        return
    bits = _want_whole(where, "bits", entry["bits"], 1, 8)
    _expect(where, "code_bits", code_bits, bits)
    _expect(where, "parts.codebook", parts["codebook"], [1 << bits])
    if method == "polar":
        if not isinstance(meta.get("random_signs"), bool):
            _fail(where, f"meta.random_signs must be true or false, got {meta.get('random_signs')!r}")
        group = block
    else:
        if meta.get("group") not in ("block", "row"):
            _fail(where, f"meta.group must be 'block' or 'row', got {meta.get('group')!r}")
        group = _want_int(where, "meta.dim", meta.get("dim"), 1, padded)
        _expect(where, "meta.dim", group, block if meta["group"] == "block" else padded)
    _expect(where, "parts.scales", parts["scales"], [rows, padded // group])


def _validate_parts(where: str, entry: dict, method: str) -> dict:
    """{part: shape} after checking the names, dtypes and shapes the entry lists."""
    parts = entry.get("parts")
    allowed = ("codes",) + SIDE_PARTS[method] + OPTIONAL_PARTS
    if not isinstance(parts, dict):
        _fail(where, f"parts must be an object, got {parts!r}")
    missing = [p for p in ("codes",) + SIDE_PARTS[method] if p not in parts]
    unknown = [p for p in parts if p not in allowed]
    if missing or unknown:
        _fail(where, f"parts must be {', '.join(allowed[:-3])} (and optionally awq_scales, low, recon); "
                     + (f"missing {missing}" if missing else f"unknown {unknown}"))
    out = {}
    for part, spec in parts.items():
        if not isinstance(spec, dict):
            _fail(where, f"parts.{part} must be an object, got {spec!r}")
        if spec.get("dtype") != PART_DTYPES[part]:
            _fail(where, f"parts.{part} must be stored as {PART_DTYPES[part]}, the manifest says {spec.get('dtype')!r}")
        out[part] = _want_shape(where, f"parts.{part}.shape", spec.get("shape"), dims=None if part == "scales" else 1)
    return out


# ---- checksums ------------------------------------------------------------------------------------
#
# An entry's checksum covers what it stores *and* how it is read: CRC-32C over the stored
# tensors' bytes (codes, then the other parts by name; the tensor itself; nothing for a tied
# entry), continued over the canonical JSON of [name, the entry without its checksum]. The
# manifest's checksum is the CRC-32C of the canonical JSON of {"marker", "tensors": {name:
# entry checksum}}.


def canonical_json(obj, where: str) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as e:
        raise FormatError(f"{where}: not canonical JSON ({e})") from e


# Every function below that computes a CRC takes the CRC function as ``crc``: this file's
# numpy one by default, eoq's C++ one (eoq.format.repo) when eoq reads, so one body serves both
# readers. ``crc(data, value)``: data bytes or a tensor, value the CRC-32C of what came before.


def data_checksum(entry: dict, tensors: dict, crc=crc32c) -> int:
    """The CRC-32C of an entry's stored tensors (part -> tensor, "tensor" for an unquantized
    entry) in their stored order; 0 for a tied one (nothing stored)."""
    value = 0
    if entry.get("kind") != "tied":
        order = _part_order(entry["parts"]) if _is_quantized(entry) else ["tensor"]
        for part in order:
            value = crc(tensors[part], value)
    return value


def recipe_checksum(name: str, entry: dict, value: int, crc=crc32c) -> str:
    """"crc32c:%08x": ``value`` (the stored bytes' CRC-32C) continued over the canonical JSON
    of [name, the entry without its checksum], as docs/FORMAT.md defines it."""
    recipe = [name, {k: v for k, v in entry.items() if k != "checksum"}]
    return f"crc32c:{crc(canonical_json(recipe, name), value):08x}"


def entry_checksum(name: str, entry: dict, tensors: dict, crc=crc32c) -> str:
    """An entry's checksum from its stored tensors and its recipe."""
    return recipe_checksum(name, entry, data_checksum(entry, tensors, crc), crc)


def manifest_checksum(manifest: dict, where: str = MANIFEST, crc=crc32c) -> str:
    listing = {"marker": manifest.get("marker"),
               "tensors": {n: e.get("checksum") if isinstance(e, dict) else None
                           for n, e in manifest["tensors"].items()}}
    return f"crc32c:{crc(canonical_json(listing, where), 0):08x}"


# ---- dequantization -------------------------------------------------------------------------------


def _dtype(name, where: str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"{where}: unknown dtype {name!r}")
    return dt


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _is_quantized(entry) -> bool:
    return isinstance(entry, dict) and entry.get("kind") in QUANTIZED_KINDS and "method" in entry


def _part_order(parts) -> list:
    """codes first, then the side parts by name: the order the checksum covers."""
    return (["codes"] if "codes" in parts else []) + sorted(p for p in parts if p != "codes")


def _stored_names(name: str, entry: dict) -> dict:
    """part -> safetensors tensor name ("tensor" for an unquantized entry)."""
    if _is_quantized(entry):
        return {p: f"{name}.{p}" for p in entry["parts"]}
    return {"tensor": name}


def check_side(name: str, entry: dict, tensors: dict) -> None:
    """Side tensors must be finite (steps and AWQ scales also positive): a NaN step would
    otherwise turn every weight of a row into NaN without a word. And they must not imply
    weights beyond float32's range (eoq.repo.check_side)."""
    for part in _part_order(tensors):
        t = tensors[part]
        if part == "codes" or not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        if part in ("steps", "awq_scales"):
            bad |= t <= 0
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            raise FormatError(f"{name}.{part}: value {float(t.reshape(-1)[i])} at index {i} is not "
                              f"{'finite and positive' if part in ('steps', 'awq_scales') else 'finite'}")
    # Finite sides can still overflow: a step of 1e38 times a code of 100 is inf. Bound the
    # largest weight they can give (an orthonormal inverse rotation grows a value by at most
    # sqrt(block)) and refuse what float32 cannot hold; real weights are below 1e4.
    meta = entry["meta"]
    if entry["method"] == "absmax":  # at most 128 * 65504
        return
    if entry["method"] == "ecsq":
        code = max(abs(meta["offset"]), abs(meta["offset"] + (256 << meta.get("low_bits", 0)) - 1))
        if "recon" in tensors:
            code = max(code, float(tensors["recon"].abs().max()))
        scale = float(tensors["steps"].abs().max())
    else:
        code = float(tensors["codebook"].abs().max())
        scale = float(tensors["scales"].float().abs().max()) if tensors["scales"].numel() else 0.0
    bound = code * scale * math.sqrt(meta["rotation_block"])
    if "awq_scales" in tensors:
        bound /= float(tensors["awq_scales"].float().min())
    if not bound < MAX_WEIGHT:
        raise FormatError(f"{name}: its steps / scales give weights up to {bound:.3g}, beyond float32's range")


def verify_entry(name: str, entry: dict, tensors: dict, crc=crc32c) -> None:
    """Checks the stored tensors against a validated entry: every part with its dtype and
    shape, the checksum (bytes and recipe), then the side tensors' values."""
    keys = _stored_names(name, entry)
    missing = sorted(set(keys) - set(tensors))
    if missing:
        raise FormatError(f"{name}: stored parts {missing} are missing" if _is_quantized(entry) else
                          f"{name}: the tensor is missing")
    specs = entry["parts"] if _is_quantized(entry) else {"tensor": entry}
    for part in keys:
        t, spec = tensors[part], specs[part]
        what = f"{name}.{part}" if _is_quantized(entry) else name
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"{what}: not a tensor ({type(t).__name__})")
        if _dtype_name(t.dtype) != spec["dtype"] or list(t.shape) != list(spec["shape"]):
            raise FormatError(f"{what}: stored as {_dtype_name(t.dtype)} {list(t.shape)}, the manifest says "
                              f"{spec['dtype']} {spec['shape']}")
    got = entry_checksum(name, entry, tensors, crc)
    if got != entry["checksum"]:
        raise FormatError(f"{name}: checksum mismatch (the stored bytes and recipe give {got}, the manifest says "
                          f"{entry['checksum']}); the file or the manifest is damaged")
    if _is_quantized(entry):
        check_side(name, entry, {p: tensors[p] for p in keys})


def decode_codes(name: str, entry: dict, stream, decoded=None) -> torch.Tensor:
    """The entry's codes as a uint8 tensor of code_shape (decoded: an already rANS-decoded
    array). A rANS stream's declared count is checked against code_shape before decoding."""
    shape = [int(s) for s in entry["code_shape"]]
    n = math.prod(shape)
    try:
        if decoded is not None:
            codes = decoded
        elif entry.get("codec") == "rans":
            codes = rans_decode(stream, expected=n)
        elif entry.get("codec") == "packed":
            codes = unpack_bits(_tensor_bytes(stream) if isinstance(stream, torch.Tensor) else stream,
                                int(entry["code_bits"]), n)
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
    k = int(meta.get("low_bits", 0))
    if k:  # levels are hi << k | lo, the k low bits stored raw (docs/FORMAT.md)
        try:
            lo = unpack_bits(_tensor_bytes(p["low"]), k, codes.numel())
        except CorruptStreamError as e:
            raise FormatError(f"low: {e}") from e
        codes = (codes.to(torch.int32) << k) | torch.from_numpy(np.ascontiguousarray(lo)).view(codes.shape).to(torch.int32)
    if meta.get("recon"):  # fitted reconstruction points (docs/FORMAT.md): a value per code
        q = recon_table(int(meta["offset"]), p["recon"])[codes.long()]
    else:
        q = codes.float() + int(meta["offset"])
    g = rows if not meta.get("group_rows") else int(meta["group_rows"])
    per_row = p["steps"].repeat_interleave(g)[:rows].unsqueeze(1)
    return inverse_hadamard(q * per_row, int(meta["rotation_block"]), int(entry["seed"]))[:, :cols].contiguous()


def recon_table(offset: int, recon: torch.Tensor) -> torch.Tensor:
    """The value of each of the 256 codes: float(code) + offset, except the levels v = code +
    offset with 1 <= |v| <= len(recon), which are sign(v) * recon[|v| - 1]."""
    v = torch.arange(256, dtype=torch.int64) + offset
    table = torch.arange(256, dtype=torch.float32) + offset
    m = v.abs()
    fit = (m >= 1) & (m <= recon.numel())
    r = recon.float()[(m[fit] - 1)]
    table[fit] = torch.where(v[fit] < 0, -r, r)
    return table


_DEQUANTIZE = {"absmax": _absmax, "polar": _polar, "turbo": _turbo, "ecsq": _ecsq}


def dequantize_entry(name: str, entry: dict, tensors: dict, dtype=None, codes=None) -> torch.Tensor:
    """One stored parameter from its manifest entry and stored tensors, validated and verified first.

    tensors: part name -> tensor (``codes``, ``scales``, ...; ``tensor`` for a passthrough
    entry). The result equals eoq's (``QuantizedTensor.dequantize`` and the transpose back)
    bit for bit, in the entry's dtype or `dtype`. codes: the codes already rANS-decoded
    (read_folder decodes many streams together), else they are decoded here.
    """
    validate_entry(name, entry, name, stored=False)
    if entry["kind"] == "tied":
        raise FormatError(f"{name}: a tied entry stores nothing (it is {entry.get('tied_to')!r})")
    verify_entry(name, entry, tensors)
    return _dequantize(name, entry, tensors, dtype, codes)


def _dequantize(name: str, entry: dict, tensors: dict, dtype, codes) -> torch.Tensor:
    """dequantize_entry after validate_entry and verify_entry (a copy: nothing returned
    refers to the stored tensors)."""
    dtype = _dtype(dtype, "dtype") if dtype is not None else None
    if not _is_quantized(entry):
        t = tensors["tensor"]
        return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t.clone()
    out_dtype = dtype or _dtype(entry["dtype"], name)
    method = entry["method"]
    q = decode_codes(name, entry, tensors["codes"], codes)
    try:
        w = _DEQUANTIZE[method](entry, q, tensors)
        if "awq_scales" in tensors:  # AWQ scaled the input columns before quantizing
            w = w / tensors["awq_scales"].float()
        w = w.to(out_dtype)
    except (KeyError, TypeError, RuntimeError, ValueError, IndexError) as e:
        if isinstance(e, FormatError):
            raise FormatError(f"{name}: {e}") from e
        raise FormatError(f"{name}: cannot dequantize ({type(e).__name__}: {e})") from e
    if entry.get("transposed"):
        w = w.t().contiguous()
    if list(w.shape) != [int(s) for s in entry["shape"]]:
        raise FormatError(f"{name}: dequantizes to {list(w.shape)}, the manifest says {entry['shape']}")
    return w


# ---- the folder -----------------------------------------------------------------------------------


def _read_json(file: str, what: str):
    try:
        if os.path.getsize(file) > MAX_MANIFEST_BYTES:
            raise FormatError(f"{file}: more than {MAX_MANIFEST_BYTES} bytes, more than any {what}; refusing to parse")
        with open(file, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise FormatError(f"{file}: more than {MAX_MANIFEST_BYTES} bytes, more than any {what}; refusing to parse")
        return json.loads(raw)
    except (OSError, ValueError, RecursionError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{file}: unreadable or not JSON ({type(e).__name__}: {e})") from e


NEWER = "use the load_quantized.py the folder came with"  # what to do with another format version


def read_manifest(path, crc=crc32c, newer: str = NEWER) -> dict:
    """The manifest of a folder: at most 256 MB, format and version 2, every field validated,
    its own checksum checked (entries' checksums are checked against the bytes by read_folder).
    ``newer``: what the error for another format version tells the user to do."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise FormatError(f"{path}: no {MANIFEST}; not an eoq-quantized folder")
    manifest = _read_json(file, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise FormatError(f"{file}: not an eoq manifest (format {got!r}, expected {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{file}: format version {manifest.get('format_version')!r} is not supported by this "
                          f"loader (it reads version {FORMAT_VERSION}); {newer}")
    validate_manifest(manifest, file)
    got = manifest_checksum(manifest, file, crc)
    if got != manifest["checksum"]:
        raise FormatError(f"{file}: manifest checksum mismatch (its entries give {got}, it says "
                          f"{manifest['checksum']}): an entry was added, removed or changed")
    return manifest


def weight_files(path) -> dict:
    """tensor name -> safetensors file, from the shard index or the single file. Index entries
    must be plain file names in the folder (no directory part, no '..'), and present."""
    index_file = os.path.join(path, INDEX)
    if os.path.isfile(index_file):
        index = _read_json(index_file, "shard index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise FormatError(f"{index_file}: no 'weight_map' object")
        for key, file in weight_map.items():
            if not isinstance(file, str) or not FILE_NAME.match(file):
                raise FormatError(f"{index_file}: tensor {key!r} is mapped to {file!r}, which is not a plain "
                                  "*.safetensors file name in the folder")
        files = {k: os.path.join(path, v) for k, v in weight_map.items()}
        for f in sorted(set(files.values())):
            if not os.path.isfile(f):
                raise FormatError(f"{index_file} names {os.path.basename(f)}, which is missing")
        return files
    single = os.path.join(path, WEIGHTS)
    if not os.path.isfile(single):
        raise FormatError(f"{path}: neither {WEIGHTS} nor {INDEX} is present")
    return {k: single for k in read_header(single)}


def read_header(path) -> dict:
    """{key: (dtype name, shape, begin, end)} of a safetensors file, offsets absolute, every
    length checked against the file before it is trusted: the header within the file and at
    most 100 MB, every tensor inside the data section with numel * itemsize bytes, no overlaps."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise FormatError(f"{path}: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER, size - 8):
                raise FormatError(f"{path}: header length {n} exceeds the file ({size} bytes) or {MAX_HEADER}")
            raw = f.read(n)
    except (OSError, struct.error) as e:
        raise FormatError(f"{path}: unreadable ({e})") from e
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{path}: the safetensors header is not JSON ({type(e).__name__}: {e})") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object")
    start, data = 8 + n, size - 8 - n
    out, spans = {}, []
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(spec, dict) and spec.get("dtype") in ST_DTYPES and isinstance(spec.get("shape"), list)
              and len(spec["shape"]) <= MAX_DIMS and all(_is_int(s) and s >= 0 for s in spec["shape"])
              and isinstance(spec.get("data_offsets"), list) and len(spec["data_offsets"]) == 2
              and all(_is_int(v) for v in spec["data_offsets"]))
        if not ok:
            raise FormatError(f"{path}: tensor {key!r} has a malformed header entry {str(spec)[:200]}")
        dtype, shape = ST_DTYPES[spec["dtype"]], list(spec["shape"])
        b, e = spec["data_offsets"]
        itemsize = torch.empty((), dtype=_dtype(dtype, path)).element_size()
        if not 0 <= b <= e <= data or e - b != math.prod(shape) * itemsize:
            raise FormatError(f"{path}: tensor {key!r} ({spec['dtype']} {shape}) claims bytes [{b}, {e}) of a "
                              f"{data}-byte data section")
        out[key] = (dtype, shape, start + b, start + e)
        spans.append((b, e, key))
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(f"{path}: tensors {k0!r} and {k1!r} overlap")
    return out


class _Folder:
    """A folder's manifest and stored tensors, cross-checked before any byte is used: the
    stored tensors are exactly the manifest's parts and the marker, with the dtypes, shapes
    and files it gives, and nothing else (eoq.folder.Folder)."""

    def __init__(self, path, manifest=None):
        self.path = os.fspath(path)
        self.manifest = manifest if manifest is not None else read_manifest(self.path)
        self.files = weight_files(self.path)
        self.headers = {}
        self._maps = {}
        for file in sorted(set(self.files.values())):
            for key, spec in read_header(file).items():
                if self.files.get(key) != file:
                    raise FormatError(f"{file}: holds tensor {key!r}, which the shard index puts elsewhere or omits")
                self.headers[key] = (file,) + spec
        unstored = sorted(set(self.files) - set(self.headers))
        if unstored:
            raise FormatError(f"{os.path.join(self.path, INDEX)}: lists {unstored[0]!r} in "
                              f"{os.path.basename(self.files[unstored[0]])}, which does not hold it")
        self._check_keys()

    def _check_keys(self) -> None:
        tensors, marker = self.manifest["tensors"], self.manifest.get("marker")
        expected = {}
        for name, entry in tensors.items():
            if entry["kind"] == "tied":
                continue
            specs = entry["parts"] if _is_quantized(entry) else {"tensor": entry}
            for part, key in _stored_names(name, entry).items():
                expected[key] = (name, entry["file"], specs[part]["dtype"], specs[part]["shape"])
        if marker is not None:
            expected[marker] = (marker, tensors[marker]["file"], "uint8", [len(MARKER_TEXT.encode())])
        for key, (name, file, dtype, shape) in expected.items():
            if key not in self.headers:
                raise FormatError(f"{os.path.join(self.path, file)}: tensor {key!r} of {name} is missing from the "
                                  "weights")
            got_file, got_dtype, got_shape = self.headers[key][:3]
            if os.path.basename(got_file) != file:
                raise FormatError(f"{got_file}: holds {key!r}, which the manifest puts in {file}")
            if got_dtype != dtype or got_shape != list(shape):
                raise FormatError(f"{got_file}: tensor {key!r} is stored as {got_dtype} {got_shape}, the manifest "
                                  f"says {dtype} {list(shape)}")
        extra = sorted(set(self.headers) - set(expected))
        if extra:
            raise FormatError(f"{self.headers[extra[0]][0]}: holds tensor {extra[0]!r}, which the manifest does not "
                              "list" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))

    def tensor(self, key: str) -> torch.Tensor:
        """A stored tensor as a view of its file (a copy-on-write map: reading copies nothing)."""
        file, dtype, shape, b, e = self.headers[key]
        dt = _dtype(dtype, file)
        if file not in self._maps:
            try:
                with open(file, "rb") as f:
                    self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as err:
                raise FormatError(f"{file}: cannot map ({err})") from err
        m = self._maps[file]
        if len(m) < e:
            raise FormatError(f"{file}: shorter than its header says (truncated?)")
        if e == b:
            return torch.empty(shape, dtype=dt)
        size = torch.empty((), dtype=dt).element_size()
        if b % size:  # torch wants its elements aligned
            return torch.frombuffer(bytearray(m[b:e]), dtype=dt).view(shape)
        return torch.frombuffer(m, dtype=dt, count=(e - b) // size, offset=b).view(shape)

    def parts(self, name: str) -> dict:
        entry = self.manifest["tensors"][name]
        return {part: self.tensor(key) for part, key in _stored_names(name, entry).items()}

    def verify(self) -> None:
        """Every entry's checksum and side tensors, then the marker's text."""
        tensors = self.manifest["tensors"]
        for name in sorted(tensors):
            entry = tensors[name]
            if entry["kind"] == "tied":
                got = entry_checksum(name, entry, {})
                if got != entry["checksum"]:
                    raise FormatError(f"{os.path.join(self.path, MANIFEST)}: {name}: checksum mismatch ({got}, the "
                                      f"manifest says {entry['checksum']}); the manifest is damaged")
                continue
            try:
                verify_entry(name, entry, self.parts(name))
            except FormatError as e:
                raise FormatError(f"{os.path.join(self.path, entry['file'])}: {e}") from None
        marker = self.manifest.get("marker")
        if marker is not None and _tensor_bytes(self.tensor(marker)).tobytes() != MARKER_TEXT.encode():
            raise FormatError(f"{os.path.join(self.path, tensors[marker]['file'])}: the marker tensor {marker!r} "
                              "is damaged")

    def close(self) -> None:
        """Unmap the files (a view still alive keeps its map until it goes)."""
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass
        self._maps.clear()


_FOLDER_ERRORS = (KeyError, TypeError, IndexError, AttributeError, ValueError, OverflowError, RecursionError,
                  struct.error, OSError)


def read_folder(path, dtype=None, manifest=None) -> tuple:
    """(manifest, state_dict): every stored parameter, dequantized, after the whole folder has
    been checked (manifest, shard index, headers, stored tensors, every checksum and side
    tensor, the marker).

    Tied entries are left out (the model ties them); the marker tensor is ignored. rANS
    streams are decoded a few tens of millions of codes at a time, many side by side.
    """
    path = os.fspath(path)
    try:
        folder = _Folder(path, manifest)
        try:
            return _read_folder(folder, dtype)
        finally:
            folder.close()
    except FormatError:
        raise
    except _FOLDER_ERRORS as e:  # a check missed: still a bad folder, never another error type
        raise FormatError(f"{path}: unreadable folder ({type(e).__name__}: {e})") from e


def _read_folder(folder: "_Folder", dtype) -> tuple:
    folder.verify()
    path, entries = folder.path, folder.manifest["tensors"]
    state = {}
    pending, size = [], 0

    def flush():
        decoded = _decode_streams([(os.path.join(path, e["file"]) + f": {n}", t["codes"], math.prod(e["code_shape"]))
                                   for n, e, t in pending])
        for (n, e, t), codes in zip(pending, decoded):
            state[n] = _dequantize_in(folder, n, e, t, dtype, codes)
        pending.clear()

    for name in sorted(entries):
        entry = entries[name]
        if entry["kind"] == "tied":
            continue
        tensors = folder.parts(name)
        if _is_quantized(entry) and entry["codec"] == "rans":
            pending.append((name, entry, tensors))
            size += math.prod(entry["code_shape"])
            if size >= _BATCH_SYMBOLS:
                flush()
                size = 0
        else:
            state[name] = _dequantize_in(folder, name, entry, tensors, dtype, None)
    if pending:
        flush()
    return folder.manifest, {n: state[n] for n in sorted(state)}


def _dequantize_in(folder: "_Folder", name: str, entry: dict, tensors: dict, dtype, codes) -> torch.Tensor:
    try:
        return _dequantize(name, entry, tensors, dtype, codes)
    except FormatError as e:
        raise FormatError(f"{os.path.join(folder.path, entry['file'])}: {e}") from None


def _decode_streams(items) -> list:
    """rans_decode_many over (label, stream, expected count) triples, each stream's declared
    count checked before anything is allocated; a corrupt stream's error names its label."""
    try:
        return rans_decode_many([s for _, s, _ in items], [n for _, _, n in items])
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
    version = getattr(getattr(eoq, "repo", None), "FORMAT_VERSION", FORMAT_VERSION)
    if not required and version != FORMAT_VERSION:
        return None  # an eoq for another format version: this file reads the folder it came with
    if fn is None and required:
        raise ImportError(f"use_eoq=True but this eoq ({getattr(eoq, '__version__', '?')}) has no load_quantized")
    return fn


def read_config(path):
    """config.json as transformers reads it, without its quantization_config."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{os.path.join(path, 'config.json')}: unreadable ({type(e).__name__}: {e})") from e
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


def _name_map(path, keys, tensors: dict) -> dict:
    """model state_dict key -> manifest name, tolerating a base-model prefix difference
    (``model.layers.0...`` against ``layers.0...``); a key no entry covers would keep its
    random initialisation: an error (eoq.hf_quantizer does the same)."""
    out = {}
    for key in keys:
        if key in tensors:
            out[key] = key
            continue
        found = [n for n in tensors if n.endswith("." + key) or key.endswith("." + n)]
        if len(found) != 1:
            raise FormatError(f"{path}: the model's parameter {key!r} has "
                              f"{'no entry' if not found else 'several entries ' + str(found[:4])} in {MANIFEST}; "
                              "it would not be loaded from the folder")
        out[key] = found[0]
    return out


def build_model(path, state_dict: dict, manifest: dict, config=None, device="cpu"):
    """The transformers model of config.json with the weights of state_dict, in eval mode.

    Every entry of the model's state_dict must come from a manifest entry (stored, or tied to
    a stored one): nothing is left at its random initialisation, and every stored tensor
    must be used.
    """
    import transformers

    config = config if config is not None else read_config(path)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise FormatError(f"{os.path.join(path, 'config.json')}: architecture {archs[:1]} is not a transformers "
                          f"model class")
    floats = [t.dtype for t in state_dict.values() if t.is_floating_point()]
    try:
        model = _construct(cls, config, max(set(floats), key=floats.count) if floats else None)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise FormatError(f"{os.path.join(path, 'config.json')}: cannot build {archs[0]} from it "
                          f"({type(e).__name__}: {e})") from e
    entries = manifest["tensors"]
    names = _name_map(path, list(model.state_dict().keys()), entries)
    sd, used = {}, set()
    for key, name in names.items():
        entry = entries[name]
        source = entry["tied_to"] if entry["kind"] == "tied" else name
        if source not in state_dict:
            raise FormatError(f"{path}: the model's parameter {key!r} ({name}) has no stored tensor {source!r}")
        sd[key] = state_dict[source]
        used.add(source)
    unused = sorted(set(state_dict) - used)
    if unused:
        raise FormatError(f"{path}: {len(unused)} stored parameters are not in {archs[0]}: {unused[:8]}")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise FormatError(f"{path}: the folder's tensors do not fit {archs[0]} ({e})") from e
    model.tie_weights()
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
    manifest = read_manifest(path)  # a clear error before transformers meets an unknown folder
    config = read_config(path)
    manifest, state = read_folder(path, dtype=dtype or config_dtype(config), manifest=manifest)
    return build_model(path, state, manifest, config=config, device=device)


__all__ = ["load", "read_folder", "read_manifest", "validate_manifest", "validate_entry", "weight_files",
           "read_header", "entry_checksum", "manifest_checksum", "dequantize_entry", "verify_entry", "check_side",
           "decode_codes", "build_model", "read_config", "rans_decode", "rans_decode_many", "rans_parse",
           "unpack_bits", "crc32c", "crc32c_many", "inverse_hadamard", "hadamard_signs", "CorruptStreamError",
           "FormatError"]
