"""Coverage-guided fuzzing (atheris / libFuzzer) of the EOQR rANS decoder and of unpack_bits.

    python tests/fuzz/fuzz_rans.py [--keep-going] [--findings=DIR] -runs=N -seed=S [CORPUS_DIR]

Every input is one of three things, chosen by its first byte:

  raw         (byte0 % 8 in 0, 1): the rest of the input is the stream. The seed corpus
              (tests/fuzz/make_corpus.py) holds the valid streams below in this form.
  structured  (2..6): the rest drives a FuzzedDataProvider that picks one of the valid seed
              streams below (known symbols, several chunks of 65536+ symbols, alphabets 1..256,
              scale_bits 10..15, chunk-boundary and one-symbol-last-chunk cases) and applies
              1..4 mutations: bit flips, byte sets, header fields (every field, the frequency
              table, the chunk index, the header crc) set to boundary values, truncation,
              extension, deletion, insertion, copies; then optionally repairs the header CRC
              and the chunk sizes so that the mutation reaches the chunk decoder instead of
              the header checks. ``expected=`` (when rans_decode takes it) and ``out=`` vary.
  unpack_bits (7): packed bytes (from pack_bits of fuzzer codes, then mutated, or raw) with a
              bit width and a count near or far from the right ones.

Oracle. Anything but a result or a ValueError (eoq.CorruptStreamError is one) is a finding,
as is a crash, an ASan report, a hang (-timeout) or a memory bomb (-rss_limit_mb /
-malloc_limit_mb; without ASan the address space is capped). A result is checked:
rans_info must accept what rans_decode accepts, with the same symbol count (and ``expected``
when given); a structured input that decodes must give the seed's original symbols; any
other decoded output (raw inputs, or a structured one whose output differs) must be what an
independent Python decoder (tests/rans_reference.py plus every header rule of
docs/FORMAT.md and the chunk CRC32Cs) gets from a stream it finds valid: otherwise it is a
"silent wrong output". unpack_bits: a result has n codes below 2^bits that pack_bits packs
back to exactly the input bytes.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import struct
import sys
import time

import atheris

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import fuzzlib  # noqa: E402

ALLOC_CAP = 1 << 24  # raw inputs: expected= bounds what a header may claim

# ---- seeds ----------------------------------------------------------------------------------


def seed_specs():
    """(name, symbols as numpy uint8, scale_bits, chunk_size): the valid streams mutated."""
    import numpy as np

    rng = np.random.default_rng(20240611)
    geo = np.minimum(rng.geometric(0.5, 131_072) - 1, 255).astype(np.uint8)
    geo[1000] = 255  # alphabet 256
    runs = np.where(rng.random(300_000) < 0.93, 0, rng.integers(1, 64, 300_000)).astype(np.uint8)
    runs[-1] = 63  # alphabet 64 (the small-alphabet table)
    return [
        ("normal16-2chunks", np.clip(np.rint(rng.normal(8, 3, 70_000)), 0, 15).astype(np.uint8), 12, 1 << 16),
        ("binary-3chunks", (rng.random(140_000) < 0.1).astype(np.uint8), 11, 1 << 16),
        ("geometric256-exact2chunks", geo, 15, 1 << 16),
        ("uniform256-tiny", rng.integers(0, 256, 100).astype(np.uint8), 10, 1 << 16),
        ("one-symbol", np.full(1000, 3, np.uint8), 12, 1 << 16),
        ("empty", np.zeros(0, np.uint8), 12, 1 << 16),
        ("uniform7-lastchunk1", rng.integers(0, 7, 65_537).astype(np.uint8), 13, 1 << 16),
        ("runs64-chunk256k", runs, 14, 1 << 18),
    ]


def seed_streams(ops, torch):
    out = []
    for name, sym, scale, chunk in seed_specs():
        t = torch.from_numpy(sym.copy())
        s = ops.rans_encode(t, scale_bits=scale, chunk_size=chunk)
        out.append((name, t, bytes(s.numpy().tobytes())))
    return out


# ---- an independent check of a decoded stream -----------------------------------------------

_CRC_TABLE = []
for _b in range(256):
    _c = _b
    for _ in range(8):
        _c = (_c >> 1) ^ (0x82F63B78 if _c & 1 else 0)
    _CRC_TABLE.append(_c)


def crc32c_py(data: bytes) -> int:
    crc = 0xFFFFFFFF
    tab = _CRC_TABLE
    for b in data:
        crc = tab[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def reference_check(stream: bytes, decoded: bytes):
    """None when docs/FORMAT.md says the stream is valid and it decodes to `decoded`; else why not."""
    import rans_reference as ref

    if len(stream) < 30 or stream[:4] != b"EOQR" or stream[4] != 1 or stream[6] != 32 or stream[7] != 0:
        return "fixed header fields"
    scale = stream[5]
    n, chunk, nc, a = struct.unpack_from("<QIIH", stream, 8)
    if not 10 <= scale <= 15 or not (65536 <= chunk <= 1048576 and chunk % 32 == 0):
        return "scale_bits / chunk_size"
    if nc != -(-n // chunk) or a > 256 or (a == 0) != (n == 0):
        return "n_chunks / alphabet"
    pos = 26 + 2 * a + 8 * nc
    if len(stream) < pos + 4:
        return "header longer than the stream"
    freq = struct.unpack_from(f"<{a}H", stream, 26)
    if a and (sum(freq) != 1 << scale or freq[-1] == 0):
        return "frequency table"
    if struct.unpack_from("<I", stream, pos)[0] != crc32c_py(stream[:pos]):
        return "header crc"
    index = [struct.unpack_from("<II", stream, 26 + 2 * a + 8 * c) for c in range(nc)]
    if any(b < 128 or b % 2 for b, _ in index) or pos + 4 + sum(b for b, _ in index) != len(stream):
        return "chunk sizes"
    try:
        want = ref.decode(stream)
    except (AssertionError, IndexError, struct.error) as e:
        return f"reference decoder rejects it ({type(e).__name__} {e})"
    if want != decoded:
        return "reference decoder gives other symbols"
    for c, (_, crc) in enumerate(index):
        if crc32c_py(want[c * chunk:(c + 1) * chunk]) != crc:
            return f"chunk {c} crc"
    return None


# ---- mutations --------------------------------------------------------------------------------

INTERESTING = [0, 1, 2, 3, 7, 8, 9, 10, 15, 16, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257,
               0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x10001, 0x10020, 0x40000, 0xFFFE0, 0x100000, 0x100020,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, (1 << 32) + 1, 1 << 40, 1 << 62,
               (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


class Layout:
    """Byte ranges of a stream's header fields (from the unmutated seed)."""

    def __init__(self, s: bytes):
        self.a = struct.unpack_from("<H", s, 24)[0]
        self.nc = struct.unpack_from("<I", s, 20)[0]
        self.fields = [("magic", 0, 4), ("version", 4, 1), ("scale_bits", 5, 1), ("lanes", 6, 1),
                       ("flags", 7, 1), ("n_symbols", 8, 8), ("chunk_size", 16, 4), ("n_chunks", 20, 4),
                       ("alphabet", 24, 2)]
        self.freq_at = 26
        self.index_at = 26 + 2 * self.a
        self.crc_at = self.index_at + 8 * self.nc
        self.payload_at = self.crc_at + 4


