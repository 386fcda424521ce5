"""Conversion and loading on tiny Llama / Qwen2 / GPT-2 models: every method, both loaders,
determinism, resume after a kill, and damaged folders."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import eoq
from eoq.format import repo
from eoq.calibrate.statistics import collect_stats
from eoq.convert.pipeline import FAULT_ENV
from eoq.convert.plan import tensor_seed

from tinymodels import ARCHS, build, save, with_outliers

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHOD_BITS = {"ecsq": 3.5, "absmax": 4, "polar": 3, "turbo": 3}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save(arch, root / arch) for arch in ARCHS}


def data_free(method="ecsq", bits=None, **kw) -> eoq.QuantConfig:
    return eoq.QuantConfig(method=method, bits=bits or METHOD_BITS[method], calibration=None, awq=False, **kw)


def auto_class(arch):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM


def folder_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", sorted(METHOD_BITS))
def test_convert_and_load_both_ways(tiny, tmp_path, arch, method):
    out = tmp_path / "q"
    manifest = eoq.quantize_model(tiny[arch], out, data_free(method), progress=False, verbose=False)
    for f in ("model.safetensors", "quant_manifest.json", "config.json", "load_quantized.py", "README.md"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "eoq" and cfg["quantization_config"]["method"] == method
    assert not list(tmp_path.glob(".*eoq-partial")), "the partial folder must be gone after success"

    base = build(arch)
    sd = eoq.read_state_dict(out)
    quantized = [n for n, e in manifest["tensors"].items() if e["kind"] == "quantized"]
    assert quantized and all(n.endswith(".weight") for n in quantized)
    # A quantized weight equals quantize_tensor's own dequantization, with the recorded seed.
    name = quantized[0]
    entry = manifest["tensors"][name]
    w = base.state_dict()[name]
    w = w.t() if entry["transposed"] else w
    qt = eoq.quantize_tensor(w, method, entry["bits"], seed=tensor_seed(0, name), name=name)  # ecsq: its allocated rate
    want = qt.dequantize()
    assert torch.equal(sd[name], want.t().contiguous() if entry["transposed"] else want)
    # Passthrough tensors come back as they were.
    for n, e in manifest["tensors"].items():
        if e["kind"] == "passthrough":
            assert torch.equal(sd[n], base.state_dict()[n]), n

    model = auto_class(arch).from_pretrained(out)
    loaded = model.state_dict()
    for n, t in sd.items():
        assert torch.equal(loaded[n], t), n
    model2, manifest2 = eoq.load_quantized(out)
    assert manifest2 == json.loads((out / "quant_manifest.json").read_text())
    for n, t in sd.items():
        assert torch.equal(model2.state_dict()[n], t), n
    ids = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 7)
    # The quantized model is close to the base one.
    x = torch.randint(3, 300, (1, 16))
    with torch.no_grad():
        p, q = base(x).logits.float().log_softmax(-1), model(x).logits.float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    assert kl < 0.05, kl


def test_tied_head_stored_once_and_embedding_options(tiny, tmp_path):
    # The default quantizes the tied embedding / head once, and both roles load the same tensor.
    m = eoq.quantize_model(tiny["llama"], tmp_path / "a", data_free(), progress=False, verbose=False)
    t = m["tensors"]
    assert {k: v for k, v in t["lm_head.weight"].items() if k != "checksum"} == {
        "kind": "tied", "tied_to": "model.embed_tokens.weight", "shape": [320, 128], "dtype": "bfloat16",
        "stored_bytes": 0}
    assert t["model.embed_tokens.weight"]["kind"] == "quantized"
    assert t["model.norm.weight"]["reason"] == "non-2d"
    model = auto_class("llama").from_pretrained(tmp_path / "a")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, eoq.read_state_dict(tmp_path / "a")["model.embed_tokens.weight"])
    # The opt-out keeps them in 16 bits; asking for the head alone quantizes the tied pair.
    keep = data_free(quantize_embeddings=False, quantize_lm_head=False)
    m = eoq.quantize_model(tiny["llama"], tmp_path / "b", keep, progress=False, verbose=False)
    assert m["tensors"]["model.embed_tokens.weight"]["kind"] == "passthrough"
    m = eoq.quantize_model(tiny["llama"], tmp_path / "c", data_free(quantize_embeddings=False), progress=False,
                           verbose=False)
    assert m["tensors"]["model.embed_tokens.weight"]["kind"] == "quantized"
    m = eoq.quantize_model(tiny["qwen2"], tmp_path / "d", data_free(quantize_embeddings=False), progress=False,
                           verbose=False)
    assert m["tensors"]["lm_head.weight"]["kind"] == "quantized"
    assert m["tensors"]["model.embed_tokens.weight"]["kind"] == "passthrough"


def test_protect_rules(tiny, tmp_path):
    rules = [eoq.ProtectRule("model.layers.0.self_attn.q_proj.weight"),
             eoq.ProtectRule(r"down_proj", regex=True, action="quantize", method="absmax", bits=8)]
    m = eoq.quantize_model(tiny["llama"], tmp_path / "q", data_free(bits=5, protect=rules), progress=False,
                           verbose=False)
    t = m["tensors"]
    assert t["model.layers.0.self_attn.q_proj.weight"]["kind"] == "protected"
    assert "method" not in t["model.layers.0.self_attn.q_proj.weight"]
    d = t["model.layers.1.mlp.down_proj.weight"]
    assert (d["kind"], d["method"], d["bits"], d["rule"]) == ("protected", "absmax", 8, "re:down_proj")
    assert t["model.layers.1.self_attn.q_proj.weight"]["method"] == "ecsq"
    sd = eoq.read_state_dict(tmp_path / "q")
    base = build("llama").state_dict()
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_gpt2_conv1d_is_transposed(tiny, tmp_path):
    m = eoq.quantize_model(tiny["gpt2"], tmp_path / "q", data_free(), progress=False, verbose=False)
    e = m["tensors"]["transformer.h.0.attn.c_attn.weight"]
    assert e["transposed"] and e["shape"] == [96, 288] and e["qshape"] == [288, 96]


def test_calibrated_awq_conversion(tiny, tmp_path):
    base = build("llama")
    stats = with_outliers(collect_stats(base, [torch.randint(3, 320, (64,)) for _ in range(4)], progress=False))
    # defaults: calibration on, AWQ on; the sensitivity pass would need a tokenizer (these have none)
    cfg = eoq.QuantConfig(bits=3.0, allocation="proxy")
    m = eoq.quantize_model(tiny["llama"], tmp_path / "q", cfg, stats=stats, progress=False, verbose=False)
    e = m["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert "awq_scales" in e["parts"] and "awq_alpha" in e["meta"]
    assert m["calibration"]["source"] == "precomputed"
    model = auto_class("llama").from_pretrained(tmp_path / "q")
    assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"],
                       eoq.read_state_dict(tmp_path / "q")["model.layers.0.mlp.up_proj.weight"])


def test_in_memory_model_and_sharding(tmp_path):
    model = build("qwen2")
    m = eoq.quantize_model(model, tmp_path / "q", data_free(max_shard_size=100_000), progress=False, verbose=False)
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and all((tmp_path / "q" / f).is_file() for f in files)
    assert m["source"]["kind"] == "model"
    loaded = auto_class("qwen2").from_pretrained(tmp_path / "q")
    sd = eoq.read_state_dict(tmp_path / "q")
    for n, t in sd.items():
        assert torch.equal(loaded.state_dict()[n], t), n


def test_deterministic_whatever_the_thread_count(tiny, tmp_path):
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = tmp_path / f"t{threads}"
            eoq.quantize_model(tiny["qwen2"], out, data_free(), progress=False, verbose=False)
            outs.append(folder_bytes(out))
    finally:
        torch.set_num_threads(old)
    assert outs[0] == outs[1]


def test_resume_after_kill_gives_the_same_bytes(tiny, tmp_path):
    cfg = data_free(method="polar")
    eoq.quantize_model(tiny["llama"], tmp_path / "ref", cfg, progress=False, verbose=False)
    out = tmp_path / "q"
    script = ("import sys, eoq; eoq.quantize_model(sys.argv[1], sys.argv[2], "
              "eoq.QuantConfig.from_json(sys.argv[3]), progress=False, verbose=False)")
    env = dict(os.environ, **{FAULT_ENV: "5"})
    r = subprocess.run([sys.executable, "-c", script, str(tiny["llama"]), str(out), cfg.to_json()], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 75, r.stderr
    partial = tmp_path / ".q.eoq-partial"
    assert not out.exists() and len(list((partial / "parts").glob("*.safetensors"))) == 5
    # A different config must not silently mix with the partial work.
    with pytest.raises(ValueError, match="different config"):
        eoq.quantize_model(tiny["llama"], out, data_free(method="absmax"), progress=False, verbose=False)
    eoq.quantize_model(tiny["llama"], out, cfg, progress=False, verbose=False)
    assert folder_bytes(out) == folder_bytes(tmp_path / "ref")
    assert not partial.exists()


def test_existing_output_needs_overwrite(tiny, tmp_path):
    out = tmp_path / "q"
    eoq.quantize_model(tiny["llama"], out, data_free(), progress=False, verbose=False)
    with pytest.raises(FileExistsError):
        eoq.quantize_model(tiny["llama"], out, data_free(), progress=False, verbose=False)
    m = eoq.quantize_model(tiny["llama"], out, data_free(method="absmax"), overwrite=True, progress=False,
                           verbose=False)
    assert json.loads((out / "quant_manifest.json").read_text()) == m


def test_without_eoq_transformers_refuses(tiny, tmp_path):
    out = tmp_path / "q"
    eoq.quantize_model(tiny["llama"], out, data_free(), progress=False, verbose=False)
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(out)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "mismatch" in (r.stdout + r.stderr).lower()


def test_quant_config_round_trip_and_errors():
    cfg = eoq.QuantConfig(method="polar", bits=3, protect=[eoq.ProtectRule("a.weight"),
                                                           eoq.ProtectRule("mlp", regex=True, action="quantize",
                                                                           bits=6)], options={"scale": "norm"})
    again = eoq.QuantConfig.from_json(cfg.to_json())
    assert again == cfg and again.to_json() == cfg.to_json()
    with pytest.raises(ValueError, match="unknown method"):
        eoq.QuantConfig(method="gptq")
    with pytest.raises(ValueError, match="awq=True needs calibration"):
        eoq.QuantConfig(calibration=None)
    with pytest.raises(ValueError, match="unknown fields"):
        eoq.QuantConfig.from_dict({"bitz": 4})
    with pytest.raises(ValueError, match="regular expression"):
        eoq.ProtectRule("(", regex=True)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        eoq.quantize_model(tmp_path, tmp_path / "q", data_free())
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["NoSuchLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'NoSuchLM'"):
        eoq.quantize_model(tmp_path / "m", tmp_path / "q", data_free())
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        eoq.quantize_model(tmp_path / "x.gguf", tmp_path / "q", data_free())


# ---- damaged folders ----------------------------------------------------------------------


@pytest.fixture
def converted(tiny, tmp_path):
    out = tmp_path / "q"
    eoq.quantize_model(tiny["llama"], out, data_free(), progress=False, verbose=False)
    return out


def _codes_offset(folder: pathlib.Path, key: str) -> int:
    raw = (folder / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return 8 + n + header[key]["data_offsets"][0]


def test_flipped_byte_in_codes_is_detected(converted):
    key = "model.layers.1.mlp.up_proj.weight.codes"
    path = converted / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[_codes_offset(converted, key) + 100] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(eoq.FormatError, match="model.layers.1.mlp.up_proj.weight: checksum mismatch"):
        eoq.read_state_dict(converted)
    with pytest.raises(eoq.FormatError, match="model.layers.1.mlp.up_proj.weight: checksum mismatch"):
        auto_class("llama").from_pretrained(converted)


def test_truncated_weights_are_detected(converted):
    path = converted / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(eoq.FormatError, match="model.safetensors"):
        eoq.read_state_dict(converted)


def test_missing_weights_file(converted):
    (converted / "model.safetensors").unlink()
    with pytest.raises(eoq.FormatError, match="neither model.safetensors"):
        eoq.read_state_dict(converted)


def test_manifest_disagreeing_with_the_tensors(converted):
    path = converted / repo.MANIFEST
    m = json.loads(path.read_text())
    m["tensors"]["model.layers.0.mlp.gate_proj.weight"]["parts"]["codes"]["shape"] = [12]
    path.write_text(json.dumps(m))
    with pytest.raises(eoq.FormatError, match=r"model.layers.0.mlp.gate_proj.weight: parts.codes.*packed codes|"
                       r"'model.layers.0.mlp.gate_proj.weight.codes' is stored as uint8 \[\d+\], the manifest says uint8 \[12\]"):
        eoq.read_state_dict(converted)


def test_unknown_format_version(converted):
    path = converted / repo.MANIFEST
    m = json.loads(path.read_text())
    m["format_version"] = 99
    path.write_text(json.dumps(m))
    with pytest.raises(eoq.FormatError, match="format version 99"):
        eoq.read_state_dict(converted)
    cfg_path = converted / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format version 99"):
        auto_class("llama").from_pretrained(converted)


def test_cli_quantize_and_info(tiny, tmp_path, capsys):
    from eoq.cli import main

    out = tmp_path / "q"
    rc = main(["quantize", str(tiny["llama"]), "-o", str(out), "--data-free", "--method", "absmax", "--bits", "4",
               "--protect-re", "down_proj=polar:3", "--option", "dummy=1", "--no-progress"])
    assert rc == 2 and "absmax takes no options" in capsys.readouterr().err
    rc = main(["quantize", str(tiny["llama"]), "-o", str(out), "--data-free", "--method", "absmax", "--bits", "4",
               "--protect-re", "down_proj=polar:3", "--no-progress"])
    assert rc == 0
    m = repo.read_manifest(out)
    assert m["tensors"]["model.layers.0.mlp.down_proj.weight"]["method"] == "polar"
    assert m["tensors"]["model.layers.0.mlp.up_proj.weight"]["method"] == "absmax"
    assert main(["info", str(out), "--top", "2"]) == 0
    assert "largest quantized tensors" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "eoq", "quantize", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--protect-re" in r.stdout


def test_load_quantized_py_without_eoq(tiny, tmp_path):
    """The folder's own load_quantized.py, in a process where `import eoq` fails, rebuilds a
    model whose tensors equal eoq's, bit for bit."""
    out = tmp_path / "q"
    eoq.quantize_model(tiny["gpt2"], out, data_free(), progress=False, verbose=False)
    script = f"""
import sys, importlib.abc
class NoEoq(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "eoq" or name.startswith("eoq."):
            raise ImportError("eoq is blocked in this test")
sys.meta_path.insert(0, NoEoq())
try:
    import eoq
    raise SystemExit("eoq was importable")
except ImportError:
    pass
sys.path.insert(0, {str(out)!r})
import torch
from load_quantized import load
model = load()
ids = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=3, do_sample=False)
assert ids.shape == (1, 6)
torch.save(model.state_dict(), {str(tmp_path / "sd.pt")!r})
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    pure = torch.load(tmp_path / "sd.pt")
    ref = eoq.read_state_dict(out)
    for name, t in ref.items():
        assert torch.equal(pure[name], t), name


def test_sharded_input_folder(tiny, tmp_path):
    """A checkpoint saved in shards (with an index) converts to the same weights as the single file."""
    sharded = tmp_path / "sharded"
    build("llama").save_pretrained(str(sharded), max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    eoq.quantize_model(sharded, tmp_path / "a", data_free(), progress=False, verbose=False)
    eoq.quantize_model(tiny["llama"], tmp_path / "b", data_free(), progress=False, verbose=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_hub_id_offline_fails_clearly(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network attempt, whatever the box
    with pytest.raises(RuntimeError, match="could not fetch 'nobody/no-such-model' from the Hugging Face hub"):
        eoq.quantize_model("nobody/no-such-model", tmp_path / "q", data_free())


def test_dtype_option_stores_float_tensors_in_it(tiny, tmp_path):
    m = eoq.quantize_model(tiny["qwen2"], tmp_path / "q", data_free(dtype="float32"), progress=False, verbose=False)
    t = m["tensors"]
    assert {e["dtype"] for e in t.values()} == {"float32"}
    sd = eoq.read_state_dict(tmp_path / "q")
    base = build("qwen2").state_dict()
    assert sd["model.norm.weight"].dtype == torch.float32
    assert torch.equal(sd["model.norm.weight"], base["model.norm.weight"].float())
    with pytest.raises(ValueError, match="dtype must be one of"):
        data_free(dtype="int8")


def test_base_model_class_loads_a_causal_lm_folder(tiny, tmp_path):
    """AutoModel on a *ForCausalLM folder: transformers strips the head's prefix, the quantizer
    still finds each parameter's entry (and the marker)."""
    from transformers import AutoModel

    eoq.quantize_model(tiny["llama"], tmp_path / "q", data_free(), progress=False, verbose=False)
    model = AutoModel.from_pretrained(tmp_path / "q")
    assert type(model).__name__ == "LlamaModel"
    sd = eoq.read_state_dict(tmp_path / "q")
    for n, t in model.state_dict().items():
        assert torch.equal(t, sd["model." + n]), n


def test_shards_that_do_not_match_their_index_are_refused_before_any_work(tmp_path):
    from safetensors.torch import load_file, save_file
    from tinymodels import build

    folder = tmp_path / "m"
    build("llama").save_pretrained(str(folder), max_shard_size="100KB")
    index = json.loads((folder / repo.INDEX).read_text())
    shard = folder / sorted(set(index["weight_map"].values()))[0]
    original = load_file(str(shard))
    out = tmp_path / "q"
    cfg = eoq.QuantConfig(calibration=None, awq=False)

    dropped = dict(original)
    gone = sorted(dropped)[0]
    del dropped[gone]
    save_file(dropped, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{shard.name}: does not match the shard index.*lacks 1 tensor.*{gone}"):
        eoq.quantize_model(folder, out, cfg, progress=False, verbose=False)

    save_file({**original, "stray.weight": torch.zeros(2)}, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{shard.name}: does not match.*holds 1 tensor.*stray.weight"):
        eoq.quantize_model(folder, out, cfg, progress=False, verbose=False)

    shard.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match=rf"{shard.name}: not a readable safetensors file"):
        eoq.quantize_model(folder, out, cfg, progress=False, verbose=False)
    assert not out.exists() and not (tmp_path / ".q.eoq-partial").exists()
