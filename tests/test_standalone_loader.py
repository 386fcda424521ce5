"""The stand-alone loader (python/eoq/standalone/load_quantized.py, copied into every quantized
folder): its pure numpy/torch path must give eoq's results bit for bit, and reject what eoq rejects
(repo format 2, docs/FORMAT.md: "What a reader checks, before decoding anything").

The file is not a module of the eoq package, so it is imported by path.
"""

import importlib.util
import json
import math
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import eoq
from eoq import ops

LOADER = pathlib.Path(__file__).resolve().parents[1] / "python" / "eoq" / "standalone" / "load_quantized.py"


@pytest.fixture(scope="module")
def lq():
    spec = importlib.util.spec_from_file_location("eoq_standalone_load_quantized", LOADER)
    module = importlib.util.module_from_spec(spec)
    before, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # standalone/ holds the file alone
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = before
    return module


def u8(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.uint8))  # a copy: frombuffer arrays are read-only


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def crc32c_bytes(data: bytes, value: int = 0) -> int:
    return ops.crc32c(u8(np.frombuffer(data, np.uint8)), value) if data else value


def checksum(name: str, entry: dict, tensors: dict) -> str:
    """An entry's checksum as docs/FORMAT.md defines it (written here from the text, with eoq's
    C++ CRC-32C): the stored tensors' bytes (codes, then the other parts by name; the tensor
    itself; nothing for a tied entry), continued over the canonical JSON of [name, the entry
    without its checksum]."""
    crc = 0
    if entry["kind"] != "tied":
        order = ["codes"] + sorted(p for p in entry["parts"] if p != "codes") if "method" in entry else ["tensor"]
        for part in order:
            crc = ops.crc32c_tensor(tensors[part].contiguous(), crc)
    return f"crc32c:{crc32c_bytes(canonical([name, {k: v for k, v in entry.items() if k != 'checksum'}]), crc):08x}"


def manifest_checksum(manifest: dict) -> str:
    listing = {"marker": manifest.get("marker"),
               "tensors": {n: e.get("checksum") for n, e in manifest["tensors"].items()}}
    return f"crc32c:{crc32c_bytes(canonical(listing)):08x}"


def make_entry(qt, codec: str, dtype: torch.dtype, transposed: bool = False, name: str = "w"):
    """(manifest entry, parts) for a QuantizedTensor, as docs/FORMAT.md describes them."""
    parts = {"codes": qt.code_stream(codec), **{k: v.contiguous() for k, v in qt.side.items()}}
    rows, cols = qt.shape
    entry = {
        "kind": "quantized", "method": qt.method, "bits": qt.bits, "block_size": qt.block_size, "seed": qt.seed,
        "shape": [cols, rows] if transposed else [rows, cols], "dtype": dtype_name(dtype), "transposed": transposed,
        "qshape": [rows, cols], "code_shape": list(qt.codes.shape), "code_bits": qt.code_bits, "codec": codec,
        "parts": {k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for k, t in parts.items()},
        "meta": json.loads(json.dumps(qt.meta)),  # as a manifest gives it back
        "stored_bytes": sum(t.numel() * t.element_size() for t in parts.values()),
    }
    entry["checksum"] = checksum(name, entry, parts)
    return entry, parts


