"""eoq.calibrate.covariance_store: the block pass writes each block's input covariances to disk
as the block ends, the statistics hold handles, and everything downstream (saving, loading,
a conversion with error feedback) sees the same matrices bit for bit; a damaged or hostile
reference is refused by name."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import eoq
from eoq.calibrate import blockwise
from eoq.calibrate import statistics as calibration
from eoq.calibrate.covariance_store import StoredCovariance, outer_of
from eoq.format import sources
from tinymodels import save, tokenizer


def _seqs(n=3, length=40):
    return [torch.randint(3, 290, (length,), generator=torch.Generator().manual_seed(i)) for i in range(n)]


@pytest.fixture(scope="module")
def spilled(tmp_path_factory):
    """A tiny llama's statistics whole in memory and block by block with the covariances on disk."""
    root = tmp_path_factory.mktemp("cov")
    src = sources.open_source(save("llama", root / "m"))
    whole = calibration.collect_stats(src.load_model(), _seqs(), progress=False, covariance=True)
    stats = calibration.collect_stats_blockwise(blockwise.BlockRunner(src), _seqs(), progress=False,
                                                covariance=True, spill_to=root / "calib" / "cov")
    calibration.save_stats(stats, root / "calib" / "stats.safetensors")
    return root, whole, stats


def test_block_covariances_go_to_disk_and_read_back_exactly(spilled):
    root, whole, stats = spilled
    assert list(stats) == list(whole)
    for name, s in whole.items():
        b = stats[name]
        assert isinstance(b.sum_outer, StoredCovariance) == name.startswith("model.layers."), name
        assert torch.equal(outer_of(b.sum_outer), s.sum_outer), name
        assert torch.equal(b.hessian, s.hessian), name
    assert sorted(p.name for p in (root / "calib" / "cov").iterdir()) == [
        "model.layers.0.safetensors", "model.layers.1.safetensors"]
    q, k, v = (stats[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv")
    assert q.sum_outer is k.sum_outer is v.sum_outer  # one matrix on disk for one input
    with safe_open(q.sum_outer.path, framework="pt") as f:  # q/k/v, o, gate/up, down: 4 distinct inputs
        assert len(list(f.keys())) == 4


def test_saved_statistics_name_the_files_and_move_with_their_folder(spilled, tmp_path):
    root, whole, stats = spilled
    with safe_open(str(root / "calib" / "stats.safetensors"), framework="pt") as f:
        stored = json.loads(f.metadata()["stored"])
        assert not any(k.endswith(".sum_outer") and k.startswith("model.layers.") for k in f.keys())
    assert all(ref[0].startswith("cov/") for ref in stored.values())  # relative: the folder can move
    moved = tmp_path / "moved"
    shutil.copytree(root / "calib", moved)
    back = calibration.load_stats(moved / "stats.safetensors")
    assert back["model.layers.0.self_attn.k_proj"].sum_outer is back["model.layers.0.self_attn.q_proj"].sum_outer
    assert str(moved) in back["model.layers.0.mlp.down_proj"].sum_outer.path
    for name, s in whole.items():
        assert torch.equal(back[name].hessian, s.hessian), name
    # saved elsewhere, the matrices are copied beside the new file
    (tmp_path / "other").mkdir()
    calibration.save_stats(stats, tmp_path / "other" / "s.safetensors")
    assert sorted(p.name for p in (tmp_path / "other" / "s.safetensors.covariance").iterdir()) == [
        "model.layers.0.safetensors", "model.layers.1.safetensors"]
    again = calibration.load_stats(tmp_path / "other" / "s.safetensors")
    assert torch.equal(again["model.layers.1.mlp.down_proj"].hessian, whole["model.layers.1.mlp.down_proj"].hessian)


def _with_reference(path, module, ref):
    """Rewrite the statistics file at `path` so that `module`'s covariance reference is `ref`."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    stored = json.loads(meta["stored"])
    stored[module] = ref
    save_file(tensors, str(path), metadata={**meta, "stored": json.dumps(stored)})


@pytest.mark.parametrize("case, match", [
    ("escape", "points outside its folder"),
    ("absolute", "points outside its folder"),
    ("missing", "is missing"),
    ("key", "no tensor"),
    ("shape", r"has shape \[64, 64\] and dtype F64, expected \[352, 352\]"),
    ("truncated", "unreadable"),
    ("malformed", "malformed"),
])
def test_a_damaged_or_hostile_reference_is_refused_by_name(spilled, tmp_path, case, match):
    folder = tmp_path / "calib"
    shutil.copytree(spilled[0] / "calib", folder)
    path = folder / "stats.safetensors"
    module = "model.layers.1.mlp.down_proj"
    down = folder / "cov" / "model.layers.1.safetensors"
    if case == "escape":
        _with_reference(path, module, ["../../etc/passwd", module])
    elif case == "absolute":
        _with_reference(path, module, [str(down.absolute()), module])
    elif case == "missing":
        down.unlink()
    elif case == "key":
        _with_reference(path, module, ["cov/model.layers.1.safetensors", "model.layers.1.mlp.nothing"])
    elif case == "shape":
        save_file({module: torch.zeros(64, 64, dtype=torch.float64)}, str(down))
    elif case == "truncated":
        down.write_bytes(down.read_bytes()[:1000])
    else:
        _with_reference(path, module, {"file": "cov/x"})
    with pytest.raises(ValueError, match=match) as e:
        calibration.load_stats(path)
    assert str(path) in str(e.value) and "down_proj" in str(e.value)


def test_a_conversion_with_feedback_reads_each_matrix_from_disk(tmp_path, monkeypatch):
    """A folder's calibration keeps handles, not matrices; converting on them gives the bytes a
    conversion on the same matrices held in memory gives."""
    folder = tokenizer(save("llama", tmp_path / "m"))
    text = tmp_path / "calib.txt"
    text.write_text("Some calibration text for a tiny model, over and over. " * 60)
    cfg = eoq.QuantConfig(bits=4, calibration=str(text), calib_sequences=2, calib_seq_len=32,
                          sensitivity_sequences=1, feedback="gptq")
    stats, _, sens = eoq.calibrate_model(folder, tmp_path / "calib", cfg, progress=False)
    on_disk = [n for n, s in stats.items() if isinstance(s.sum_outer, StoredCovariance)]
    assert len(on_disk) == 2 * 7  # every Linear of both blocks; the head's stays in memory
    loads = []
    real = StoredCovariance.load
    monkeypatch.setattr(StoredCovariance, "load", lambda self: loads.append(self.key) or real(self))
    a = eoq.quantize_model(folder, tmp_path / "a", cfg, stats=stats, sensitivity=sens, progress=False, verbose=False)
    assert {e["meta"].get("feedback") for n, e in a["tensors"].items() if n.startswith("model.layers.")
            and e.get("method")} == {"gptq"}
    assert len(loads) >= len(on_disk)
    held = {n: calibration.ActStats(s.sum_sq, s.sum, s.count, outer_of(s.sum_outer)) for n, s in stats.items()}
    b = eoq.quantize_model(folder, tmp_path / "b", cfg, stats=held, sensitivity=sens, progress=False, verbose=False)
    assert a["tensors"] == b["tensors"]
    for f in sorted((tmp_path / "a").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
