"""eoq.calibrate.sampling_blockwise: the default calibration text sampled with one block in memory is
the whole model's generate() sample, token for token."""

import pytest
import torch

from eoq.calibrate import blockwise
from eoq.calibrate import statistics as calibration
from eoq.format import sources
from tinymodels import save, tokenizer


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("stream_vocab", [False, True])
def test_block_by_block_sampling_is_generates(tmp_path, monkeypatch, arch, stream_vocab):
    from eoq.calibrate import sampling_blockwise
    from eoq.calibrate import streamed_vocab

    src = sources.open_source(tokenizer(save(arch, tmp_path / "m")))
    whole: list = []
    calibration.sample_text(src.load_model(), src.tokenizer, 3 * 12, seed=5, chunk=12, batch=3, ids_out=whole)
    if stream_vocab:  # the head in row chunks and the embedding by rows, from the file
        monkeypatch.setattr(streamed_vocab, "STREAM_VALUES", 0)
        monkeypatch.setattr(streamed_vocab, "ROWS_VALUES", 7 * src.config.hidden_size)
    runner = blockwise.BlockRunner(src)
    assert bool(runner.embeddings) == stream_vocab
    bos = src.tokenizer.bos_token_id if src.tokenizer.bos_token_id is not None else src.tokenizer.eos_token_id
    got = sampling_blockwise.sample_ids(runner, bos, 3, 12, seed=5)
    assert len(got) == 3 and all(g.shape == (13,) for g in got)
    for w, g in zip(whole, got):
        assert torch.equal(w, g)
    assert runner.pool is None  # the reused buffers go with the pass
    assert all(p.is_meta for p in runner.blocks.parameters())


def test_self_calibration_of_a_folder_runs_block_by_block(tmp_path, monkeypatch):
    # The default calibration of a folder never loads the model whole: it samples block by
    # block, and measures what the whole path measures on the same text (the statistics up to
    # float summation order: the whole path records them token by token while generating).
    import eoq
    from eoq.convert import calibration as convert

    folder = tokenizer(save("llama", tmp_path / "m"))
    config = eoq.QuantConfig(calib_sequences=3, calib_self_len=10, sensitivity_sequences=2)
    whole_src = sources.open_source(folder)
    (tmp_path / "whole").mkdir()
    whole_stats, whole_info, whole_sens = convert.calibrate(
        sources.ModelSource(whole_src.load_model(), whole_src.tokenizer), config, tmp_path / "whole", False)

    def refuse(self):
        raise AssertionError("the folder's model was loaded whole")

    monkeypatch.setattr(sources.FolderSource, "load_model", refuse)
    stats, info, sens = eoq.calibrate_model(folder, tmp_path / "blocks", config, progress=False)
    assert info["text_sha256_16"] == whole_info["text_sha256_16"]
    assert info["tokens"] == whole_info["tokens"] == 3 * 10
    assert list(stats) == list(whole_stats)
    for name, s in whole_stats.items():
        assert stats[name].count == s.count
        torch.testing.assert_close(stats[name].sum_sq, s.sum_sq, rtol=1e-4, atol=1e-6)
    assert sens.tokens == whole_sens.tokens == 2 * 11
    for name, f in whole_sens.fisher.items():
        assert sens.fisher[name] == pytest.approx(f, rel=1e-3), name
    assert not list((tmp_path / "blocks").glob("eoq-block-inputs-*"))  # the Fisher pass's files are gone