def current_layout(s: bytearray):
    """(alphabet, n_chunks, crc offset) the stream's own (possibly mutated) header gives, or None."""
    if len(s) < 26:
        return None
    a = struct.unpack_from("<H", s, 24)[0]
    nc = struct.unpack_from("<I", s, 20)[0]
    crc_at = 26 + 2 * min(a, 4096) + 8 * nc
    if a > 4096 or crc_at + 4 > len(s):
        return None
    return a, nc, crc_at


def fix_header_crc(s: bytearray) -> bool:
    lay = current_layout(s)
    if lay is None:
        return False
    struct.pack_into("<I", s, lay[2], crc32c_py(bytes(s[:lay[2]])))
    return True


def fix_chunk_size(s: bytearray, which: int) -> bool:
    """Make chunk `which` (of the stream's own index) absorb the difference between the
    stream's length and what its header adds up to."""
    lay = current_layout(s)
    if lay is None or lay[1] == 0:
        return False
    a, nc, crc_at = lay
    c = which % nc
    sizes = [struct.unpack_from("<I", s, 26 + 2 * a + 8 * k)[0] for k in range(nc)]
    new = len(s) - (crc_at + 4) - (sum(sizes) - sizes[c])
    if not 0 <= new < 1 << 32:
        return False
    struct.pack_into("<I", s, 26 + 2 * a + 8 * c, new)
    return True


