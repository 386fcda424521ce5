#!/usr/bin/env python3
"""Throughput and compression of eoq's kernels on the codes of a real checkpoint.

    python bench/bench_kernels.py [--quick] [--json PATH] [--threads 1,2] [--repeats N]

Symbols: the block-32 absmax codes of every Linear weight of SmolLM2-135M (210 tensors,
106M weights; --quick: the first 14 tensors, 7.1M), one buffer per setting: Q4, Q5, Q6, and
Q5 after a seeded random-sign Hadamard rotation in blocks of 128 (see eoq.demo.rotate).

For each torch thread count it times (best of --repeats):
  * eoq rANS encode / decode of the whole buffer (M symbols/s) and its size in bits/symbol,
    next to the buffer's empirical order-0 entropy;
  * baseline, same symbols, same process: htscodecs' rANS 4x16 order 0 (4-way) and order 0 |
    RANS_ORDER_X32 (32-way, SIMD chosen by htscodecs at run time), called through ctypes,
    one call per buffer (its in_size is a 32-bit unsigned int; every buffer here fits). The
    library is single-threaded, so it is timed once and compared with every thread count;
    the eoq/htscodecs ratios are against the faster htscodecs variant for each direction;
  * pack/unpack (Q4, Q5), absmax quantize/dequantize (Q5, block 32) and Hadamard (block 128)
    on the 3.5M weights of block 0 (as a [2304, 1536] matrix).
Both decoders write into an output buffer reused across calls (so neither pays for faulting
in fresh pages, which a loader writing into preallocated parameters would not either).
Every timing is the best of --repeats after one untimed warm-up call; every round trip
(eoq and htscodecs) is checked against its input.

Needs the eoq package installed (run from outside the source tree) and the gguf package;
the model is fetched on first use into $EOQ_CACHE (default ~/.cache/eoq).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import math
import os
import platform
import sys
import time

import numpy as np
import torch

from eoq import ops
from eoq.methods.rotation import choose_block
from eoq.methods.rotation import rotate as _rotate
from eoq.format.gguf_weights import linear_weights
from eoq.methods.quantized import code_entropy_bits
from eoq.testing.models import smollm2_gguf
from _report import write_json  # bench/ is on sys.path (the scripts run as files)

HTS_LIB_CANDIDATES = ("libhtscodecs.so.2", "/usr/lib/x86_64-linux-gnu/libhtscodecs.so.2", "libhtscodecs.so")
RANS_ORDER_X32 = 0x04  # <htscodecs/rANS_static4x16.h>

SETTINGS = (("Q4", 4, False), ("Q5", 5, False), ("Q6", 6, False), ("H128+Q5", 5, True))


# ---- htscodecs through ctypes ------------------------------------------------------------------


class HtsCodecs:
    def __init__(self, lib: ctypes.CDLL, path: str):
        self.path = path
        self.lib = lib
        u8p, uip = ctypes.POINTER(ctypes.c_ubyte), ctypes.POINTER(ctypes.c_uint)
        lib.rans_compress_bound_4x16.argtypes = [ctypes.c_uint, ctypes.c_int]
        lib.rans_compress_bound_4x16.restype = ctypes.c_uint
        lib.rans_compress_to_4x16.argtypes = [u8p, ctypes.c_uint, u8p, uip, ctypes.c_int]
        lib.rans_compress_to_4x16.restype = u8p
        lib.rans_uncompress_to_4x16.argtypes = [u8p, ctypes.c_uint, u8p, uip]
        lib.rans_uncompress_to_4x16.restype = u8p

    @classmethod
    def load(cls):
        for name in HTS_LIB_CANDIDATES:
            try:
                return cls(ctypes.CDLL(name), name)
            except OSError:
                continue
        found = ctypes.util.find_library("htscodecs")
        if found:
            try:
                return cls(ctypes.CDLL(found), found)
            except OSError:
                pass
        return None

    @staticmethod
    def _p(a: np.ndarray):
        return a.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte))

    def compress(self, data: np.ndarray, order: int) -> np.ndarray:
        if data.size >= 2**32:
            raise ValueError("htscodecs: buffer too large for a single call (32-bit size)")
        bound = self.lib.rans_compress_bound_4x16(data.size, order)
        out = np.empty(bound, dtype=np.uint8)
        size = ctypes.c_uint(bound)
        if not self.lib.rans_compress_to_4x16(self._p(data), data.size, self._p(out), ctypes.byref(size), order):
            raise RuntimeError(f"htscodecs rans_compress_to_4x16 failed (order {order:#x})")
        return out[: size.value]

    def uncompress(self, comp: np.ndarray, n: int, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(n, dtype=np.uint8) if out is None else out
        size = ctypes.c_uint(n)
        if not self.lib.rans_uncompress_to_4x16(self._p(comp), comp.size, self._p(out), ctypes.byref(size)):
            raise RuntimeError("htscodecs rans_uncompress_to_4x16 failed")
        if size.value != n:
            raise RuntimeError(f"htscodecs decoded {size.value} symbols, expected {n}")
        return out


# ---- helpers ---------------------------------------------------------------------------------------


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` calls after one untimed warm-up call, and the last result."""
    best, out = math.inf, fn()
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    flags = ""
                    break
            else:
                name = platform.processor()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = line.split()
                    flags = "AVX-512" if "avx512f" in fl else ("AVX2" if "avx2" in fl else "")
                    break
        return f"{name} ({os.cpu_count()} cores{', ' + flags if flags else ''})"
    except OSError:
        return platform.processor() or "unknown"


