"""Block-by-block sampling interrupted and run again (eoq.calibrate.sampling_checkpoint): it goes on
from the last kept token and samples the uninterrupted run's tokens; a kept state of
another run is ignored, a damaged one refused by name."""

import pytest
import torch

from eoq.calibrate import blockwise
from eoq.calibrate import sampling_blockwise
from eoq.calibrate import sampling_checkpoint
from eoq.format import sources
from tinymodels import save, tokenizer


class Interrupted(Exception):
    pass


def _bos(src) -> int:
    t = src.tokenizer
    return t.bos_token_id if t.bos_token_id is not None else t.eos_token_id


def _stop_after(mp, steps: int) -> None:
    """Sampling patched to keep its state after every token and to stop in step ``steps`` + 1."""
    real, done = sampling_blockwise._step, []

    def step(*args):
        if len(done) == steps:
            raise Interrupted
        done.append(1)
        return real(*args)

    mp.setattr(sampling_checkpoint, "CHECKPOINT_SECONDS", 0.0)
    mp.setattr(sampling_blockwise, "_step", step)


def _interrupted_after(src, steps: int, path, monkeypatch, **run) -> None:
    with monkeypatch.context() as mp:
        _stop_after(mp, steps)
        with pytest.raises(Interrupted):
            sampling_blockwise.sample_ids(blockwise.BlockRunner(src), _bos(src), checkpoint=path, **run)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_resumed_sampling_gives_the_same_tokens(tmp_path, monkeypatch, arch):
    src = sources.open_source(tokenizer(save(arch, tmp_path / "m")))
    run = dict(n_sequences=3, length=9, seed=5)
    ref = sampling_blockwise.sample_ids(blockwise.BlockRunner(src), _bos(src), **run)
    path = tmp_path / "sampling.pt"
    _interrupted_after(src, 4, path, monkeypatch, **run)
    kept = torch.load(path, weights_only=True)
    assert kept["ids"].shape == (3, 5) and torch.equal(kept["ids"], torch.stack(ref)[:, :5])
    steps = []
    real = sampling_blockwise._step
    monkeypatch.setattr(sampling_blockwise, "_step", lambda *a: steps.append(a[2]) or real(*a))
    rng = torch.get_rng_state()
    got = sampling_blockwise.sample_ids(blockwise.BlockRunner(src), _bos(src), checkpoint=path, **run)
    assert steps == list(range(5, 10))  # from the kept tokens on: tokens 5..9 seen
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's generator left alone


def test_a_state_of_another_run_is_ignored(tmp_path, monkeypatch):
    src = sources.open_source(tokenizer(save("llama", tmp_path / "m")))
    path = tmp_path / "sampling.pt"
    _interrupted_after(src, 3, path, monkeypatch, n_sequences=3, length=9, seed=5)
    run = dict(n_sequences=3, length=9, seed=6)
    ref = sampling_blockwise.sample_ids(blockwise.BlockRunner(src), _bos(src), **run)
    got = sampling_blockwise.sample_ids(blockwise.BlockRunner(src), _bos(src), checkpoint=path, **run)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("damage", ["cache length", "layers", "ids", "bos", "rng", "garbage"])
def test_a_damaged_state_is_refused_by_name(tmp_path, monkeypatch, damage):
    src = sources.open_source(tokenizer(save("llama", tmp_path / "m")))
    path = tmp_path / "sampling.pt"
    run = dict(n_sequences=3, length=9, seed=5)
    _interrupted_after(src, 4, path, monkeypatch, **run)
    s = torch.load(path, weights_only=True)
    if damage == "cache length":
        s["keys"][1] = s["keys"][1][:, :, :-1]
    elif damage == "layers":
        s["values"].pop()
    elif damage == "ids":
        s["ids"][0, 2] = 10 ** 6
    elif damage == "bos":
        s["ids"][1, 0] += 1
    elif damage == "rng":
        s["rng"] = s["rng"][:10]
    torch.save(s, path)
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match="sampling.pt: the state of interrupted calibration sampling"):
        sampling_blockwise.sample_ids(blockwise.BlockRunner(src), _bos(src), checkpoint=path, **run)


def test_a_conversion_resumes_sampling_and_writes_the_same_bytes(tmp_path, monkeypatch):
    import eoq

    folder = tokenizer(save("qwen2", tmp_path / "m"))
    cfg = eoq.QuantConfig(bits=3.5, calib_sequences=4, calib_self_len=12, sensitivity_sequences=2)
    eoq.quantize_model(folder, tmp_path / "ref", cfg, progress=False, verbose=False)
    with monkeypatch.context() as mp:
        _stop_after(mp, 6)
        with pytest.raises(Interrupted):
            eoq.quantize_model(folder, tmp_path / "out", cfg, progress=False, verbose=False)
    partial = tmp_path / ".out.eoq-partial"
    assert torch.load(partial / "calib_sampling.pt", weights_only=True)["ids"].shape == (4, 7)
    seen, real = [], sampling_blockwise._step
    monkeypatch.setattr(sampling_blockwise, "_step", lambda *a: seen.append(a[2]) or real(*a))
    eoq.quantize_model(folder, tmp_path / "out", cfg, progress=False, verbose=False)
    assert seen[0] == 7  # sampling went on from the kept tokens
    for f in ("model.safetensors", "quant_manifest.json"):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    assert not partial.exists()
