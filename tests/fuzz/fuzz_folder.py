"""Coverage-guided fuzzing (atheris / libFuzzer) of the quantized-folder reader,
``eoq.read_state_dict(folder)``: the manifest, the safetensors files and the shard index.

    python tests/fuzz/fuzz_folder.py [--keep-going] [--findings=DIR] [--mem-mb=N] -runs=N -seed=S [CORPUS_DIR]

Once, at start: tiny models are converted into base folders (under /dev/shm):
  llama          Llama (tied embedding and head), ecsq entries (rANS), absmax entries from
                 protect rules, a protected passthrough weight, passthrough norms and small
                 weights; one model.safetensors.
  llama-sharded  the same model, codec "packed" where it can be, three shards and an index.
  gpt2           GPT-2: Conv1D weights (``transposed``), ecsq and absmax, tied head.
and each one's original state dict is kept (``read_state_dict`` of the untouched folder).

Every execution: the input drives a FuzzedDataProvider that picks a base and 1..3 mutations,
writes the mutated copy into a scratch folder on tmpfs and calls ``eoq.read_state_dict`` on it.
Mutations (structure-aware):
  entry     a field of one manifest entry (any depth: offset, seed, shape, qshape, code_shape,
            code_bits, group_rows, rotation_block, padded_cols, parts shapes and dtypes, codec,
            method, kind, dtype, checksum, transposed, tied_to, ...): deleted, set to a boundary
            value (huge, negative, float, NaN, inf, strings, lists, dicts, null, bools),
            tweaked (+-1, x2, reversed or refactored shapes, ...), retyped, or copied from
            the same field of another entry;
  manifest  entries deleted, duplicated, renamed or swapped; kinds and tied_to changed;
            top-level fields;
  header    a safetensors header, parsed and rewritten: dtype, shape, data_offsets of a tensor
            (shifted, swapped with another tensor's, out of the file, reversed), tensors
            deleted or renamed, metadata, the header length;
  bytes     safetensors bytes: bit flips in the header and the payload, truncation, extension;
  index     the shard index (created when the base has none): paths like ../x, absolute paths,
            a symlink out of the folder, missing or directory shards, a broken weight_map;
  raw       manifest text bit flips and truncation; files deleted or replaced by directories.

Oracle: ``read_state_dict`` must raise eoq.FormatError (or eoq.CorruptStreamError), or return
exactly the original tensors (every name, dtype, shape and bit). Findings:
  exception            any other exception (key: type and the eoq line that raised it),
                       MemoryError included: the address space is capped (--mem-mb)
  silent wrong output  a successful load with different values, dtypes, shapes or names
  path escape          a successful load that read a tensor through an index path (or a
                       symlink) leading out of the folder
  slow                 an execution over --slow seconds (libFuzzer's -timeout catches hangs)
Each new finding is re-run with each of its mutations alone, and reported with the single
mutation that reproduces it when there is one; the reproducer folder is saved beside it
(``eoq.read_state_dict(FINDINGS/<name>.folder)`` reproduces it without the fuzzer).
"""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import shutil
import struct
import sys
import tempfile
import time

import atheris

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import fuzzlib  # noqa: E402

MANIFEST = "quant_manifest.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

INTS = [0, 1, -1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 4095, 4096,
        65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -2**63, 10**18, 10**30]
FLOATS = [0.0, -0.0, 0.5, 1.5, 64.0, 1e308, float("nan"), float("inf"), float("-inf"), 1e-300]
STRS = ["", "x", "rans", "packed", "raw", "ecsq", "absmax", "polar", "turbo", "float32", "bfloat16", "float16",
        "uint8", "int8", "int64", "float64", "bool", "complex64", "float8_e4m3fn", "qint8", "Tensor", "dtype",
        "__class__", "crc32:00000000", "crc32:", "../x", "/etc/passwd", "tied", "passthrough", "quantized",
        "protected", "model.embed_tokens.weight", "lm_head.weight"]
OTHERS = [None, True, False, [], {}, [0], [1], [-1], [2**40, 2**40], [1, 1, 1], [[64]], {"shape": [1]},
          ["64", "64"], [64.0, 128.0], [1e308], [0, 64], [64, 0]]