def rotate(w: torch.Tensor, seed: int) -> torch.Tensor:
    """ecsq's seeded random-sign Hadamard of the rows (blocks of up to 256, zero-padded)."""
    block, padded = choose_block(w.shape[1], 256)
    return _rotate(w, block, padded, seed)


def load_symbols(path, limit, seed):
    """Concatenated flattened codes per setting, plus a few weights for the other kernels."""
    parts = {lab: [] for lab, _, _ in SETTINGS}
    sample = []  # weights for the quantize / Hadamard timings
    count = 0
    for name, w in linear_weights(path):
        for lab, bits, rot in SETTINGS:
            x = rotate(w, seed) if rot else w
            codes, _ = ops.absmax_quantize(x, bits, 32)
            parts[lab].append(codes.reshape(-1))
        if count < 7:
            sample.append(w.reshape(-1))
        count += 1
        if limit and count >= limit:
            break
    return {lab: torch.cat(p) for lab, p in parts.items()}, torch.cat(sample), count


# ---- benchmark ---------------------------------------------------------------------------------


def bench(args) -> dict:
    torch.set_num_threads(max(args.threads))
    path = smollm2_gguf()
    t0 = time.perf_counter()
    symbols, sample, ntensors = load_symbols(path, 14 if args.quick else None, args.seed)
    print(f"# loaded {ntensors} tensors, {symbols['Q4'].numel():,} symbols per setting "
          f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)

    hts = HtsCodecs.load()
    if hts is None:
        print("# htscodecs not found (libhtscodecs.so.2): baseline skipped", file=sys.stderr)

    res = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": cpu_name(),
        "torch": torch.__version__,
        "rans_decoder": ops.rans_decoder(),
        "model": os.path.basename(os.fspath(path)),
        "tensors": ntensors,
        "quick": bool(args.quick),
        "repeats": args.repeats,
        "htscodecs": hts.path if hts else None,
        "rans": [],
        "htscodecs_runs": [],
        "kernels": [],
    }

    # htscodecs baseline (single-threaded library): once per setting
    hts_best = {}
    if hts is not None:
        for lab, _, _ in SETTINGS:
            sym = symbols[lab]
            arr = sym.numpy()
            n = arr.size
            best = {"enc": 0.0, "dec": 0.0}
            out = np.empty(n, dtype=np.uint8)  # reused, like eoq's decode buffer
            for vname, order in (("o0", 0), ("o0|X32", RANS_ORDER_X32)):
                te, comp = best_time(lambda: hts.compress(arr, order), args.repeats)
                td, dec = best_time(lambda: hts.uncompress(comp, n, out), args.repeats)
                if not np.array_equal(dec, arr):
                    raise RuntimeError(f"htscodecs {vname} round trip failed on {lab}")
                r = {"setting": lab, "variant": vname, "symbols": n, "enc_Msps": n / te / 1e6,
                     "dec_Msps": n / td / 1e6, "bits_per_symbol": 8 * comp.size / n}
                res["htscodecs_runs"].append(r)
                best["enc"] = max(best["enc"], r["enc_Msps"])
                best["dec"] = max(best["dec"], r["dec_Msps"])
                print(f"# htscodecs {lab} {vname}: enc {r['enc_Msps']:.0f} dec {r['dec_Msps']:.0f} MS/s, "
                      f"{r['bits_per_symbol']:.4f} b/s", file=sys.stderr, flush=True)
            hts_best[lab] = best

    for nt in args.threads:
        torch.set_num_threads(nt)
        for lab, _, _ in SETTINGS:
            sym = symbols[lab]
            n = sym.numel()
            te, stream = best_time(lambda: ops.rans_encode(sym), args.repeats)
            buf = torch.empty_like(sym)  # decode into a reused buffer, as htscodecs does below
            td, dec = best_time(lambda: ops.rans_decode(stream, out=buf), args.repeats)
            if not torch.equal(dec, sym):
                raise RuntimeError(f"eoq rANS round trip failed on {lab}")
            r = {"threads": nt, "setting": lab, "symbols": n, "enc_Msps": n / te / 1e6, "dec_Msps": n / td / 1e6,
                 "bits_per_symbol": 8 * stream.numel() / n, "entropy": code_entropy_bits(sym)}
            if lab in hts_best:
                r["enc_ratio"] = r["enc_Msps"] / hts_best[lab]["enc"]
                r["dec_ratio"] = r["dec_Msps"] / hts_best[lab]["dec"]
            res["rans"].append(r)
            print(f"# eoq {nt}t {lab}: enc {r['enc_Msps']:.0f} dec {r['dec_Msps']:.0f} MS/s", file=sys.stderr, flush=True)

        # other kernels
        w2 = sample.reshape(-1, 1536)  # layer-0 Linear weights (3.5M), 1536 columns
        for bits in (4, 5):
            codes = symbols[f"Q{bits}"][: sample.numel()].contiguous()
            tp, packed = best_time(lambda: ops.pack_bits(codes, bits), args.repeats)
            tu, un = best_time(lambda: ops.unpack_bits(packed, bits, codes.numel()), args.repeats)
            if not torch.equal(un, codes):
                raise RuntimeError("pack/unpack round trip failed")
            res["kernels"].append({"threads": nt, "kernel": f"pack_bits Q{bits}", "Msps": codes.numel() / tp / 1e6})
            res["kernels"].append({"threads": nt, "kernel": f"unpack_bits Q{bits}", "Msps": codes.numel() / tu / 1e6})
        tq, (c5, s5) = best_time(lambda: ops.absmax_quantize(w2, 5, 32), args.repeats)
        tdq, _ = best_time(lambda: ops.absmax_dequantize(c5, s5, 5, 32), args.repeats)
        th, _ = best_time(lambda: ops.hadamard(w2, block=128, seed=args.seed), args.repeats)
        res["kernels"].append({"threads": nt, "kernel": "absmax_quantize Q5/32", "Msps": w2.numel() / tq / 1e6})
        res["kernels"].append({"threads": nt, "kernel": "absmax_dequantize Q5/32", "Msps": w2.numel() / tdq / 1e6})
        res["kernels"].append({"threads": nt, "kernel": "hadamard block 128 (signs)", "Msps": w2.numel() / th / 1e6})
        # One pass of ecsq's rate search: the kernel against the torch ops it replaced
        step = float(w2.std()) / 4
        tk, _ = best_time(lambda: ops.code_histogram(w2, step), args.repeats)
        tr, _ = best_time(lambda: _histogram_in_torch(w2, step), args.repeats)
        res["kernels"].append({"threads": nt, "kernel": "code_histogram (rate search pass)", "Msps": w2.numel() / tk / 1e6})
        res["kernels"].append({"threads": nt, "kernel": "  the same in torch ops", "Msps": w2.numel() / tr / 1e6})
    return res