def pick_value(fdp, width: int, cur: int) -> int:
    k = fdp.ConsumeIntInRange(0, len(INTERESTING) + 1)
    if k < len(INTERESTING):
        v = INTERESTING[k]
    elif k == len(INTERESTING):
        v = cur + fdp.ConsumeIntInRange(-4, 4)
    else:
        v = fdp.ConsumeIntInRange(0, (1 << (8 * width)) - 1)
    return v & ((1 << (8 * width)) - 1)


def put(s: bytearray, at: int, width: int, v: int) -> None:
    if at + width <= len(s):
        s[at:at + width] = v.to_bytes(width, "little")


def get(s: bytearray, at: int, width: int) -> int:
    return int.from_bytes(s[at:at + width], "little") if at + width <= len(s) else 0


def mutate(fdp, seeds) -> tuple[int, bytearray, list[str]]:
    si = fdp.ConsumeIntInRange(0, len(seeds) - 1)
    name, _, base = seeds[si]
    s = bytearray(base)
    lay = Layout(base)
    ops_done = [name]
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        op = fdp.ConsumeIntInRange(0, 11)
        n = len(s)
        if op == 0 and n:  # bit flip, anywhere
            p = fdp.ConsumeIntInRange(0, n - 1)
            s[p] ^= 1 << fdp.ConsumeIntInRange(0, 7)
            ops_done.append(f"flip@{p}")
        elif op == 1 and n:  # bit flip in the header or the first payload bytes
            p = fdp.ConsumeIntInRange(0, min(n, lay.payload_at + 160) - 1)
            s[p] ^= 1 << fdp.ConsumeIntInRange(0, 7)
            ops_done.append(f"flip@{p}")
        elif op == 2 and n:
            p = fdp.ConsumeIntInRange(0, n - 1)
            s[p] = fdp.ConsumeInt(1) & 0xFF
            ops_done.append(f"set@{p}")
        elif op == 3:  # a fixed header field
            fname, at, w = lay.fields[fdp.ConsumeIntInRange(0, len(lay.fields) - 1)]
            put(s, at, w, pick_value(fdp, w, get(s, at, w)))
            ops_done.append(f"field:{fname}")
        elif op == 4 and lay.a:  # a frequency
            i = fdp.ConsumeIntInRange(0, lay.a - 1)
            at = lay.freq_at + 2 * i
            put(s, at, 2, pick_value(fdp, 2, get(s, at, 2)))
            if fdp.ConsumeBool():  # keep the sum: take it from another symbol
                j = fdp.ConsumeIntInRange(0, lay.a - 1)
                put(s, lay.freq_at + 2 * j, 2, (get(s, lay.freq_at + 2 * j, 2) - 1) & 0xFFFF)
                put(s, at, 2, (get(s, at, 2) + 1) & 0xFFFF)
            ops_done.append(f"freq[{i}]")
        elif op == 5 and lay.nc:  # the chunk index
            c = fdp.ConsumeIntInRange(0, lay.nc - 1)
            at = lay.index_at + 8 * c + 4 * fdp.ConsumeIntInRange(0, 1)
            put(s, at, 4, pick_value(fdp, 4, get(s, at, 4)))
            ops_done.append(f"index[{c}]")
        elif op == 6:
            cut = fdp.ConsumeIntInRange(0, n)
            del s[cut:]
            ops_done.append(f"truncate:{cut}")
        elif op == 7:
            extra = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
            s += extra or b"\0"
            ops_done.append("append")
        elif op == 8 and n:
            p = fdp.ConsumeIntInRange(0, n - 1)
            k = fdp.ConsumeIntInRange(1, 64)
            del s[p:p + k]
            ops_done.append(f"delete@{p}+{k}")
        elif op == 9:
            p = fdp.ConsumeIntInRange(0, n)
            s[p:p] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 32)) or b"\0"
            ops_done.append(f"insert@{p}")
        elif op == 10 and n > 2:  # copy a range over another (e.g. one chunk's words over another's)
            src = fdp.ConsumeIntInRange(0, n - 1)
            dst = fdp.ConsumeIntInRange(0, n - 1)
            k = fdp.ConsumeIntInRange(1, 256)
            piece = s[src:src + k]
            s[dst:dst + len(piece)] = piece
            del s[n:]
            ops_done.append(f"copy@{src}->{dst}+{k}")
        elif op == 11 and lay.nc and len(s) >= lay.payload_at + 128:  # an initial state of chunk 0
            j = fdp.ConsumeIntInRange(0, 31)
            at = lay.payload_at + 4 * j
            put(s, at, 4, pick_value(fdp, 4, get(s, at, 4)))
            ops_done.append(f"state[{j}]")
    fix = fdp.ConsumeIntInRange(0, 3)
    if fix >= 2 and fix_chunk_size(s, fdp.ConsumeIntInRange(0, 1 << 16) if fix == 3 else -1):
        ops_done.append("fix:chunk-size")
    if fix >= 1 and fix_header_crc(s):
        ops_done.append("fix:header-crc")
    return si, s, ops_done