ST_DTYPES = ["U8", "I8", "F16", "BF16", "F32", "F64", "I64", "I32", "U16", "BOOL", "F8_E4M3", "C64", "XX", ""]
KINDS = ["quantized", "protected", "passthrough", "tied", "", "other"]


# ---- choices that can be replayed ------------------------------------------------------------


class Chooser:
    """The fuzzer's choices for one mutation, logged so that the mutation can be applied again
    alone (to find which mutation of several causes a finding)."""

    def __init__(self, fdp=None, log=None):
        self.fdp = fdp
        self.log = [] if log is None else log
        self.replay = log is not None
        self.pos = 0

    def int(self, lo: int, hi: int) -> int:
        if hi < lo:
            hi = lo
        if self.replay:
            v = self.log[self.pos] if self.pos < len(self.log) else lo
            self.pos += 1
            return min(max(int(v), lo), hi) if not isinstance(v, bytes) else lo
        v = self.fdp.ConsumeIntInRange(lo, hi)
        self.log.append(v)
        return v

    def bool(self) -> bool:
        return bool(self.int(0, 1))

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def bytes(self, n: int) -> bytes:
        if self.replay:
            v = self.log[self.pos] if self.pos < len(self.log) else b""
            self.pos += 1
            return v if isinstance(v, bytes) else b""
        v = self.fdp.ConsumeBytes(n)
        self.log.append(v)
        return v


# ---- a folder in memory ----------------------------------------------------------------------


def st_split(raw: bytes):
    """(header dict, data bytes) of a safetensors file, or None when it does not parse."""
    if len(raw) < 8:
        return None
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        return None
    try:
        h = json.loads(raw[8:8 + n])
    except ValueError:
        return None
    return (h, raw[8 + n:]) if isinstance(h, dict) else None