def _histogram_in_torch(x, step):
    """What ecsq measured per trial step before ops.code_histogram (tests/test_code_histogram.py)."""
    q = torch.round(x / step)
    counts = torch.bincount((q - q.min()).long().reshape(-1))
    return counts, (q * step - x).pow(2).sum(1, dtype=torch.float64)


def format_tables(res: dict) -> str:
    out = []
    hts = {(r["setting"], r["variant"]): r for r in res["htscodecs_runs"]}
    head = ["setting", "threads", "eoq enc MS/s", "eoq dec MS/s", "eoq bits/sym", "entropy bits/sym"]
    if hts:
        head += ["hts o0 enc", "hts o0 dec", "hts X32 enc", "hts X32 dec", "hts bits/sym (X32)",
                 "enc ratio eoq/hts", "dec ratio eoq/hts"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for r in res["rans"]:
        cells = [r["setting"], str(r["threads"]), f"{r['enc_Msps']:.0f}", f"{r['dec_Msps']:.0f}",
                 f"{r['bits_per_symbol']:.4f}", f"{r['entropy']:.4f}"]
        if hts:
            a, b = hts[(r["setting"], "o0")], hts[(r["setting"], "o0|X32")]
            cells += [f"{a['enc_Msps']:.0f}", f"{a['dec_Msps']:.0f}", f"{b['enc_Msps']:.0f}", f"{b['dec_Msps']:.0f}",
                      f"{b['bits_per_symbol']:.4f}", f"{r['enc_ratio']:.2f}x", f"{r['dec_ratio']:.2f}x"]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    threads = sorted({k["threads"] for k in res["kernels"]})
    names = list(dict.fromkeys(k["kernel"] for k in res["kernels"]))
    by = {(k["kernel"], k["threads"]): k["Msps"] for k in res["kernels"]}
    out.append("| kernel | " + " | ".join(f"{t} thread{'s' if t > 1 else ''} (M values/s)" for t in threads) + " |")
    out.append("|---|" + "|".join(["---:"] * len(threads)) + "|")
    for n in names:
        out.append(f"| {n} | " + " | ".join(f"{by[(n, t)]:.0f}" for t in threads) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="first 14 tensors only, 2 repeats")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON to PATH")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=None, help="best of N (default 5, --quick 2)")
    p.add_argument("--seed", type=int, default=1234, help="Hadamard sign seed")
    args = p.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5

    res = bench(args)
    print(f"eoq kernels - {res['date']} - {res['machine']} - torch {res['torch']} - "
          f"rANS decoder {res['rans_decoder']} - {res['model']}, {res['tensors']} Linear weights, "
          f"{res['rans'][0]['symbols']:,} symbols per setting - best of {res['repeats']}")
    if res["htscodecs"] is None:
        print("htscodecs baseline skipped: library not found")
    print()
    print(format_tables(res))
    if args.json:
        write_json(args.json, res, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