# ---- the target --------------------------------------------------------------------------------


def main(argv):
    opts = fuzzlib.Options(argv)
    with atheris.instrument_imports(include=["eoq"]):
        import eoq  # noqa: F401
        from eoq import ops
    import torch

    torch.set_num_threads(1)
    try:
        decoder = ops.rans_decoder()
    except ValueError as e:  # EOQ_RANS_DECODER names one this CPU lacks: nothing to fuzz
        print(f"fuzz_rans: skipped ({e})", file=sys.stderr)
        return
    rec = fuzzlib.Recorder(f"fuzz_rans-{decoder}", opts)
    feedback = fuzzlib.Feedback(atheris)
    seeds = seed_streams(ops, torch)
    has_expected = "expected" in inspect.signature(ops.rans_decode).parameters
    rec.notes.append(f"decoder {decoder}; rans_decode {'takes' if has_expected else 'lacks'} expected=; "
                     f"memory cap: {fuzzlib.cap_memory(opts.mem_mb)}")
    u8 = torch.uint8

    def tensor(b: bytes):
        return torch.frombuffer(bytearray(b), dtype=u8) if b else torch.empty(0, dtype=u8)

    def check_rans(data: bytes, stream: bytes, original, kw: dict, what: str, tag: str):
        """tag ("raw", "seed3", ...) separates the coverage feedback of the input kinds."""
        t = tensor(stream)
        info = info_err = out = dec_err = None
        try:
            info = ops.rans_info(t)
        except ValueError as e:
            info_err = e
        except Exception as e:  # noqa: BLE001
            rec.exception(e, data, {"call": "ops.rans_info(stream)", "mutation": what})
            return
        t0 = time.time()
        try:
            out = ops.rans_decode(t, **kw)
        except ValueError as e:
            dec_err = e
        except Exception as e:  # noqa: BLE001
            rec.exception(e, data, {"call": f"ops.rans_decode(stream, {kw_text(kw)})", "mutation": what})
            return
        rec.timed(time.time() - t0, "rans_decode", data, {"mutation": what})
        call = f"ops.rans_decode(stream, {kw_text(kw)})"
        if dec_err is not None:
            kind = f"{type(dec_err).__name__}: {fuzzlib.template(str(dec_err))}"
            rec.outcome(("rejected " if info_err is None else "rejected by header: ") + kind)
            feedback(f"{tag}:{kind}")
            return
        feedback(f"{tag}:decoded")
        if info_err is not None:
            rec.finding("inconsistent", "rans_info rejects a stream rans_decode accepts", data,
                        {"call": call, "mutation": what, "message": str(info_err)})
            return
        if out.numel() != info["n_symbols"] or ("expected" in kw and kw["expected"] is not None
                                                 and out.numel() != kw["expected"]):
            rec.finding("silent wrong output", "decoded length differs from the header / expected", data,
                        {"call": call, "mutation": what,
                         "message": f"{out.numel()} symbols, header {info['n_symbols']}, {kw_text(kw)}"})
            return
        if kw.get("out") is not None and out.data_ptr() != kw["out"].data_ptr():
            rec.finding("inconsistent", "out= given but another tensor returned", data,
                        {"call": call, "mutation": what, "message": ""})
            return
        if original is not None and torch.equal(out, original):
            rec.outcome("decoded: the original symbols")
            return
        got = bytes(out.numpy().tobytes())
        why = reference_check(stream, got)
        if why is not None:
            rec.finding("silent wrong output", "decodes to symbols the reference decoder does not accept", data,
                        {"call": call, "mutation": what,
                         "message": f"{out.numel()} symbols decoded; reference: {why}"})
            return
        rec.outcome("decoded: a valid stream" + (" (other than the seed)" if original is not None else ""))

    def check_unpack(data: bytes, fdp):
        bits = fdp.ConsumeIntInRange(0, 9)
        k = min(max(bits, 1), 8)
        if fdp.ConsumeBool():
            codes = bytes(b & ((1 << k) - 1) for b in fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096)))
            packed = bytearray(ops.pack_bits(tensor(codes), k).numpy().tobytes())
            n = len(codes)
            m = fdp.ConsumeIntInRange(0, 4)
            if m == 1 and packed:
                packed[fdp.ConsumeIntInRange(0, len(packed) - 1)] ^= 1 << fdp.ConsumeIntInRange(0, 7)
            elif m == 2:
                del packed[fdp.ConsumeIntInRange(0, len(packed)):]
            elif m == 3:
                packed += fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 4)) or b"\1"
            elif m == 4:
                n += fdp.ConsumeIntInRange(-9, 9)
        else:
            packed = bytearray(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096)))
            choice = fdp.ConsumeIntInRange(0, 3)
            n = ((len(packed) * 8) // k + fdp.ConsumeIntInRange(-8, 1) if choice < 3
                 else INTERESTING[fdp.ConsumeIntInRange(0, len(INTERESTING) - 1)] * (1 if fdp.ConsumeBool() else -1))
        call = f"ops.unpack_bits(packed[{len(packed)}], bits={bits}, n={n})"
        try:
            out = ops.unpack_bits(tensor(bytes(packed)), bits, n)
        except ValueError as e:
            kind = f"unpack_bits {type(e).__name__}: {fuzzlib.template(str(e))}"
            rec.outcome("rejected " + kind)
            feedback(kind)
            return
        except Exception as e:  # noqa: BLE001
            rec.exception(e, data, {"call": call, "mutation": "unpack_bits input"})
            return
        feedback("unpacked")
        ok = (out.dtype == u8 and out.dim() == 1 and out.numel() == n and 1 <= bits <= 8
              and (n == 0 or int(out.max()) < 1 << bits)
              and bytes(ops.pack_bits(out, bits).numpy().tobytes()) == bytes(packed))
        if not ok:
            rec.finding("silent wrong output", "unpack_bits result does not pack back to its input", data,
                        {"call": call, "mutation": "unpack_bits input", "message": f"{out.numel()} codes"})
            return
        rec.outcome("unpack_bits: exact round trip")

    def target(data: bytes):
        rec.begin()
        rec.execs += 1
        if not data:
            return
        mode = data[0] % 8
        if mode <= 1:  # raw
            stream = data[1:]
            kw = {}
            if has_expected and len(stream) >= 16:
                n = int.from_bytes(stream[8:16], "little")
                kw["expected"] = n if n <= ALLOC_CAP else ALLOC_CAP
            check_rans(data, stream, None, kw, "raw bytes", "raw")
            return
        fdp = atheris.FuzzedDataProvider(data[1:])
        if mode == 7:
            check_unpack(data, fdp)
            return
        si, s, what = mutate(fdp, seeds)
        original = seeds[si][1]
        kw = {}
        e = fdp.ConsumeIntInRange(0, 3)
        if has_expected and e in (1, 2):
            kw["expected"] = original.numel()
        elif has_expected and e == 3:
            kw["expected"] = INTERESTING[fdp.ConsumeIntInRange(0, len(INTERESTING) - 1)]
        o = fdp.ConsumeIntInRange(0, 7)
        if o <= 1 and original.numel() <= ALLOC_CAP:
            kw["out"] = torch.empty(original.numel() + o, dtype=u8)
        check_rans(data, bytes(s), original, kw, " ".join(what), f"seed{si}")

    atheris.Setup(opts.libfuzzer, target)
    atheris.Fuzz()


def kw_text(kw: dict) -> str:
    return ", ".join(f"{k}=" + (f"<tensor[{v.numel()}]>" if k == "out" else repr(v)) for k, v in kw.items())


if __name__ == "__main__":
    main(sys.argv)