def st_join(header: dict, data: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + data


class Base:
    def __init__(self, name: str, folder: pathlib.Path, read_state_dict):
        self.name = name
        self.folder = folder
        self.files = {p.name: p.read_bytes() for p in folder.iterdir()
                      if p.is_file() and (p.suffix == ".safetensors" or p.name in (MANIFEST, INDEX))}
        self.manifest = json.loads(self.files[MANIFEST])
        self.index = json.loads(self.files[INDEX]) if INDEX in self.files else None
        self.shards = sorted(f for f in self.files if f.endswith(".safetensors"))
        self.state = read_state_dict(folder)
        self.names = sorted(self.manifest["tensors"])
        self.where = {}  # safetensors key -> shard
        for f in self.shards:
            for k in st_split(self.files[f])[0]:
                if k != "__metadata__":
                    self.where[k] = f
        from safetensors import safe_open

        self.tensors = {}  # safetensors key -> the original stored tensor (for forged checksums)
        for f in self.shards:
            with safe_open(str(folder / f), "pt") as h:
                for k in h.keys():
                    self.tensors[k] = h.get_tensor(k)
        self.needed = set()  # keys read_state_dict reads
        for n, e in self.manifest["tensors"].items():
            if e["kind"] == "tied":
                continue
            self.needed |= {f"{n}.{p}" for p in e["parts"]} if "method" in e else {n}


class State:
    def __init__(self, base: Base):
        self.base = base
        self.manifest = copy.deepcopy(base.manifest)
        self.files: dict[str, object] = dict(base.files)   # name -> bytes, or "DIR" / ("LINK", target)
        self.index = copy.deepcopy(base.index)
        self.index_raw = None
        self.manifest_ops: list = []   # raw manifest text mutations, applied at write time
        self.escapes: dict = {}        # key -> the index value that sends it out of the folder
        self.outside: dict[str, bytes] = {}
        self.forged = False


# ---- mutations -----------------------------------------------------------------------------


def paths_of(value, prefix=(), depth=0):
    """Every path (tuple of keys / indices) inside a JSON value, shallow first."""
    out = []
    if depth > 4:
        return out
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(paths_of(v, prefix + (k,), depth + 1))
    return out


def get_path(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def generic(path) -> str:
    return ".".join("#" if isinstance(k, int) else str(k) for k in path)


def interesting(ch: Chooser, names):
    group = ch.int(0, 4)
    if group == 0:
        return ch.pick(INTS), "int"
    if group == 1:
        return ch.pick(FLOATS), "float"
    if group == 2:
        return ch.pick(STRS), "str"
    if group == 3:
        return copy.deepcopy(ch.pick(OTHERS)), "other"
    return ch.pick(names), "name"


def tweak(ch: Chooser, v):
    if isinstance(v, bool):
        return (not v), "negate"
    if isinstance(v, int):
        ops = [v + 1, v - 1, v * 2, v // 2, -v, v + 2**32, v * 3, v ^ 1]
        i = ch.int(0, len(ops) - 1)
        return ops[i], ["+1", "-1", "x2", "/2", "neg", "+2^32", "x3", "^1"][i]
    if isinstance(v, float):
        ops = [v * 2, v + 0.5, -v, float("nan"), v / 3]
        i = ch.int(0, len(ops) - 1)
        return ops[i], ["x2", "+0.5", "neg", "nan", "/3"][i]
    if isinstance(v, str):
        ops = ["", v + "x", v.upper(), v[:-1], v + "/../" + v, " " + v]
        i = ch.int(0, len(ops) - 1)
        return ops[i], ["empty", "+x", "upper", "chop", "dotdot", "space"][i]
    if isinstance(v, list):
        i = ch.int(0, 6)
        if i == 0:
            return v[::-1], "reverse"
        if i == 1:
            return v + [1], "append 1"
        if i == 2:
            return v[:-1], "drop last"
        if i == 3:
            return [1] + v, "prepend 1"
        if i == 4 and len(v) >= 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v[:2]):
            f = ch.pick([2, 4, 32])
            return [v[0] * f, v[1] // f] + v[2:] if v[1] % f == 0 else [v[0] // f, v[1] * f] + v[2:], "refactor"
        if i == 5 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return [math.prod(v)] if v else [0], "flatten"
        return v + v, "double"
    if isinstance(v, dict):
        keys = sorted(v)
        if keys and ch.bool():
            k = ch.pick(keys)
            w = dict(v)
            del w[k]
            return w, f"drop {k}"
        return {**v, "extra": 1}, "add key"
    return 0, "zero"


def retype(ch: Chooser, v):
    i = ch.int(0, 4)
    if i == 0:
        return str(v), "to str"
    if i == 1 and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v) if isinstance(v, int) else int(v) if math.isfinite(v) else 0, "int<->float"
    if i == 2:
        return [v], "to list"
    if i == 3:
        return {"value": v}, "to dict"
    return (list(v.values()) if isinstance(v, dict) else None), "to list/null"


def set_path(obj, path, value, delete=False):
    parent = get_path(obj, path[:-1])
    k = path[-1]
    if delete:
        del parent[k]
    else:
        parent[k] = value


def op_entry(st: State, ch: Chooser) -> str:
    tensors = st.manifest.get("tensors")
    if not isinstance(tensors, dict) or not tensors:
        return "entry: none"
    names = sorted(tensors)
    name = ch.pick(names)
    entry = tensors[name]
    if not isinstance(entry, dict):
        return "entry: not a dict"
    paths = paths_of(entry)
    if not paths:
        return "entry: empty"
    path = ch.pick(paths)
    label = f"entry[{entry.get('kind')}{'/' + str(entry['method']) if 'method' in entry else ''}].{generic(path)}"
    cur = get_path(entry, path)
    action = ch.int(0, 9)
    if action == 0:
        set_path(entry, path, None, delete=True)
        return f"{label}: delete"
    if action <= 3:
        v, cls = interesting(ch, names)
        set_path(entry, path, v)
        return f"{label}: set {cls} {v!r}"[:200]
    if action <= 6:
        v, how = tweak(ch, cur)
        set_path(entry, path, v)
        return f"{label}: {how}"
    if action <= 7:
        v, how = retype(ch, cur)
        set_path(entry, path, v)
        return f"{label}: {how}"
    # the same field of another entry
    donors = [n for n in names if n != name and isinstance(tensors[n], dict)]
    for _ in range(4):
        if not donors:
            break
        other = tensors[ch.pick(donors)]
        try:
            v = get_path(other, path)
        except (KeyError, IndexError, TypeError):
            continue
        set_path(entry, path, copy.deepcopy(v))
        return f"{label}: from another entry"
    return f"{label}: no donor"


def op_manifest(st: State, ch: Chooser) -> str:
    m = st.manifest
    tensors = m.get("tensors")
    names = sorted(tensors) if isinstance(tensors, dict) else []
    action = ch.int(0, 9)
    if action == 0 and names:
        n = ch.pick(names)
        kind = tensors[n].get("kind") if isinstance(tensors[n], dict) else None
        del tensors[n]
        return f"manifest: delete an entry ({kind})"
    if action == 1 and names:  # swap two entries
        a, b = ch.pick(names), ch.pick(names)
        tensors[a], tensors[b] = tensors[b], tensors[a]
        return "manifest: swap two entries"
    if action == 2 and names:  # an entry under another name (a stored key, a tied name, nonsense)
        n = ch.pick(names)
        new = ch.pick(sorted(st.base.where) + names + ["", "x", "../x", n + ".codes"])
        tensors[new] = copy.deepcopy(tensors[n])
        if ch.bool():
            del tensors[n]
            return "manifest: rename an entry"
        return "manifest: duplicate an entry"
    if action == 3 and names:
        n = ch.pick(names)
        if isinstance(tensors[n], dict):
            tensors[n]["kind"] = ch.pick(KINDS)
            return "manifest: change kind"
    if action == 4 and names:
        n = ch.pick(names)
        if isinstance(tensors[n], dict):
            tensors[n]["kind"] = "tied"
            tensors[n]["tied_to"] = ch.pick(names + ["nowhere"])
            return "manifest: make an entry tied"
    if action == 5:
        m["format_version"] = ch.pick([0, 2, "1", 1.0, True, None, 1])
        return "manifest: format_version"
    if action == 6:
        m["tensors"] = ch.pick([[], None, "x", {}, list(names)])
        return "manifest: tensors table retyped"
    if action == 7:
        m["format"] = ch.pick(["", "EOQ", None, 1])
        return "manifest: format"
    if action == 8 and names:
        n = ch.pick(names)
        tensors[n] = ch.pick([None, [], "x", 1, {}])
        return "manifest: entry retyped"
    top = sorted(m)
    k = ch.pick(top) if top else None
    if k is not None:
        del m[k]
    return f"manifest: delete top-level {k}"


def op_header(st: State, ch: Chooser) -> str:
    shards = st.base.shards
    f = ch.pick(shards)
    raw = st.files.get(f)
    parsed = st_split(raw) if isinstance(raw, (bytes, bytearray)) else None
    if parsed is None:
        return "header: unparseable"
    h, data = parsed
    keys = sorted(k for k in h if k != "__metadata__")
    if not keys:
        return "header: no tensors"
    key = ch.pick(keys)
    t = h[key]
    action = ch.int(0, 9)
    label = f"safetensors header[{'codes' if key.endswith('.codes') else key.rsplit('.', 1)[-1]}]"
    if action == 0:
        t["dtype"] = ch.pick(ST_DTYPES)
        what = f"{label}.dtype={t['dtype']}"
    elif action == 1:
        v, how = tweak(ch, t.get("shape", []))
        t["shape"] = v
        what = f"{label}.shape: {how}"
    elif action == 2:
        t["shape"] = ch.pick([[], [0], [2**40], [-1], [2**62, 4], [1, 1], [2**32 + 1]])
        what = f"{label}.shape: boundary"
    elif action == 3:
        lo, hi = t["data_offsets"]
        d = ch.pick([1, 2, 4, 8, -1, -2, -8, 4096])
        t["data_offsets"] = ch.pick([[lo + d, hi + d], [lo, hi + d], [lo + d, hi], [hi, lo]])
        what = f"{label}.data_offsets: shifted/reversed"
    elif action == 4:
        t["data_offsets"] = ch.pick([[0, len(data) + 8], [len(data), len(data) + 1], [0, 2**63], [-8, 0],
                                     [0.5, 8], None, [0, 0]])
        what = f"{label}.data_offsets: boundary"
    elif action == 5:  # swap the data of two tensors
        other = h[ch.pick(keys)]
        t["data_offsets"], other["data_offsets"] = other["data_offsets"], t["data_offsets"]
        what = f"{label}.data_offsets: swapped with another tensor's"
    elif action == 6:
        del h[key]
        what = f"{label}: deleted"
    elif action == 7:
        h[ch.pick(keys + ["x", key + "x"])] = h.pop(key)
        what = f"{label}: renamed"
    elif action == 8:
        h["__metadata__"] = ch.pick([{"format": "np"}, {}, None, {"format": 1}, "x"])
        what = "safetensors header: __metadata__"
    else:
        raw2 = st_join(h, data)
        n = ch.pick([0, 1, 7, len(raw2), 2**63, 2**64 - 1, 100_000_000])
        st.files[f] = n.to_bytes(8, "little") + raw2[8:]
        return "safetensors header length field"
    st.files[f] = st_join(h, data)
    return what


def op_bytes(st: State, ch: Chooser) -> str:
    f = ch.pick(st.base.shards)
    raw = st.files.get(f)
    if not isinstance(raw, (bytes, bytearray)) or not raw:
        return "bytes: not a file"
    raw = bytearray(raw)
    hlen = min(len(raw), 8 + int.from_bytes(raw[:8], "little"))
    action = ch.int(0, 4)
    if action == 0:
        p = ch.int(0, max(hlen - 1, 0))
        raw[p] ^= 1 << ch.int(0, 7)
        what = "safetensors bytes: bit flip in the header"
    elif action == 1 and len(raw) > hlen:
        p = ch.int(hlen, len(raw) - 1)
        raw[p] ^= 1 << ch.int(0, 7)
        what = "safetensors bytes: bit flip in the data"
    elif action == 2:
        p = ch.int(0, len(raw) - 1)
        raw[p] = ch.int(0, 255)
        what = "safetensors bytes: byte set"
    elif action == 3:
        del raw[ch.int(0, len(raw) - 1):]
        what = "safetensors bytes: truncated"
    else:
        raw += ch.bytes(ch.int(1, 64)) or b"\0"
        what = "safetensors bytes: extended"
    st.files[f] = bytes(raw)
    return what


def op_index(st: State, ch: Chooser, scratch: pathlib.Path) -> str:
    base = st.base
    if st.index is None:
        st.index = {"metadata": {}, "weight_map": {k: SINGLE for k in sorted(base.where)}}
    wm = st.index.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        return "index: no weight_map"
    key = ch.pick(sorted(wm))
    shard = base.where.get(key, base.shards[0])
    action = ch.int(0, 12)
    outside = scratch / "outside.safetensors"
    if action == 0:
        wm[key] = st.escapes[key] = "../outside.safetensors"
        st.outside[shard] = base.files[shard]
        return "index: ../outside.safetensors (a copy of the shard, outside the folder)"
    if action == 1:
        wm[key] = st.escapes[key] = str(outside)
        st.outside[shard] = base.files[shard]
        return "index: absolute path to a copy of the shard outside the folder"
    if action == 2:
        wm[key] = st.escapes[key] = "link.safetensors"
        st.files["link.safetensors"] = ("LINK", str(outside))
        st.outside[shard] = base.files[shard]
        return "index: a symlink in the folder to a copy outside"
    if action == 3:
        wm[key] = ch.pick(["/etc/passwd", "/dev/null", "/proc/self/status", "/"])
        return "index: an absolute system path"
    if action == 4:
        wm[key] = ch.pick(["", ".", "..", "./", "missing.safetensors"])
        return "index: empty, dot or missing"
    if action == 5:
        wm[key] = ch.pick(base.shards)
        return "index: another shard"
    if action == 6:
        wm[key] = "sub/../" + shard
        return "index: sub/../shard (inside)"
    if action == 7:
        del wm[key]
        return "index: key removed"
    if action == 8:
        wm[key] = ch.pick([None, 1, ["x"], {"a": 1}])
        return "index: value retyped"
    if action == 9:
        st.index["weight_map"] = ch.pick([None, [], "x", {}])
        return "index: weight_map retyped"
    if action == 10:
        wm["extra.weight"] = ch.pick(["../../etc/passwd", "/etc/passwd", "nope.safetensors"])
        return "index: an extra key with a bad path"
    if action == 11:
        st.index_raw = ch.pick([b"", b"[]", b"{", b"null", b'{"weight_map": 1}', b"\xff\xfe"])
        return "index: not a valid index file"
    wm[key] = shard + "/"
    return "index: trailing slash"


def op_raw(st: State, ch: Chooser) -> str:
    action = ch.int(0, 5)
    if action == 0:
        st.manifest_ops.append(("flip", ch.int(0, 1 << 20), ch.int(0, 7)))
        return "manifest text: bit flip"
    if action == 1:
        st.manifest_ops.append(("truncate", ch.int(0, 1 << 20)))
        return "manifest text: truncated"
    if action == 2:
        st.files[MANIFEST + ".del"] = None
        return "file: manifest deleted"
    if action == 3:
        f = ch.pick(st.base.shards)
        st.files[f] = None
        return "file: a shard deleted"
    if action == 4:
        f = ch.pick(st.base.shards)
        st.files[f] = "DIR"
        return "file: a shard replaced by a directory"
    f = ch.pick(st.base.shards)
    st.files[f] = b""
    return "file: a shard emptied"


CATEGORIES = [("entry", op_entry)] * 5 + [("manifest", op_manifest), ("header", op_header),
                                         ("bytes", op_bytes), ("index", None), ("raw", op_raw)]


def apply(st: State, cat: int, ch: Chooser, scratch: pathlib.Path) -> str:
    name, fn = CATEGORIES[cat]
    try:
        return op_index(st, ch, scratch) if name == "index" else fn(st, ch)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
        # an earlier mutation left nothing this one applies to (e.g. data_offsets deleted)
        return f"{name}: not applicable ({type(e).__name__})"


def forge(st: State, repo, entries: bool) -> bool:
    """Recompute the checksums a mutated manifest carries (every entry's from the original
    stored bytes and its mutated recipe when `entries`, then the manifest's own) with eoq's
    own functions: a folder whose author wrote consistent lies. Its checksums then hold, so
    the mutation reaches the reader's validation instead of stopping at a checksum. False
    when this eoq has no such checksums."""
    if not (hasattr(repo, "entry_checksum") and hasattr(repo, "manifest_checksum")):
        return False
    tensors = st.manifest.get("tensors")
    if not isinstance(tensors, dict):
        return False
    if entries:
        for name, e in tensors.items():
            if not isinstance(e, dict):
                continue
            try:
                if e.get("kind") == "tied":
                    crc = 0
                else:
                    keys = repo.stored_keys(name, e)
                    order = repo.part_order(keys) if repo.is_quantized(e) else ["tensor"]
                    crc = repo.data_crc([st.base.tensors[keys[p]] for p in order])
                e["checksum"] = repo.entry_checksum(name, e, crc)
            except Exception:  # noqa: BLE001  (fields a checksum cannot cover: left as they are)
                pass
    try:
        st.manifest["checksum"] = repo.manifest_checksum(st.manifest)
    except Exception:  # noqa: BLE001
        pass
    return True


def write(st: State, work: pathlib.Path, scratch: pathlib.Path) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    text = json.dumps(st.manifest).encode()
    for op in st.manifest_ops:
        if op[0] == "flip" and text:
            b = bytearray(text)
            b[op[1] % len(b)] ^= 1 << op[2]
            text = bytes(b)
        elif op[0] == "truncate":
            text = text[:op[1] % (len(text) + 1)]
    files = dict(st.files)
    files[MANIFEST] = None if (MANIFEST + ".del") in files else text
    files.pop(MANIFEST + ".del", None)
    if st.index_raw is not None:
        files[INDEX] = st.index_raw
    elif st.index is not None:
        files[INDEX] = json.dumps(st.index).encode()
    for shard, raw in st.outside.items():
        (scratch / "outside.safetensors").write_bytes(raw)
    for f, v in files.items():
        if v is None:
            continue
        p = work / f
        if v == "DIR":
            p.mkdir()
        elif isinstance(v, tuple):
            p.symlink_to(v[1])
        else:
            p.write_bytes(v)


# ---- the target --------------------------------------------------------------------------------


def build_bases(root: pathlib.Path, eoq, torch):
    import transformers as tf

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)).to(torch.bfloat16)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=64,
                                            bos_token_id=1, eos_token_id=2)).to(torch.bfloat16)
    with torch.no_grad():
        for n, p in gpt2.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    llama.save_pretrained(str(root / "src-llama"))
    gpt2.save_pretrained(str(root / "src-gpt2"))
    rules = [eoq.ProtectRule("mlp.up_proj", regex=True, action="quantize", method="absmax", bits=4),
             eoq.ProtectRule("mlp.gate_proj", regex=True, action="quantize", method="absmax", bits=3),
             eoq.ProtectRule("self_attn.o_proj", regex=True, action="passthrough"),
             eoq.ProtectRule("mlp.down_proj", regex=True, action="quantize", method="ecsq", bits=10)]  # low bits
    common = dict(method="ecsq", bits=8, calibration=None, awq=False)  # room for the 10-bit rule
    specs = [("llama", "src-llama", eoq.QuantConfig(protect=rules, **common)),
             ("llama-sharded", "src-llama", eoq.QuantConfig(protect=rules, codec="packed", max_shard_size=20_000,
                                                            **common)),
             ("gpt2", "src-gpt2", eoq.QuantConfig(
                 protect=[eoq.ProtectRule("mlp.c_proj", regex=True, action="quantize", method="absmax", bits=4)],
                 **common))]
    bases = []
    for name, src, cfg in specs:
        out = root / name
        eoq.quantize_model(root / src, out, cfg, progress=False, verbose=False)
        bases.append(Base(name, out, eoq.read_state_dict))
    return bases


