"""The stand-alone loader (python/eoq/standalone/load_quantized.py, copied into every quantized
folder): its pure numpy/torch path must give eoq's results bit for bit, and reject what eoq rejects.

The file is not a module of the eoq package, so it is imported by path.
"""

import importlib.util
import json
import math
import pathlib
import sys
import zlib

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


def checksum(tensors) -> str:
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


def make_entry(qt, codec: str, dtype: torch.dtype, transposed: bool = False):
    """(manifest entry, parts) for a QuantizedTensor, as docs/FORMAT.md describes them."""
    parts = {"codes": qt.code_stream(codec), **{k: v.contiguous() for k, v in qt.side.items()}}
    rows, cols = qt.shape
    order = ["codes"] + sorted(p for p in parts if p != "codes")
    entry = {
        "kind": "quantized", "method": qt.method, "bits": qt.bits, "block_size": qt.block_size, "seed": qt.seed,
        "shape": [cols, rows] if transposed else [rows, cols], "dtype": dtype_name(dtype), "transposed": transposed,
        "qshape": [rows, cols], "code_shape": list(qt.codes.shape), "code_bits": qt.code_bits, "codec": codec,
        "parts": {k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for k, t in parts.items()},
        "meta": json.loads(json.dumps(qt.meta)),  # as a manifest gives it back
        "stored_bytes": sum(t.numel() * t.element_size() for t in parts.values()),
        "checksum": checksum([parts[p] for p in order]),
    }
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
    sizes = [0, 1, 3, 4, 5, 2047, 2048, 2049, 5000, 300_001]
    arrays = [rng.integers(0, 256, n).astype(np.uint8) for n in sizes]
    expected = [ops.crc32c(u8(a)) for a in arrays]
    assert lq.crc32c_many(arrays) == expected
    assert [lq.crc32c(a) for a in arrays] == expected


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
    qt = eoq.quantize_tensor(w, method, bits, importance=importance, awq=True, seed=3, **options)
    assert "awq_scales" in qt.side
    for dtype in (torch.float32, torch.bfloat16):
        entry, parts = make_entry(qt, "rans", dtype)
        assert torch.equal(lq.dequantize_entry("w", entry, parts), qt.dequantize(dtype))
        entry, parts = make_entry(qt, "packed", dtype, transposed=True)
        assert torch.equal(lq.dequantize_entry("w", entry, parts), qt.dequantize(dtype).t())


def test_dequantize_entry_rejects_damage(lq):
    qt = eoq.quantize_tensor(_weight(16, 256, 0), "ecsq", 3)
    entry, parts = make_entry(qt, "rans", torch.float32)
    bad = dict(parts, steps=parts["steps"] * 2)
    with pytest.raises(ValueError, match="checksum mismatch"):
        lq.dequantize_entry("layer.weight", entry, bad)
    with pytest.raises(ValueError, match=r"layer\.weight\.steps.*manifest says"):
        lq.dequantize_entry("layer.weight", entry, dict(parts, steps=parts["steps"].double()))
    with pytest.raises(ValueError, match="missing"):
        lq.dequantize_entry("layer.weight", entry, {"codes": parts["codes"]})
    codes = parts["codes"].clone()
    codes[-3] ^= 0x10
    damaged = dict(entry, checksum=checksum([codes, parts["steps"]]))  # a checksum that agrees
    with pytest.raises(ValueError, match=r"layer\.weight\.codes: corrupt"):
        lq.dequantize_entry("layer.weight", damaged, dict(parts, codes=codes))


# ---- whole folders ------------------------------------------------------------------------------------


def _tiny_llama(dtype=torch.bfloat16):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def write_folder(model, out: pathlib.Path, recipe, shards: int = 2):
    """A repo-format-1 folder written by hand from docs/FORMAT.md (independent of eoq's writer).

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
            continue
        plan = recipe(name, t)
        if plan is None:
            entries[name] = {"kind": "passthrough", "reason": "small", "shape": list(t.shape),
                             "dtype": dtype_name(t.dtype), "stored_bytes": t.numel() * t.element_size(),
                             "checksum": checksum([t])}
            stored[name] = {name: t.contiguous()}
            expected[name] = t
            continue
        method, bits, codec, options = plan
        qt = eoq.quantize_tensor(t, method, bits, seed=len(entries), **options)
        entry, parts = make_entry(qt, codec, t.dtype)
        entries[name] = entry
        stored[name] = {f"{name}.{p}": v for p, v in parts.items()}
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
            tensors.update(stored[name])
            entries[name]["file"] = file
            if name == marker:
                tensors[name] = torch.frombuffer(bytearray(b"eoq-quantized weights"), dtype=torch.uint8)
        save_file(tensors, str(out / file), metadata={"format": "pt", "eoq_format": "1"})
        weight_map.update({k: file for k in tensors})
    if shards > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    manifest = {"format": "eoq", "format_version": 1, "eoq_version": eoq.__version__, "config": {},
                "source": {"kind": "model", "name": "tiny", "architecture": "LlamaForCausalLM",
                           "model_type": "llama"},
                "marker": marker, "tensors": entries, "totals": {}}
    (out / "quant_manifest.json").write_text(json.dumps(manifest, indent=1))
    model.config.quantization_config = {"quant_method": "eoq", "format_version": 1}
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


def test_read_folder(lq, folder):
    path, expected = folder
    manifest, sd = lq.read_folder(path)
    assert manifest["format"] == "eoq" and sorted(sd) == sorted(expected)
    for name in expected:
        assert sd[name].dtype == expected[name].dtype and torch.equal(sd[name], expected[name]), name


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


def test_folder_errors_name_the_file(lq, folder, tmp_path):
    path, _ = folder
    # A manifest from the future.
    bad = _copy(path, tmp_path / "v2")
    m = json.loads((bad / "quant_manifest.json").read_text())
    m["format_version"] = 2
    (bad / "quant_manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"quant_manifest\.json.*version 2"):
        lq.read_folder(bad)
    with pytest.raises(ValueError, match=r"quant_manifest\.json.*version 2"):
        lq.load(bad, use_eoq=False)
    # A checksum that does not hold.
    bad = _copy(path, tmp_path / "crc")
    m = json.loads((bad / "quant_manifest.json").read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    m["tensors"][name]["checksum"] = "crc32:00000000"
    (bad / "quant_manifest.json").write_text(json.dumps(m))
    file = m["tensors"][name]["file"]
    with pytest.raises(ValueError, match=rf"{file}.*{name}.*checksum mismatch"):
        lq.read_folder(bad)
    # A parameter the folder lacks.
    bad = _copy(path, tmp_path / "missing")
    m = json.loads((bad / "quant_manifest.json").read_text())
    del m["tensors"]["model.norm.weight"]
    (bad / "quant_manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        lq.load(bad, use_eoq=False)
    # Entries without "file" (the field is required, but the shard index says it too).
    ok = _copy(path, tmp_path / "nofile")
    m = json.loads((ok / "quant_manifest.json").read_text())
    for e in m["tensors"].values():
        e.pop("file", None)
    (ok / "quant_manifest.json").write_text(json.dumps(m))
    assert sorted(lq.read_folder(ok)[1]) == sorted(lq.read_folder(path)[1])
    # A shard that is gone.
    bad = _copy(path, tmp_path / "shard")
    (bad / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
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