def skewed(n: int, alphabet: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if alphabet == 1:
        return np.zeros(n, np.uint8)
    x = np.clip(np.rint(rng.normal(alphabet / 2, alphabet / 6, n)), 0, alphabet - 1).astype(np.uint8)
    if n:
        x[rng.integers(0, n)] = alphabet - 1  # the top symbol present: the alphabet is exact
    return x


# ---- CRC-32C, packed bits, Hadamard ----------------------------------------------------------------


def test_crc32c_matches_eoq(lq):
    assert lq.crc32c(b"123456789") == 0xE3069283
    rng = np.random.default_rng(0)
    sizes = [0, 1, 3, 4, 5, 2047, 2048, 2049, 2050, 5000, 300_001, 300_002]
    arrays = [rng.integers(0, 256, n).astype(np.uint8) for n in sizes]
    expected = [ops.crc32c(u8(a)) for a in arrays]
    assert lq.crc32c_many(arrays) == expected
    assert [lq.crc32c(a) for a in arrays] == expected
    # continued from a previous value, as the entry checksums need: crc(b, crc(a)) == crc(a + b)
    values = [0, 1, 0xFFFFFFFF, 0x1234ABCD] * 3
    assert lq.crc32c_many(arrays, values) == [ops.crc32c(u8(a), v) for a, v in zip(arrays, values)]
    whole = rng.integers(0, 256, 1_000_003).astype(np.uint8)
    for cut in [0, 3, 2049, 500_001, whole.size]:
        assert lq.crc32c(whole[cut:], lq.crc32c(whole[:cut])) == ops.crc32c(u8(whole))
    # tensors of any dtype: their bytes
    t = torch.randn(3, 7).to(torch.bfloat16)
    assert lq.crc32c(t, 5) == ops.crc32c_tensor(t, 5)


def test_crc32c_long_input_in_pieces(lq, monkeypatch):
    """Long inputs go through in pieces (bounded scratch memory), chained by the continued value."""
    data = np.random.default_rng(1).integers(0, 256, 3 * (1 << 16) + 77).astype(np.uint8)
    expected = ops.crc32c(u8(data), 99)
    monkeypatch.setattr(lq, "_CRC_PIECE", 1 << 16)
    assert lq.crc32c(data, 99) == expected


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_unpack_bits_matches_eoq(lq, bits, n):
    codes = np.random.default_rng(n * 10 + bits).integers(0, 1 << bits, n).astype(np.uint8)
    packed = ops.pack_bits(u8(codes), bits)
    assert np.array_equal(lq.unpack_bits(packed, bits, n), codes)


def test_unpack_bits_rejects_bad_length_and_padding(lq):
    packed = ops.pack_bits(u8(np.full(5, 3, np.uint8)), 3).numpy()  # 15 bits: one padding bit
    with pytest.raises(ValueError, match="bytes"):
        lq.unpack_bits(packed[:-1], 3, 5)
    bad = packed.copy()
    bad[-1] |= 0x80
    with pytest.raises(ValueError, match="padding"):
        lq.unpack_bits(bad, 3, 5)


@pytest.mark.parametrize("block", [16, 32, 128, 512])
@pytest.mark.parametrize("seed", [None, 0, 7, 2**64 - 1])
def test_inverse_hadamard_matches_eoq(lq, block, seed):
    x = torch.randn(9, 3 * block, generator=torch.Generator().manual_seed(block)) * 3
    ours = lq.inverse_hadamard(x, block, seed)
    assert torch.equal(ours, ops.hadamard(x, block=block, seed=seed, inverse=True))
    if seed is not None:
        assert torch.equal(lq.hadamard_signs(block, seed), ops.hadamard_signs(block, seed))


# ---- rANS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alphabet", [1, 2, 32, 256])
@pytest.mark.parametrize("n,chunk", [(0, 1 << 18), (1, 1 << 18), (31, 1 << 16), (32, 1 << 16), (33, 1 << 16),
                                     (1000, 1 << 18), (70_001, 1 << 16), (200_000, 1 << 16)])
def test_rans_decode_matches_eoq(lq, alphabet, n, chunk):
    x = skewed(n, alphabet, seed=n + alphabet)
    stream = ops.rans_encode(u8(x), chunk_size=chunk)
    ours = lq.rans_decode(stream)
    assert ours.dtype == np.uint8
    assert np.array_equal(ours, ops.rans_decode(stream).numpy())
    assert np.array_equal(ours, x)


def test_rans_decode_many_streams_together(lq):
    """Streams of different lengths, chunk sizes and scale_bits, decoded side by side."""
    specs = [(150_000, 16, 10, 1 << 16), (0, 1, 12, 1 << 18), (65_536, 256, 15, 1 << 16), (33, 3, 12, 1 << 16),
             (300_000, 40, 12, 1 << 18)]
    xs = [skewed(n, a, seed=i) for i, (n, a, _, _) in enumerate(specs)]
    streams = [ops.rans_encode(u8(x), scale_bits=sb, chunk_size=c) for x, (_, _, sb, c) in zip(xs, specs)]
    for x, y in zip(xs, lq.rans_decode_many(streams)):
        assert np.array_equal(x, y)


def _corruptions(stream: bytes):
    """(what, corrupted stream): truncations, extra bytes, and single flipped bytes everywhere."""
    n = len(stream)
    yield "empty", b""
    yield "magic only", stream[:4]
    yield "cut in header", stream[:20]
    yield "cut by one", stream[:-1]
    yield "cut in half", stream[: n // 2]
    yield "extra byte", stream + b"\0"
    rng = np.random.default_rng(5)
    for pos in [0, 4, 5, 6, 7, 8, 16, 20, 24, 26, 40] + sorted(rng.integers(0, n, 40).tolist()) + [n - 1]:
        b = bytearray(stream)
        b[pos] ^= 1 << int(rng.integers(0, 8))
        yield f"flip at {pos}", bytes(b)


def test_rans_rejects_corrupt_streams_like_eoq(lq):
    x = skewed(140_000, 20, seed=3)  # three chunks of 64Ki
    stream = ops.rans_encode(u8(x), chunk_size=1 << 16).numpy().tobytes()
    for what, bad in _corruptions(stream):
        with pytest.raises(ValueError):
            ops.rans_decode(u8(np.frombuffer(bad, np.uint8)))
        with pytest.raises(ValueError):
            lq.rans_decode(bad)
        with pytest.raises(lq.CorruptStreamError):
            lq.rans_decode_many([stream, bad])


def test_rans_checks_each_chunk(lq):
    x = skewed(70_000, 20, seed=4)  # two chunks of 64Ki, alphabet 20
    good = ops.rans_encode(u8(x), chunk_size=1 << 16).numpy().tobytes()
    index = 26 + 2 * 20
    header = index + 8 * 2 + 4
    # A wrong symbol checksum for chunk 1 under a valid header checksum: only the CRC32C of
    # the decoded symbols can tell.
    s = bytearray(good)
    s[index + 8 + 4] ^= 0x01
    s[header - 4:header] = ops.crc32c(u8(np.frombuffer(bytes(s[:header - 4]), np.uint8))).to_bytes(4, "little")
    with pytest.raises(ValueError, match="chunk 1 of 2: checksum of decoded symbols mismatch"):
        lq.rans_decode(bytes(s))
    # An initial state below 2^16.
    s = bytearray(good)
    s[header + 2:header + 4] = b"\0\0"
    with pytest.raises(ValueError, match="chunk 0 of 2: initial state below"):
        lq.rans_decode(bytes(s))
    # Two payload words of chunk 0 swapped: the symbols, word count or final states go wrong.
    s = bytearray(good)
    w = header + 4 * 32 + 100
    s[w:w + 2], s[w + 2:w + 4] = s[w + 2:w + 4], s[w:w + 2]
    with pytest.raises(ValueError, match="chunk 0 of 2"):
        lq.rans_decode(bytes(s))


# ---- dequantization, method by method --------------------------------------------------------------

CASES = [
    ("absmax", 2, {}), ("absmax", 4, {}), ("absmax", 8, {}),
    ("polar", 2, {}), ("polar", 4, {}), ("polar", 4, {"random_signs": False}),
    ("turbo", 3, {"group": "block"}), ("turbo", 3, {"group": "row"}),
    ("ecsq", 2.5, {}), ("ecsq", 4, {}),
    ("ecsq", 2.5, {"group_rows": 16}), ("ecsq", 4, {"group_rows": 16}),  # 24 rows: groups of 16 and 8
]


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, torch.randint(0, cols, (3,), generator=g)] *= 8  # outlier columns, as in real layers
    return w


@pytest.mark.parametrize("cols", [576, 100, 1536])
@pytest.mark.parametrize("method,bits,options", CASES, ids=[f"{m}{b}{''.join(o)}" for m, b, o in CASES])
def test_dequantize_entry_is_bit_identical(lq, method, bits, options, cols):
    w = _weight(24, cols, seed=cols)
    if "group_rows" in options and cols != 100:
        # eoq's rate search over per-group steps takes seconds on the wide weights: a given
        # slope gives each group its own step at once (the loader sees the same kind of entry).
        options = dict(options, lam=1e-5)
    qt = eoq.quantize_tensor(w, method, bits, seed=11, **options)
    for codec in ("rans", "packed"):
        for dtype in (torch.float32, torch.bfloat16):
            entry, parts = make_entry(qt, codec, dtype)
            got = lq.dequantize_entry("w", entry, parts)
            assert got.dtype == dtype and torch.equal(got, qt.dequantize(dtype)), (codec, dtype)
    entry, parts = make_entry(qt, "rans", torch.bfloat16, transposed=True)  # a GPT-2 Conv1D weight
    assert torch.equal(lq.dequantize_entry("w", entry, parts), qt.dequantize(torch.bfloat16).t())


@pytest.mark.parametrize("cols", [576, 100])
@pytest.mark.parametrize("method,bits,options", [
    ("ecsq", 2.5, {}), ("ecsq", 4, {}),
    ("ecsq", 4, {"group_rows": 8, "step": 0.02}),  # a given step: a rate search per group and alpha is slow
    ("absmax", 4, {}), ("turbo", 3, {})])
def test_dequantize_entry_with_awq(lq, method, bits, options, cols):
    w = _weight(32, cols, seed=cols + 1)
    importance = torch.rand(cols, generator=torch.Generator().manual_seed(2)) ** 4 * 10
    qt = eoq.quantize_tensor(w, method, bits, importance=importance, awq=True, seed=3, awq_none=False, **options)
    assert "awq_scales" in qt.side
    for dtype in (torch.float32, torch.bfloat16):
        entry, parts = make_entry(qt, "rans", dtype)
        assert torch.equal(lq.dequantize_entry("w", entry, parts), qt.dequantize(dtype))
        entry, parts = make_entry(qt, "packed", dtype, transposed=True)
        assert torch.equal(lq.dequantize_entry("w", entry, parts), qt.dequantize(dtype).t())


def test_dequantize_entry_rejects_damage(lq):
    qt = eoq.quantize_tensor(_weight(16, 256, 0), "ecsq", 3)
    entry, parts = make_entry(qt, "rans", torch.float32, name="layer.weight")
    assert torch.equal(lq.dequantize_entry("layer.weight", entry, parts), qt.dequantize(torch.float32))
    bad = dict(parts, steps=parts["steps"] * 2)
    with pytest.raises(lq.FormatError, match=r"layer\.weight.*checksum mismatch"):
        lq.dequantize_entry("layer.weight", entry, bad)
    with pytest.raises(lq.FormatError, match="checksum mismatch"):  # the checksum covers the name
        lq.dequantize_entry("other.weight", entry, parts)
    with pytest.raises(lq.FormatError, match=r"layer\.weight\.steps.*manifest says"):
        lq.dequantize_entry("layer.weight", entry, dict(parts, steps=parts["steps"].double()))
    with pytest.raises(lq.FormatError, match="missing"):
        lq.dequantize_entry("layer.weight", entry, {"codes": parts["codes"]})
    with pytest.raises(lq.FormatError, match=r"layer\.weight.*checksum is missing"):
        lq.dequantize_entry("layer.weight", {k: v for k, v in entry.items() if k != "checksum"}, parts)
    old_style = dict(entry, checksum="crc32:0123abcd")  # format 1's zlib CRC
    with pytest.raises(lq.FormatError, match=r"layer\.weight.*checksum is missing or malformed"):
        lq.dequantize_entry("layer.weight", old_style, parts)
    codes = parts["codes"].clone()
    codes[-3] ^= 0x10
    damaged = dict(entry)
    damaged["checksum"] = checksum("layer.weight", damaged, dict(parts, codes=codes))  # a checksum that agrees
    with pytest.raises(lq.FormatError, match=r"layer\.weight\.codes: corrupt"):
        lq.dequantize_entry("layer.weight", damaged, dict(parts, codes=codes))


OVERFLOW = "its steps / scales give weights up to"


@pytest.mark.parametrize("part,value,problem", [
    ("steps", float("nan"), "not finite and positive"), ("steps", 0.0, "not finite and positive"),
    ("steps", 1e38, OVERFLOW), ("codebook", float("inf"), "not finite"), ("codebook", -1e38, OVERFLOW),
    ("scales", float("-inf"), "not finite"), ("awq_scales", float("nan"), "not finite and positive"),
    ("awq_scales", -1.0, "not finite and positive")])
def test_dequantize_entry_rejects_bad_side_values(lq, part, value, problem):
    """A NaN step would turn a whole row into NaN without a word: side tensors must be finite
    (steps and AWQ scales positive), and must not imply weights beyond float32's range, even
    under a checksum that agrees."""
    w, importance = _weight(16, 64, 1), torch.rand(64, generator=torch.Generator().manual_seed(2)) ** 4 * 10
    method, options = {"steps": ("ecsq", {"group_rows": 4, "lam": 1e-5}), "codebook": ("polar", {}),
                       "scales": ("absmax", {}),
                       "awq_scales": ("absmax", {"importance": importance, "awq": True})}[part]
    qt = eoq.quantize_tensor(w, method, 3, **options)
    entry, parts = make_entry(qt, "packed", torch.float32, name="layer.weight")
    bad = parts[part].clone()
    bad.view(-1)[1] = value
    parts = dict(parts, **{part: bad})
    entry["checksum"] = checksum("layer.weight", entry, parts)
    if problem == OVERFLOW:
        match = rf"layer\.weight: {OVERFLOW} .*, beyond float32's range"
    else:
        match = rf"layer\.weight\.{part}: value .* at index 1 is {problem}"
    with pytest.raises(lq.FormatError, match=match):
        lq.dequantize_entry("layer.weight", entry, parts)


def test_dequantize_entry_accepts_whole_bits_as_float(lq):
    """A fixed-rate method's bits written as 4.0 (a float config value) is the same entry."""
    qt = eoq.quantize_tensor(_weight(16, 64, 4), "absmax", 4)
    entry, parts = make_entry(qt, "packed", torch.float32)
    entry["bits"] = 4.0
    entry["checksum"] = checksum("w", entry, parts)
    assert torch.equal(lq.dequantize_entry("w", entry, parts), qt.dequantize(torch.float32))
    entry["bits"] = 4.5
    entry["checksum"] = checksum("w", entry, parts)
    with pytest.raises(lq.FormatError, match=r"w: bits must be a whole number in \[2, 8\], got 4\.5"):
        lq.dequantize_entry("w", entry, parts)


@pytest.mark.parametrize("field,value,problem", [
    ("meta.group_rows", 1 << 29, "meta.group_rows must be an integer in"),
    ("qshape", [1 << 28, 64], "does not match qshape"),
    ("code_bits", 9, "code_bits must be an integer in"), ("seed", -1, "seed must be"),
    ("seed", 1 << 64, "seed must be"), ("meta.rotation_block", 48, "meta.rotation_block must be a power of two"),
    ("meta.rotation_block", 1 << 29, "meta.rotation_block must be an integer in"),
    ("meta.padded_cols", 1 << 30, "meta.padded_cols must be an integer in"),
    ("meta.offset", 1 << 31, "meta.offset must be"), ("parts.steps.shape", [1 << 30], "parts.steps is"),
    ("code_shape", [1 << 20, 1 << 20], "code_shape is"), ("transposed", "yes", "transposed must be"),
    ("codec", "zip", "codec must be"), ("dtype", "float128", "dtype must be"), ("kind", "magic", "kind must be"),
    ("shape", [2] * 9, "shape must be a list of at most 8"), ("bits", float("nan"), "bits must be a finite")])
def test_dequantize_entry_validates_fields_first(lq, field, value, problem):
    """Every field is checked by type and range before anything is allocated from it, even
    under a checksum that agrees with the changed field."""
    qt = eoq.quantize_tensor(_weight(24, 64, 3), "ecsq", 3, group_rows=8, lam=1e-5)
    entry, parts = make_entry(qt, "rans", torch.float32, name="layer.weight")
    target, *path = field.split(".")
    if path:
        node = entry[target]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    else:
        entry[target] = value
    if not (isinstance(value, float) and math.isnan(value)):
        entry["checksum"] = checksum("layer.weight", entry, parts)
    with pytest.raises(lq.FormatError, match=rf"layer\.weight: (.* )?{re.escape(problem)}"):
        lq.dequantize_entry("layer.weight", entry, parts)


# ---- whole folders ------------------------------------------------------------------------------------


def _tiny_llama(dtype=torch.bfloat16):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def write_folder(model, out: pathlib.Path, recipe, shards: int = 2):
    """A repo-format-2 folder written by hand from docs/FORMAT.md (independent of eoq's writer).

    recipe(name, weight) -> None (passthrough) or (method, bits, codec, options). Returns the
    expected state dict (what a loader must produce, tied parameters left out).
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    sd = model.state_dict()
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    entries, stored, expected = {}, {}, {}
    for name in sorted(sd):
        t = sd[name]
        if name in tied:
            entries[name] = {"kind": "tied", "tied_to": tied[name], "shape": list(t.shape),
                             "dtype": dtype_name(t.dtype), "stored_bytes": 0}
            stored[name] = {}
            continue
        plan = recipe(name, t)
        if plan is None:
            entries[name] = {"kind": "passthrough", "reason": "small", "shape": list(t.shape),
                             "dtype": dtype_name(t.dtype), "stored_bytes": t.numel() * t.element_size()}
            stored[name] = {"tensor": t.contiguous()}
            expected[name] = t
            continue
        method, bits, codec, options = plan
        qt = eoq.quantize_tensor(t, method, bits, seed=len(entries), **options)
        entries[name], stored[name] = make_entry(qt, codec, t.dtype, name=name)
        expected[name] = qt.dequantize(t.dtype)
    names = [n for n in sorted(entries) if entries[n]["kind"] != "tied"]
    marker = next(n for n in names if "method" in entries[n])
    files = ["model.safetensors"] if shards == 1 else \
        [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i, file in enumerate(files):
        tensors = {}
        for name in names[i * per:(i + 1) * per]:
            tensors.update({name if p == "tensor" else f"{name}.{p}": v for p, v in stored[name].items()})
            entries[name]["file"] = file
            if name == marker:
                tensors[name] = torch.frombuffer(bytearray(eoq.format.repo.MARKER_TEXT.encode()), dtype=torch.uint8)
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in tensors})
    for name, entry in entries.items():  # the checksums cover every field, "file" included
        entry["checksum"] = checksum(name, entry, stored[name])
    if shards > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    manifest = {"format": "eoq", "format_version": 2, "eoq_version": eoq.__version__, "config": {},
                "source": {"kind": "model", "name": "tiny", "architecture": "LlamaForCausalLM",
                           "model_type": "llama"},
                "marker": marker, "tensors": entries, "totals": {}}
    manifest["checksum"] = manifest_checksum(manifest)
    (out / "quant_manifest.json").write_text(json.dumps(manifest, indent=1))
    model.config.quantization_config = {"quant_method": "eoq", "format_version": 2}
    try:
        model.config.save_pretrained(str(out))
    finally:
        del model.config.quantization_config
    return expected


def mixed_recipe(name, t):
    if t.dim() != 2 or "embed" in name:
        return None
    if "mlp.down" in name:
        return ("absmax", 4, "packed", {})
    if "mlp.up" in name:
        return ("turbo", 3, "packed", {"group": "row"})
    if "self_attn.q" in name:
        return ("polar", 3, "rans", {})
    return ("ecsq", 3, "rans", {"group_rows": 64, "lam": 1e-5} if "gate" in name else {})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model = _tiny_llama()
    out = tmp_path_factory.mktemp("standalone") / "q"
    expected = write_folder(model, out, mixed_recipe)
    return out, expected


def test_constants_agree_with_eoq(lq):
    assert lq.FORMAT_VERSION == eoq.format.repo.FORMAT_VERSION == 2
    assert lq.MARKER_TEXT == eoq.format.repo.MARKER_TEXT
    assert lq.MAX_MANIFEST_BYTES == eoq.format.repo.MAX_MANIFEST_BYTES


def test_read_folder(lq, folder):
    path, expected = folder
    manifest, sd = lq.read_folder(path)
    assert manifest["format"] == "eoq" and sorted(sd) == sorted(expected)
    for name in expected:
        assert sd[name].dtype == expected[name].dtype and torch.equal(sd[name], expected[name]), name
    # the hand-written folder is one eoq reads too (the writer above follows docs/FORMAT.md)
    ref = eoq.read_state_dict(path)
    assert sorted(ref) == sorted(sd) and all(torch.equal(ref[k], sd[k]) for k in ref)
    # the checksums as the loader computes them
    flat = {k: t for tensors in _stored(path).values() for k, t in tensors.items()}
    for name, entry in manifest["tensors"].items():
        tensors = {} if entry["kind"] == "tied" else {"tensor": flat[name]} if "method" not in entry else \
            {p: flat[f"{name}.{p}"] for p in entry["parts"]}
        assert lq.entry_checksum(name, entry, tensors) == entry["checksum"], name
    assert lq.manifest_checksum(manifest) == manifest["checksum"]


def test_load_pure_builds_the_model(lq, folder):
    path, expected = folder
    model = lq.load(path, use_eoq=False)
    assert not model.training and model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sd = model.state_dict()
    for name in expected:
        assert torch.equal(sd[name], expected[name]), name
    f32 = lq.load(str(path), dtype="float32", use_eoq=False)
    assert f32.dtype == torch.float32
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.isfinite(f32(ids).logits).all()


def test_build_model_covers_every_parameter(lq, folder):
    """Every key of the model's state_dict comes from an entry, a base-model prefix difference
    tolerated (a folder of LlamaModel weights, "layers.0...", into LlamaForCausalLM's
    "model.layers.0..."); a key no entry covers, or one several cover, is an error."""
    path, expected = folder
    manifest, sd = lq.read_folder(path)

    def strip(n):
        return n.removeprefix("model.")

    bare = {"tensors": {strip(n): dict(e, tied_to=strip(e["tied_to"])) if e["kind"] == "tied" else e
                        for n, e in manifest["tensors"].items()}}
    model = lq.build_model(path, {strip(n): t for n, t in sd.items()}, bare)
    got = model.state_dict()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # a parameter without an entry would keep its random initialisation
    less = {"tensors": {n: e for n, e in bare["tensors"].items() if n != "norm.weight"}}
    with pytest.raises(lq.FormatError, match=r"'model\.norm\.weight' has no entry"):
        lq.build_model(path, {strip(n): t for n, t in sd.items() if n != "model.norm.weight"}, less)
    # two entries that could both be it
    other = "base.model.norm.weight"
    both = {"tensors": dict(bare["tensors"], **{other: bare["tensors"]["norm.weight"]})}
    with pytest.raises(lq.FormatError, match=r"'model\.norm\.weight' has several entries"):
        lq.build_model(path, dict({strip(n): t for n, t in sd.items()}, **{other: sd["model.norm.weight"]}), both)
    # a stored tensor the model has no place for
    extra = {"tensors": dict(manifest["tensors"], **{"extra.weight": manifest["tensors"]["model.norm.weight"]})}
    with pytest.raises(lq.FormatError, match=r"stored parameters are not in LlamaForCausalLM: \['extra\.weight'\]"):
        lq.build_model(path, dict(sd, **{"extra.weight": sd["model.norm.weight"]}), extra)


def test_load_delegates_to_eoq(lq, folder, monkeypatch):
    path, _ = folder
    calls = []

    def fake(p, dtype=None, device="cpu"):
        calls.append((p, dtype, device))
        return "model", {"manifest": True}

    monkeypatch.setattr(eoq, "load_quantized", fake, raising=False)
    assert lq.load(path, dtype=torch.float16, device="cpu") == "model"
    assert lq.load(path, use_eoq=True) == "model"
    assert calls == [(str(path), torch.float16, "cpu"), (str(path), None, "cpu")]
    monkeypatch.delattr(eoq, "load_quantized")
    with pytest.raises(ImportError):
        lq.load(path, use_eoq=True)


def _copy(src: pathlib.Path, dst: pathlib.Path):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _manifest(path: pathlib.Path) -> dict:
    return json.loads((path / "quant_manifest.json").read_text())


def _stored(path: pathlib.Path) -> dict:
    """{file name: {key: tensor}} of a folder's safetensors files."""
    from safetensors.torch import load_file

    return {f.name: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}


def edit(path: pathlib.Path, manifest_fn=None, tensors_fn=None, reseal=(), reseal_manifest=None):
    """Rewrites a folder: manifest_fn(manifest) and tensors_fn({file: {key: tensor}}) change it
    in place; the entries named in `reseal` get the checksum of what is now stored (so that
    only a later check can catch the change), and the manifest its checksum when any entry
    was resealed (or when reseal_manifest is true)."""
    from safetensors.torch import save_file

    m = _manifest(path)
    if manifest_fn is not None:
        manifest_fn(m)
    files = _stored(path)
    if tensors_fn is not None:
        tensors_fn(files)
        for file, tensors in files.items():
            save_file(tensors, str(path / file), metadata={"format": "pt"})
    flat = {k: t for tensors in files.values() for k, t in tensors.items()}
    for name in reseal:
        e = m["tensors"][name]
        parts = {} if e["kind"] == "tied" else {"tensor": flat[name]} if "method" not in e else \
            {p: flat[f"{name}.{p}"] for p in e["parts"]}
        e["checksum"] = checksum(name, e, parts)
    if reseal or reseal_manifest:
        m["checksum"] = manifest_checksum(m)
    (path / "quant_manifest.json").write_text(json.dumps(m, indent=1))
    return m


def test_folder_errors_name_the_file(lq, folder, tmp_path):
    path, _ = folder
    # A manifest from the future, and one of format 1.
    for version in (3, 1):
        bad = _copy(path, tmp_path / f"v{version}")
        edit(bad, lambda m: m.update(format_version=version))
        with pytest.raises(lq.FormatError, match=rf"quant_manifest\.json.*version {version}"):
            lq.read_folder(bad)
        with pytest.raises(lq.FormatError, match=rf"quant_manifest\.json.*version {version}"):
            lq.load(bad, use_eoq=False)
    # A checksum that does not hold (the manifest's own checksum made to agree).
    bad = _copy(path, tmp_path / "crc")
    name = "model.layers.1.mlp.down_proj.weight"
    m = edit(bad, lambda m: m["tensors"][name].update(checksum="crc32c:00000000"), reseal_manifest=True)
    file = m["tensors"][name]["file"]
    with pytest.raises(lq.FormatError, match=rf"{file}.*{name}.*checksum mismatch"):
        lq.read_folder(bad)
    # ... and without the manifest checksum made to agree: the manifest's checksum fails first.
    bad = _copy(path, tmp_path / "crc2")
    edit(bad, lambda m: m["tensors"][name].update(checksum="crc32c:00000000"))
    with pytest.raises(lq.FormatError, match=r"quant_manifest\.json: manifest checksum mismatch"):
        lq.read_folder(bad)
    # A parameter the folder lacks, entry and tensor gone, every checksum consistent: the
    # folder reads, but the model would keep a random norm.
    bad = _copy(path, tmp_path / "missing")
    drop = "model.norm.weight"
    m = _manifest(bad)
    where = m["tensors"][drop]["file"]
    edit(bad, lambda m: m["tensors"].pop(drop), lambda files: files[where].pop(drop), reseal_manifest=True)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    del index["weight_map"][drop]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    assert drop not in lq.read_folder(bad)[1]
    with pytest.raises(lq.FormatError, match=r"model\.norm\.weight.*no entry"):
        lq.load(bad, use_eoq=False)
    # Entries without "file": format 2 requires it.
    bad = _copy(path, tmp_path / "nofile")
    edit(bad, lambda m: [e.pop("file", None) for e in m["tensors"].values()])
    with pytest.raises(lq.FormatError, match=r"quant_manifest\.json: tensor 'model\.embed_tokens\.weight': file must "
                                             r"be a plain \*\.safetensors file name"):
        lq.read_folder(bad)
    # A shard that is gone.
    bad = _copy(path, tmp_path / "shard")
    (bad / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(lq.FormatError, match="model-00002-of-00002.safetensors"):
        lq.read_folder(bad)


# ---- a folder eoq wrote, damaged or forged in every way a reader must catch ------------------------


@pytest.fixture(scope="module")
def eoq_folder(tmp_path_factory):
    """A sharded format-2 folder written by eoq.quantize_model (ecsq: rANS-coded codes, steps)."""
    base = tmp_path_factory.mktemp("eoq_folder")
    _tiny_llama().save_pretrained(str(base / "src"))
    config = eoq.QuantConfig(method="ecsq", bits=3, calibration=None, awq=False, min_numel=1024,
                             max_shard_size=100_000)
    eoq.quantize_model(str(base / "src"), base / "q", config, progress=False, verbose=False)
    path = base / "q"
    assert (path / "model.safetensors.index.json").is_file()  # sharded: the index is exercised
    return path


def _rans_entry(m: dict, square: bool = False) -> str:
    """An ecsq entry with rANS-coded codes that nothing is tied to (a square one: transposing
    it keeps every shape)."""
    targets = {e.get("tied_to") for e in m["tensors"].values()}
    return next(n for n, e in sorted(m["tensors"].items()) if e.get("method") == "ecsq" and e["codec"] == "rans"
                and n not in targets and (not square or e["qshape"][0] == e["qshape"][1]))


def test_eoq_folder_reads_bit_identical(lq, eoq_folder):
    manifest, sd = lq.read_folder(eoq_folder)
    ref = eoq.read_state_dict(eoq_folder)
    assert sorted(sd) == sorted(ref)
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k
    assert lq.manifest_checksum(manifest) == manifest["checksum"]


def test_rejects_flipped_passthrough_byte(lq, eoq_folder, tmp_path):
    bad = _copy(eoq_folder, tmp_path / "flip")
    name = "model.norm.weight"
    file = _manifest(bad)["tensors"][name]["file"]

    def flip(files):
        files[file][name].view(torch.uint8)[5] ^= 0x04

    edit(bad, tensors_fn=flip)
    with pytest.raises(lq.FormatError, match=rf"{file}: {re.escape(name)}: checksum mismatch"):
        lq.read_folder(bad)
    with pytest.raises(lq.FormatError, match=rf"{re.escape(name)}: checksum mismatch"):
        lq.load(bad, use_eoq=False)


@pytest.mark.parametrize("field", ["meta.offset", "seed", "transposed", "meta.rotation_block", "dtype",
                                   "tied dtype"])
def test_rejects_changed_recipe_field(lq, eoq_folder, tmp_path, field):
    """A changed field with the entry's checksum left as is: the checksum covers the recipe.
    (The manifest checksum, over the entries' checksums, still holds.)"""
    bad = _copy(eoq_folder, tmp_path / "field")
    m = _manifest(bad)
    name = "lm_head.weight" if field == "tied dtype" else _rans_entry(m, square=True)
    entry = m["tensors"][name]
    if field == "meta.offset":
        entry["meta"]["offset"] += 1
    elif field == "seed":
        entry["seed"] += 1
    elif field == "transposed":
        entry["transposed"] = not entry["transposed"]
    elif field == "meta.rotation_block":  # (ecsq's block_size is its rotation block: both change)
        entry["meta"]["rotation_block"] //= 2
        entry["block_size"] = entry["meta"]["rotation_block"]
    else:  # the dtype the weight is dequantized to (of a stored entry, of a tied one)
        assert entry["dtype"] == "bfloat16"
        entry["dtype"] = "float16"
    (bad / "quant_manifest.json").write_text(json.dumps(m))
    with pytest.raises(lq.FormatError, match=rf"{re.escape(name)}: checksum mismatch"):
        lq.read_folder(bad)


def test_rejects_missing_checksums(lq, eoq_folder, tmp_path):
    m = _manifest(eoq_folder)
    for name in ["model.norm.weight", _rans_entry(m), "lm_head.weight"]:
        bad = _copy(eoq_folder, tmp_path / f"nocrc-{name}")
        edit(bad, lambda m: m["tensors"][name].pop("checksum"), reseal_manifest=True)
        with pytest.raises(lq.FormatError, match=rf"tensor {re.escape(repr(name))}: checksum is missing"):
            lq.read_folder(bad)
        with pytest.raises(lq.FormatError, match=rf"tensor {re.escape(repr(name))}: checksum is missing"):
            lq.load(bad, use_eoq=False)
    bad = _copy(eoq_folder, tmp_path / "nocrc-manifest")
    edit(bad, lambda m: m.pop("checksum"))
    with pytest.raises(lq.FormatError, match=r"quant_manifest\.json: the manifest checksum is missing"):
        lq.read_folder(bad)


def test_rejects_nan_step(lq, eoq_folder, tmp_path):
    """NaN in a steps tensor under a checksum that agrees (the file rewritten, the entry and
    manifest checksums recomputed): only the finiteness check can catch it."""
    bad = _copy(eoq_folder, tmp_path / "nan")
    m = _manifest(bad)
    name = _rans_entry(m)
    file = m["tensors"][name]["file"]

    def poison(files):
        files[file][f"{name}.steps"][0] = float("nan")

    edit(bad, tensors_fn=poison, reseal=[name])
    with pytest.raises(lq.FormatError, match=rf"{file}: {re.escape(name)}\.steps: value nan at index 0 is not "
                                             "finite"):
        lq.read_folder(bad)


@pytest.mark.parametrize("target", ["../x.safetensors", "ABS", "sub/x.safetensors", "..safetensors",
                                    "model.safetensors.index.json"])
def test_rejects_shard_index_outside_the_folder(lq, eoq_folder, tmp_path, target):
    bad = _copy(eoq_folder, tmp_path / "q")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    key = sorted(index["weight_map"])[0]
    # the file the index points at exists, with the right tensors: only the name check can catch it
    shutil.copy(bad / index["weight_map"][key], tmp_path / "x.safetensors")
    (bad / "sub").mkdir()
    shutil.copy(bad / index["weight_map"][key], bad / "sub" / "x.safetensors")
    target = str(tmp_path / "x.safetensors") if target == "ABS" else target
    index["weight_map"][key] = target
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(lq.FormatError, match=rf"model\.safetensors\.index\.json: tensor {re.escape(repr(key))} is "
                                             rf"mapped to .*which is not a plain \*\.safetensors file name"):
        lq.read_folder(bad)


def rans_stream_declaring(n: int, chunk: int = 1 << 20) -> bytes:
    """A well-formed EOQR stream (docs/FORMAT.md) that declares n symbols of one symbol: a
    valid header and header CRC, and chunks of the minimum payload size. Its states are 0,
    so it would fail to decode; a reader must refuse it before, from the declared count."""
    n_chunks = -(-n // chunk)
    head = b"EOQR" + bytes([1, 12, 32, 0]) + struct.pack("<QII", n, chunk, n_chunks) + struct.pack("<HH", 1, 4096)
    head += struct.pack("<II", 128, 0) * n_chunks
    head += struct.pack("<I", crc32c_bytes(head))
    return head + bytes(128 * n_chunks)


_CAPPED = r"""
import importlib.util, resource, sys, time
import numpy as np
spec = importlib.util.spec_from_file_location("lq", sys.argv[1])
lq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lq)
vm = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:")][0]
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    np.ones(2 << 30, np.uint8)
    print("the address-space cap does not hold")
except MemoryError:
    pass
t = time.time()
try:
    lq.read_folder(sys.argv[2])
    print("read without an error")
except Exception as e:
    print(f"{type(e).__name__} after {time.time() - t:.2f}s: {e}")
"""


def read_capped(lq, path) -> str:
    """read_folder in a subprocess whose address space is capped 1 GiB above what the loader
    takes once imported: an allocation from a forged length raises MemoryError there, not
    FormatError."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the address-space cap reads /proc/self/status")
    run = subprocess.run([sys.executable, "-c", _CAPPED, lq.__file__, str(path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip()


def test_rejects_rans_stream_declaring_2_36_symbols(lq, eoq_folder, tmp_path):
    bad = _copy(eoq_folder, tmp_path / "rans")
    m = _manifest(bad)
    name = _rans_entry(m)
    file = m["tensors"][name]["file"]
    stream = rans_stream_declaring(1 << 36)
    assert ops.rans_info(u8(np.frombuffer(stream, np.uint8)))["n_symbols"] == 1 << 36  # eoq reads the header

    def forge(files):
        files[file][f"{name}.codes"] = u8(np.frombuffer(stream, np.uint8))

    def forge_manifest(m):
        m["tensors"][name]["parts"]["codes"]["shape"] = [len(stream)]

    edit(bad, forge_manifest, forge, reseal=[name])
    t = time.time()
    with pytest.raises(lq.FormatError, match=rf"{file}: {re.escape(name)}\.codes: .*declares 68719476736 symbols"):
        lq.read_folder(bad)
    assert time.time() - t < 30
    entry = _manifest(bad)["tensors"][name]
    parts = {p: _stored(bad)[file][f"{name}.{p}"] for p in entry["parts"]}
    with pytest.raises(lq.FormatError, match=rf"{re.escape(name)}\.codes: .*declares 68719476736 symbols"):
        lq.dequantize_entry(name, entry, parts)
    out = read_capped(lq, bad)
    assert out.startswith("FormatError") and name in out and "68719476736" in out, out


def test_rejects_huge_qshape_without_allocating(lq, eoq_folder, tmp_path):
    """qshape [2^28, 64] with a code_shape, steps and rotation that agree with it, every
    checksum recomputed: the folder passes every field check and must still fail fast, at the
    stream's declared count, without a 16 GiB allocation."""
    bad = _copy(eoq_folder, tmp_path / "huge")
    m = _manifest(bad)
    name = _rans_entry(m)

    def forge(m):
        e = m["tensors"][name]
        assert e["meta"]["group_rows"] is None and e["parts"]["steps"]["shape"] == [1]
        e.update(shape=[1 << 28, 64], qshape=[1 << 28, 64], code_shape=[1 << 28, 64], block_size=64)
        e["meta"].update(padded_cols=64, rotation_block=64)

    edit(bad, forge, reseal=[name])
    t = time.time()
    with pytest.raises(lq.FormatError, match=rf"{re.escape(name)}\.codes: .*{(1 << 34)} expected"):
        lq.read_folder(bad)
    assert time.time() - t < 30
    out = read_capped(lq, bad)
    assert out.startswith("FormatError") and name in out, out


def test_rejects_structure_damage(lq, eoq_folder, tmp_path):
    """What the headers and the stored tensors must agree with."""
    m = _manifest(eoq_folder)
    name, marker = _rans_entry(m), m["marker"]
    file, marker_file = m["tensors"][name]["file"], m["tensors"][marker]["file"]
    # a tensor the manifest does not list
    bad = _copy(eoq_folder, tmp_path / "extra")
    edit(bad, tensors_fn=lambda files: files[file].update({"stowaway": torch.zeros(3)}))
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"]["stowaway"] = file
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(lq.FormatError, match=rf"{file}: holds tensor 'stowaway', which the manifest does not list"):
        lq.read_folder(bad)
    # a part stored with another shape than the manifest's
    bad = _copy(eoq_folder, tmp_path / "shape")
    edit(bad, tensors_fn=lambda files: files[file].update({f"{name}.steps": torch.ones(2)}))
    with pytest.raises(lq.FormatError, match=rf"{file}: tensor {re.escape(repr(name + '.steps'))} is stored as "
                                             r"float32 \[2\], the manifest says float32 \[1\]"):
        lq.read_folder(bad)
    # the marker's text
    bad = _copy(eoq_folder, tmp_path / "marker")
    edit(bad, tensors_fn=lambda files: files[marker_file][marker].__setitem__(0, ord("E")))
    with pytest.raises(lq.FormatError, match=rf"{marker_file}: the marker tensor {re.escape(repr(marker))} is damaged"):
        lq.read_folder(bad)
    # a header that claims more than the file holds
    bad = _copy(eoq_folder, tmp_path / "cut")
    data = (bad / file).read_bytes()
    (bad / file).write_bytes(data[:-10])
    with pytest.raises(lq.FormatError, match=rf"{file}: tensor .* claims bytes"):
        lq.read_folder(bad)
    (bad / file).write_bytes(struct.pack("<Q", len(data)) + data[8:])
    with pytest.raises(lq.FormatError, match=rf"{file}: header length"):
        lq.read_folder(bad)
    # overlapping tensors (two steps tensors, float32 [1], given the same bytes)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    keys = [k for k in header if k.endswith(".steps")][:2]
    assert len(keys) == 2 and header[keys[0]]["shape"] == header[keys[1]]["shape"]
    header[keys[1]]["data_offsets"] = header[keys[0]]["data_offsets"]
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    (bad / file).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(lq.FormatError, match=rf"{file}: tensors .* overlap"):
        lq.read_folder(bad)
    # two entries claiming one stored tensor: a passthrough "<name>.steps" beside <name>'s steps
    bad = _copy(eoq_folder, tmp_path / "collide")
    twin = {"kind": "passthrough", "reason": "small", "shape": [1], "dtype": "float32", "stored_bytes": 4, "file": file}
    edit(bad, lambda m: m["tensors"].update({f"{name}.steps": twin}), reseal=[f"{name}.steps"])
    with pytest.raises(lq.FormatError, match=rf"tensor {re.escape(repr(name + '.steps'))}: stores .*which is also "
                                             rf"stored by {re.escape(repr(name))}"):
        lq.read_folder(bad)
    # a manifest that is not JSON, or holds the wrong types
    bad = _copy(eoq_folder, tmp_path / "json")
    (bad / "quant_manifest.json").write_text("{" * 100_000)
    with pytest.raises(lq.FormatError, match=r"quant_manifest\.json: unreadable or not JSON"):
        lq.read_folder(bad)
    forgeries = [(lambda m: m.update(tensors=[]), "'tensors' must be an object"),
                 (lambda m: m["tensors"][name].update(parts=[1]), "parts must be an object"),
                 (lambda m: m["tensors"][name]["parts"]["codes"].update(shape="12"), "parts.codes.shape must be"),
                 (lambda m: m["tensors"][name].update(meta=None), "meta must be an object"),
                 (lambda m: m["tensors"]["lm_head.weight"].update(tied_to="model.norm.weight"),
                  "differs from the shape"),
                 (lambda m: m.update(marker=name + "x"), "is not a quantized tensor")]
    for i, (forge, problem) in enumerate(forgeries):
        bad = _copy(eoq_folder, tmp_path / f"types{i}")
        edit(bad, forge)
        with pytest.raises(lq.FormatError, match=rf"quant_manifest\.json.*{re.escape(problem)}"):
            lq.read_folder(bad)


def _tiny_gpt2():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=0, architectures=["GPT2LMHeadModel"])
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("arch,method,bits", [("llama", "ecsq", 3), ("gpt2", "absmax", 4), ("gpt2", "polar", 3)])
def test_pure_path_equals_eoq_on_an_eoq_folder(lq, tmp_path, arch, method, bits):
    """A folder written by eoq itself (GPT-2: transposed Conv1D weights, a tied head entry):
    both paths give the same model, tensor for tensor."""
    if not hasattr(eoq, "quantize_model") or not hasattr(eoq, "load_quantized"):
        pytest.skip("this eoq has no quantize_model / load_quantized")
    model = _tiny_llama() if arch == "llama" else _tiny_gpt2()
    model.save_pretrained(str(tmp_path / "src"))
    config = eoq.QuantConfig(method=method, bits=bits, calibration=None, awq=False, min_numel=1024)
    eoq.quantize_model(str(tmp_path / "src"), tmp_path / "q", config, progress=False, verbose=False)
    for dtype in (None, torch.float32, torch.bfloat16):
        pure = lq.load(tmp_path / "q", dtype=dtype, use_eoq=False)
        ref = lq.load(tmp_path / "q", dtype=dtype, use_eoq=True)
        assert pure.dtype == ref.dtype
        a, b = pure.state_dict(), ref.state_dict()
        assert sorted(a) == sorted(b)
        for k in b:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (dtype, k)