def same_bytes(a, b) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().contiguous().reshape(-1), b.detach().contiguous().reshape(-1)
    return a.numel() == 0 or bool((a.view(dtype=torch.uint8) == b.view(dtype=torch.uint8)).all())


def compare(base: Base, got) -> str | None:
    if not isinstance(got, dict):
        return f"returned a {type(got).__name__}"
    missing = sorted(set(base.state) - set(got))
    extra = sorted(set(got) - set(base.state))
    if missing:
        return f"tensors missing: {missing[:4]}"
    if extra:
        return f"extra tensors: {extra[:4]}"
    for n, t in base.state.items():
        g = got[n]
        if not hasattr(g, "dtype") or g.dtype != t.dtype:
            return f"{n}: dtype {getattr(g, 'dtype', type(g))} instead of {t.dtype}"
        if g.shape != t.shape:
            return f"{n}: shape {list(g.shape)} instead of {list(t.shape)}"
        if not same_bytes(g, t):
            return f"{n}: different values"
    return None


def consistent(manifest: dict, got) -> str | None:
    """Whether a load agrees with the manifest it came from: one tensor per stored entry,
    with the entry's shape and dtype."""
    tensors = manifest["tensors"]
    want = {n for n, e in tensors.items() if e["kind"] != "tied"}
    if set(got) != want:
        return f"names {sorted(set(got) ^ want)[:4]} differ from the manifest's stored entries"
    for n, t in got.items():
        e = tensors[n]
        if list(t.shape) != list(e["shape"]) or str(t.dtype).removeprefix("torch.") != e["dtype"]:
            return f"{n}: {t.dtype} {list(t.shape)} but the manifest says {e['dtype']} {e['shape']}"
    return None


