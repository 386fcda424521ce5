"""A model loaded from an eoq folder saves like any other (``save_pretrained``), and ``eoq decode``
writes the same plain folder from the files: both load with transformers alone, in a process
that never imports eoq, bit for bit the eoq-loaded model. Tiny Llama (tied head) and Qwen2
(untied), converted once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import eoq
from eoq import cli
from eoq.load.decode import decode_folder

from tinymodels import save, tokenizer

ARCHS = ("llama", "qwen2")  # tied, untied
IDS = [[1, 5, 7, 11, 13, 17, 19, 23]]
PLAIN = {"llama": ["saved", "decoded", "detached", "decoded-f16"], "qwen2": ["saved", "decoded"]}

# Loads every plain folder with transformers alone and writes its tensors and logits beside it.
CHECK = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
out = {}
for folder in sys.argv[1:]:
    m = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = m(torch.tensor(%r)).logits
    tensors = {k: v.clone() for k, v in m.state_dict().items()}
    save_file({**tensors, "__logits__": logits}, folder + ".check.safetensors")
    out[folder] = {"dtype": str(m.dtype), "tied": m.lm_head.weight is m.get_input_embeddings().weight}
out["eoq imported"] = "eoq" in sys.modules
print(json.dumps(out))
""" % (IDS,)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Per arch: the eoq folder, the eoq-loaded model's tensors and logits, and the plain
    folders written from it (save_pretrained, eoq decode, a save with the quantizer detached by
    hand, a float16 decode in shards), each loaded by transformers alone in one subprocess."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("decode")
    cfg = eoq.QuantConfig(method="ecsq", bits=3.5, calibration=None, awq=False)
    out = {}
    for arch in ARCHS:
        d = root / arch
        src = save(arch, d / "src")
        tokenizer(src)
        eoq.quantize_model(src, d / "q", cfg, progress=False, verbose=False)
        model = AutoModelForCausalLM.from_pretrained(d / "q")
        r = {"q": d / "q", "state": {k: v.clone() for k, v in model.state_dict().items()}, "logits": logits(model)}
        model.save_pretrained(d / "saved")
        r["after save"] = (getattr(model, "hf_quantizer", None), hasattr(model.config, "quantization_config"),
                           logits(model))
        r["decode rc"] = cli.main(["decode", str(d / "q"), "-o", str(d / "decoded")])
        if arch == "llama":
            model = AutoModelForCausalLM.from_pretrained(d / "q")
            model.hf_quantizer = None  # detached by hand: transformers reverses eoq's conversions itself
            del model.config.quantization_config
            model.save_pretrained(d / "detached")
            model = AutoModelForCausalLM.from_pretrained(d / "q", dtype=torch.float16)
            r["state f16"], r["logits f16"] = dict(model.state_dict()), logits(model)
            decode_folder(d / "q", d / "decoded-f16", dtype="float16", max_shard_size=100_000)
        out[arch] = r
    folders = [str(root / arch / kind) for arch in ARCHS for kind in PLAIN[arch]]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", CHECK, *folders], capture_output=True, text=True, env=env, cwd=root)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report.pop("eoq imported") is False
    for arch in ARCHS:
        out[arch]["plain"] = {kind: (report[str(root / arch / kind)],
                                     load_file(str(root / arch / kind) + ".check.safetensors"))
                              for kind in PLAIN[arch]}
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_writes_a_plain_folder(made, arch):
    r = made[arch]
    saved = r["q"].parent / "saved"
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    cfg = json.loads((saved / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    stored = load_file(saved / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    assert not any(k.endswith(("codes", "steps", "scales")) for k in stored)
    for k, t in stored.items():
        assert torch.equal(t, r["state"][k]), k
    # the quantizer let go of the model, which computes as before
    hf_quantizer, has_qc, after = r["after save"]
    assert hf_quantizer is None and not has_qc and torch.equal(after, r["logits"])


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_folders_load_without_eoq_bit_identical(made, arch):
    r = made[arch]
    for kind in ("saved", "decoded") + (("detached",) if arch == "llama" else ()):
        info, tensors = r["plain"][kind]
        assert info["dtype"] == "torch.bfloat16", kind
        assert torch.equal(tensors.pop("__logits__"), r["logits"]), kind
        assert tensors.keys() == r["state"].keys(), kind
        for k, t in tensors.items():
            assert torch.equal(t, r["state"][k]), (kind, k)


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_models_keep_their_tie(made, arch):
    r = made[arch]
    tied = arch == "llama"
    for kind in PLAIN[arch]:
        folder = r["q"].parent / kind
        names = set()
        for f in folder.glob("*.safetensors"):
            names |= set(load_file(f))
        assert ("lm_head.weight" not in names) == tied, kind
        assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] == tied, kind
        assert r["plain"][kind][0]["tied"] == tied, kind
    if not tied:
        assert not torch.equal(r["state"]["lm_head.weight"], r["state"]["model.embed_tokens.weight"])


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_writes_what_save_pretrained_writes(made, arch):
    d = made[arch]["q"].parent
    assert made[arch]["decode rc"] == 0
    assert (d / "decoded" / "model.safetensors").read_bytes() == (d / "saved" / "model.safetensors").read_bytes()
    config = {kind: json.loads((d / kind / "config.json").read_text()) for kind in ("decoded", "saved")}
    assert config["decoded"] == config["saved"]
    names = {p.name for p in (d / "decoded").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert not names & {"quant_manifest.json", "load_quantized.py", "README.md"}
    mode = (d / "decoded" / "config.json").stat().st_mode
    assert (d / "decoded" / "model.safetensors").stat().st_mode == mode  # readable as the other files are
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_float16_decode_in_shards(made):
    r = made["llama"]
    folder = r["q"].parent / "decoded-f16"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and files == sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert not (folder / "model.safetensors").exists()
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    info, tensors = r["plain"]["decoded-f16"]
    assert info["dtype"] == "torch.float16" and info["tied"]
    assert torch.equal(tensors.pop("__logits__"), r["logits f16"])
    for k, t in tensors.items():
        assert t.dtype == torch.float16 and torch.equal(t, r["state f16"][k]), k
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for k, t in tensors.items() if k != "lm_head.weight")


def test_dequantize_detaches_and_the_model_saves(made, tmp_path):
    from transformers import AutoModelForCausalLM

    r = made["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(r["q"]).dequantize()
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "s")
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == \
        (r["q"].parent / "saved" / "model.safetensors").read_bytes()


def test_decode_cli_errors(made, tmp_path, capsys):
    q = made["llama"]["q"]
    with pytest.raises(SystemExit) as e:
        cli.main(["decode", str(q), "-o", str(tmp_path / "x"), "--dtype", "int8"])
    assert e.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dtype 'int8': expected one of bfloat16, float16, float32"):
        decode_folder(q, tmp_path / "x", dtype="int8")
    existing = tmp_path / "existing"
    existing.mkdir()
    cases = {str(existing): "already exists",  # an existing output
             str(q / "sub"): "must lie outside the eoq folder"}
    for out, message in cases.items():
        assert cli.main(["decode", str(q), "-o", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("eoq decode: error: ") and out in err and message in err, err
    plain = q.parent / "saved"  # a plain folder is no eoq folder
    assert cli.main(["decode", str(plain), "-o", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert str(plain) in err and "quant_manifest.json" in err
    assert cli.main(["decode", str(tmp_path / "missing"), "-o", str(tmp_path / "y")]) == 2
    assert "no such folder" in capsys.readouterr().err
    damaged = tmp_path / "damaged"  # a flipped byte: refused before anything is written
    shutil.copytree(q, damaged)
    with open(damaged / "model.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    assert cli.main(["decode", str(damaged), "-o", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert str(damaged / "model.safetensors") in err and "checksum" in err, err
    shutil.rmtree(damaged)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"] and not list(existing.iterdir())
    # --overwrite replaces the folder, and the command says in one line what it wrote
    assert cli.main(["decode", str(q), "-o", str(existing), "--overwrite", "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"wrote {existing}: a plain Hugging Face folder in float32, which loads without eoq"]
    stored = load_file(existing / "model.safetensors")
    assert torch.equal(stored["model.norm.weight"], made["llama"]["state"]["model.norm.weight"].float())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
