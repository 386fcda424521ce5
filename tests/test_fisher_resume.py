"""The block-by-block Fisher pass interrupted and run again (eoq.calibrate.fisher_checkpoint,
eoq.calibrate.stored_inputs): it goes on from the block it was in, and its sums are the uninterrupted
pass's bit for bit; a damaged state or stored input is refused by name."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eoq.calibrate import blockwise
from eoq.calibrate import fisher_blockwise
from eoq.calibrate import fisher_checkpoint
from eoq.calibrate import sensitivity
from eoq.format import sources
from eoq.calibrate import streamed_vocab
from eoq.calibrate.stored_inputs import StoredInputs
from tinymodels import save


class Interrupted(Exception):
    pass


def _seqs(n=3, length=40, base=0):
    return [torch.randint(3, 290, (length,), generator=torch.Generator().manual_seed(base + i)) for i in range(n)]


def _runner(src, loads: list, fail_at: int = -1):
    """A BlockRunner that records the blocks it loads and raises at load number ``fail_at``."""
    runner = blockwise.BlockRunner(src)
    real = runner.load_block

    def load_block(i):
        if len(loads) == fail_at:
            raise Interrupted(f"load {fail_at}")
        loads.append(i)
        return real(i)

    runner.load_block = load_block
    return runner


def _same(a, b) -> None:
    assert a.tokens == b.tokens
    assert a.fisher == b.fisher and a.fisher_w2 == b.fisher_w2 and a.mean_w2 == b.mean_w2
    assert a.rows.keys() == b.rows.keys() and all(torch.equal(a.rows[n], b.rows[n]) for n in a.rows)


def _interrupted(src, where: str, ck, monkeypatch, seqs) -> None:
    """A pass with ``checkpoint=ck`` stopped in its forward sweep (before block 1), in the tail
    (after the first sequence) or in the backward sweep (after block 1)."""
    loads = []
    runner = _runner(src, loads, {"forward": 1, "tail": -1, "backward": 3}[where])
    if where == "tail":
        calls = []
        real = sensitivity._backward_sampled_loglik

        def once(logits, gen):
            if calls:
                raise Interrupted("tail")
            calls.append(1)
            real(logits, gen)

        monkeypatch.setattr(sensitivity, "_backward_sampled_loglik", once)
    with pytest.raises(Interrupted):
        fisher_blockwise.fisher_pass_blockwise(runner, seqs, row_params=src.vocab, seed=3, checkpoint=ck)
    monkeypatch.undo()


@pytest.mark.parametrize("where", ["forward", "tail", "backward"])
@pytest.mark.parametrize("arch,stream", [("llama", False), ("qwen2", False), ("gpt2", False), ("llama", True),
                                         ("qwen2", True)])  # tied, untied, tied with positions; streamed
def test_resumed_pass_goes_on_from_its_block_and_gives_the_same_sums(tmp_path, monkeypatch, arch, stream, where):
    def streaming(mp):
        if stream:  # the head from its file in 7-row chunks, the embedding by its selected rows
            mp.setattr(streamed_vocab, "STREAM_VALUES", 0)
            mp.setattr(streamed_vocab, "ROWS_VALUES", 7 * src.config.hidden_size)

    src = sources.open_source(save(arch, tmp_path / "m"))
    seqs, ck = _seqs(), tmp_path / "fisher"
    with monkeypatch.context() as mp:
        streaming(mp)
        ref = fisher_blockwise.fisher_pass_blockwise(blockwise.BlockRunner(src), seqs, row_params=src.vocab, seed=3)
    streaming(monkeypatch)
    _interrupted(src, where, ck, monkeypatch, seqs)
    kept = sorted(p.name for p in (ck / "inputs").glob("block-*.pt"))
    assert kept == {"forward": ["block-00000.pt", "block-00001.pt"],
                    "tail": ["block-00000.pt", "block-00001.pt", "block-00002.pt"],
                    "backward": ["block-00000.pt"]}[where]
    assert (ck / "state.safetensors").is_file() == (where == "backward")
    streaming(monkeypatch)
    loads = []
    again = fisher_blockwise.fisher_pass_blockwise(_runner(src, loads), seqs, row_params=src.vocab, seed=3, checkpoint=ck)
    assert loads == {"forward": [1, 1, 0], "tail": [1, 0], "backward": [0]}[where]  # nothing done twice
    _same(again, ref)
    assert not ck.exists()


def test_a_state_of_other_sequences_is_not_used(tmp_path, monkeypatch):
    src = sources.open_source(save("qwen2", tmp_path / "m"))
    ck = tmp_path / "fisher"
    _interrupted(src, "backward", ck, monkeypatch, _seqs())
    other = _seqs(base=10)
    ref = fisher_blockwise.fisher_pass_blockwise(blockwise.BlockRunner(src), other, row_params=src.vocab, seed=3)
    loads = []
    again = fisher_blockwise.fisher_pass_blockwise(_runner(src, loads), other, row_params=src.vocab, seed=3,
                                              checkpoint=ck)
    assert loads == [0, 1, 1, 0]  # the whole pass
    _same(again, ref)


def _tensors(path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("damage", ["grad shape", "missing sum", "foreign tensor", "block index", "garbage",
                                    "stored input"])
def test_a_damaged_state_is_refused_by_name(tmp_path, monkeypatch, damage):
    src = sources.open_source(save("llama", tmp_path / "m"))
    ck, seqs = tmp_path / "fisher", _seqs()
    _interrupted(src, "backward", ck, monkeypatch, seqs)
    state = ck / "state.safetensors"
    t, meta = _tensors(state)
    match = "state.safetensors: the state of an interrupted Fisher pass"
    if damage == "grad shape":
        t["grad.1"] = t["grad.1"][:, :-1].contiguous()
    elif damage == "missing sum":
        del t[next(k for k in t if k.startswith("acc_w2."))]
    elif damage == "foreign tensor":
        t["acc.model.layers.9.mlp.up_proj.weight"] = torch.zeros((), dtype=torch.float64)
    elif damage == "block index":
        meta["next_block"] = "7"
    if damage == "garbage":
        state.write_bytes(b"\x08" + bytes(30))
    elif damage == "stored input":
        (ck / "inputs" / "block-00000.pt").write_bytes(b"not a pickle")
        match = r"block-00000.pt: stored inputs of block 0"
    else:
        save_file(t, str(state), metadata=meta)
    with pytest.raises(ValueError, match=match):
        fisher_blockwise.fisher_pass_blockwise(blockwise.BlockRunner(src), seqs, row_params=src.vocab, seed=3,
                                          checkpoint=ck)


def test_stored_inputs_kept_until_discarded_and_checked(tmp_path):
    xs = [torch.randn(3, 5, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with StoredInputs(tmp_path) as stored:  # temporary: removed however the pass ends
        stored.put(0, xs[:2])
        stored.put(1, xs[2:])
        (d,) = list(tmp_path.iterdir())
        assert all(torch.equal(a, b) for a, b in zip(stored.take(1), xs[2:]))
        assert all(torch.equal(a, b) for a, b in zip(stored.take(1), xs[2:]))  # read again: still there
        stored.discard(1)
        assert [p.name for p in d.iterdir()] == ["block-00000.pt"]
        with pytest.raises(KeyError):
            stored.take(1)
    assert not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError), StoredInputs(tmp_path) as stored:
        stored.put(0, xs)
        raise RuntimeError("a pass that fails")
    assert not list(tmp_path.iterdir())

    expect = [((3, 5), torch.float32)] * 2
    with pytest.raises(RuntimeError), StoredInputs(keep=tmp_path / "k", fingerprint="a", expect=expect) as stored:
        stored.put(0, xs[:2])
        raise RuntimeError("an interrupted pass")
    kept = StoredInputs(keep=tmp_path / "k", fingerprint="a", expect=expect)  # kept: read back by the next
    assert kept.has(0) and all(torch.equal(a, b) for a, b in zip(kept.take(0), xs[:2]))
    torch.save(xs[:1], tmp_path / "k" / "block-00001.pt")  # one tensor where two were stored
    with pytest.raises(ValueError, match="block-00001.pt: stored inputs of block 1"):
        kept.take(1)
    other = StoredInputs(keep=tmp_path / "k", fingerprint="b", expect=expect)  # other sequences: emptied
    assert not other.has(0) and not other.has(1)
    other.remove()
    assert not (tmp_path / "k").exists()


def test_fingerprint_follows_ids_blocks_and_seed():
    s = _seqs()
    f = fisher_checkpoint.fingerprint(s, 2, 3)
    assert f == fisher_checkpoint.fingerprint([x.clone() for x in s], 2, 3)
    changed = [s[0], s[1].index_fill(0, torch.tensor([5]), 1), s[2]]
    assert len({f, fisher_checkpoint.fingerprint(changed, 2, 3), fisher_checkpoint.fingerprint(s, 3, 3),
                fisher_checkpoint.fingerprint(s, 2, 4), fisher_checkpoint.fingerprint(s[:2], 2, 3)}) == 5


def test_a_conversion_resumes_its_fisher_pass_and_writes_the_same_bytes(tmp_path, monkeypatch):
    """Interrupted after the backward sweep's first block, the conversion (run again with
    another thread count) redoes neither the sampling, the statistics nor that block."""
    import eoq
    from eoq.calibrate import statistics as calibration
    from eoq.calibrate import sampling_blockwise
    from tinymodels import tokenizer

    folder = tokenizer(save("qwen2", tmp_path / "m"))
    cfg = eoq.QuantConfig(bits=3.5, calib_sequences=4, sensitivity_sequences=2)
    eoq.quantize_model(folder, tmp_path / "ref", cfg, progress=False, verbose=False)
    real_save = fisher_checkpoint.FisherCheckpoint.save

    def save_then_stop(self, state):
        real_save(self, state)
        if state.next_block == 0:
            raise Interrupted

    with monkeypatch.context() as mp:
        mp.setattr(fisher_checkpoint.FisherCheckpoint, "save", save_then_stop)
        with pytest.raises(Interrupted):
            eoq.quantize_model(folder, tmp_path / "out", cfg, progress=False, verbose=False)
    fisher = tmp_path / ".out.eoq-partial" / "fisher"
    assert (fisher / "state.safetensors").is_file()

    def redone(*args, **kwargs):
        raise AssertionError("a finished calibration stage ran again")

    monkeypatch.setattr(sampling_blockwise, "sample_ids", redone)
    monkeypatch.setattr(calibration, "collect_stats_blockwise", redone)
    loads = []
    real_load = blockwise.BlockRunner.load_block
    monkeypatch.setattr(blockwise.BlockRunner, "load_block", lambda self, i: loads.append(i) or real_load(self, i))
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before > 1 else 2)
    try:
        eoq.quantize_model(folder, tmp_path / "out", cfg, progress=False, verbose=False)
    finally:
        torch.set_num_threads(before)
    assert loads == [0]
    for f in ("model.safetensors", "quant_manifest.json"):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