def out_of_memory(e: BaseException) -> bool:
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, MemoryError) or "can't allocate memory" in str(e) or "not enough memory" in str(e):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def main(argv):
    opts = fuzzlib.Options(argv)
    with atheris.instrument_imports(include=["eoq"]):
        import eoq
        import eoq.load.loader  # noqa: F401
        import eoq.methods  # noqa: F401
        import eoq.format.repo  # noqa: F401
    import torch

    torch.set_num_threads(1)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="eoq-fuzz-folder-", dir=shm))
    t0 = time.time()
    bases = build_bases(scratch / "bases", eoq, torch)
    rec = fuzzlib.Recorder("fuzz_folder", opts)
    feedback = fuzzlib.Feedback(atheris)
    rec.notes.append(f"bases built in {time.time() - t0:.1f} s under {scratch}: "
                     + ", ".join(f"{b.name} ({len(b.names)} entries, {len(b.shards)} shard(s))" for b in bases))
    rec.notes.append(f"memory cap: {fuzzlib.cap_memory(opts.mem_mb)}")
    rec.at_exit.append(lambda: shutil.rmtree(scratch, ignore_errors=True))
    work = scratch / "work"
    allowed = (eoq.FormatError, eoq.CorruptStreamError)

    def mutate(base: Base, ops: list, fdp=None):
        """A copy of base with the ops applied: replayed from [(category, log)], or drawn from
        fdp (appending to ops). The last "op" is the forging choice."""
        st = State(base)
        labels = []
        if fdp is not None:
            for _ in range(fdp.ConsumeIntInRange(1, 3)):
                cat = fdp.ConsumeIntInRange(0, len(CATEGORIES) - 1)
                ch = Chooser(fdp)
                labels.append(apply(st, cat, ch, scratch))
                ops.append((cat, ch.log))
            ops.append((-1, [fdp.ConsumeIntInRange(0, 3)]))
        else:
            labels = [apply(st, cat, Chooser(log=list(log)), scratch) for cat, log in ops if cat >= 0]
        how = ops[-1][1][0] if ops and ops[-1][0] == -1 else 0
        st.forged = how >= 2 and forge(st, eoq.format.repo, entries=how == 3)
        if st.forged:
            labels.append("forged checksums" if how == 3 else "forged manifest checksum")
        return st, labels

    def run(base: Base, ops: list):
        st, labels = mutate(base, ops)
        return load(st), labels

    def load(st: State):
        write(st, work, scratch)
        t = time.time()
        try:
            got = eoq.read_state_dict(work)
        except allowed as e:
            if out_of_memory(e):  # a memory bomb turned into a FormatError is still one
                return ("exception", e, time.time() - t)
            return ("rejected", e, time.time() - t)
        except Exception as e:  # noqa: BLE001  (MemoryError included)
            return ("exception", e, time.time() - t)
        dt = time.time() - t
        if st.forged:  # consistent lies may load other values, but never other names, shapes or dtypes
            why = consistent(st.manifest, got)
            if why is None and compare(st.base, got) is not None:
                return ("forged-other", None, dt)
        else:
            why = compare(st.base, got)
        if why is not None:
            return ("silent", why, dt)
        wm = st.index.get("weight_map") if isinstance(st.index, dict) and st.index_raw is None else None
        used = {k for k, v in st.escapes.items()  # (a later mutation may have overwritten the path)
                if k in st.base.needed and isinstance(wm, dict) and wm.get(k) == v}
        if used:
            return ("escape", f"read {sorted(used)[0]} through a path out of the folder", dt)
        return ("same", None, dt)

    def key_of(res) -> str:
        kind, detail, _ = res
        if kind == "exception":
            return ("out of memory: " if out_of_memory(detail) else "") + \
                f"{type(detail).__name__} at {fuzzlib.where(detail)}"
        return kind

    def save_folder(st_ops, base):
        def save(stem: pathlib.Path):
            st = State(base)
            for cat, log in st_ops:
                apply(st, cat, Chooser(log=list(log)), scratch)
            dest = stem.with_suffix(".folder")
            if dest.exists():
                shutil.rmtree(dest)
            write(st, dest, scratch)
            return str(dest)
        return save

    def target(data: bytes):
        rec.begin()
        rec.execs += 1
        fdp = atheris.FuzzedDataProvider(data)
        base = bases[fdp.ConsumeIntInRange(0, len(bases) - 1)]
        ops: list = []
        st, labels = mutate(base, ops, fdp)
        res = load(st)
        kind, detail, dt = res
        rec.timed(dt, "read_state_dict", data, {"mutation": labels, "base": base.name})
        if kind == "rejected":
            t = f"{type(detail).__name__}: {fuzzlib.template(str(detail))}"
            rec.outcome(t)
            feedback(t)
            return
        if kind in ("same", "forged-other"):
            rec.outcome("loaded: identical tensors" if kind == "same" else
                        "loaded: other values from a forged (self-consistent) folder")
            feedback(kind)
            return
        feedback(key_of(res))
        # Which mutation alone (with the same forging) reproduces it?
        single = None
        real = [op for op in ops if op[0] >= 0]
        if len(real) > 1:
            for op in real:
                r1, l1 = run(base, [op, ops[-1]])
                if key_of(r1) == key_of(res):
                    single = " + ".join(l1)
                    break
        info = {"base": base.name, "mutation": single or " + ".join(labels), "all_mutations": labels,
                "call": "eoq.read_state_dict(folder)"}
        saver = save_folder(ops, base)
        if kind == "exception":
            rec.exception(detail, data, info, save=saver,
                          kind="out of memory" if out_of_memory(detail) else "exception")
        else:
            what = fuzzlib.template(single) if single else " + ".join(sorted({fuzzlib.template(x) for x in labels}))
            kname = "silent wrong output" if kind == "silent" else "path escape"
            rec.finding(kname, what, data, {"message": detail, **info}, save=saver)

    atheris.Setup(opts.libfuzzer, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
