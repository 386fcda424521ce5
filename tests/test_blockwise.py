"""eoq.calibrate.blockwise: a model run one block at a time from its files gives the statistics of the
whole model's forward pass bit for bit, with one block in memory at a time."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from eoq.calibrate import blockwise
from eoq.calibrate import fisher_blockwise
from eoq.calibrate import statistics as calibration
from eoq.format import sources
from tinymodels import save


def _seqs(vocab=290, n=3, length=40):
    return [torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(i)) for i in range(n)]


@pytest.mark.parametrize("stream_head", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_statistics_equal_the_whole_models(tmp_path, monkeypatch, arch, stream_head):
    from eoq.calibrate import streamed_vocab

    src = sources.open_source(save(arch, tmp_path / "m"))
    seqs = _seqs()
    whole = calibration.collect_stats(src.load_model(), seqs, progress=False, covariance=True)
    if stream_head:  # the head run from its file in row chunks: its input's statistics unchanged
        monkeypatch.setattr(streamed_vocab, "STREAM_VALUES", 0)
        monkeypatch.setattr(streamed_vocab, "ROWS_VALUES", 5 * src.config.hidden_size)
    runner = blockwise.BlockRunner(src)
    assert (runner.head is not None) == stream_head
    blocks = calibration.collect_stats_blockwise(runner, seqs, progress=False, covariance=True)
    assert list(blocks) == list(whole)  # every Linear, the head included, in the model's order
    for name, s in whole.items():
        b = blocks[name]
        assert b.count == s.count == 3 * 40, name
        for field in ("sum_sq", "sum", "sum_outer"):
            assert torch.equal(getattr(b, field), getattr(s, field)), (name, field)
    if arch == "llama":  # one matrix per distinct input, as in the whole-model pass
        q, k, v = (blocks[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv")
        assert q.sum_outer is k.sum_outer is v.sum_outer


def test_one_block_in_memory_at_a_time(tmp_path):
    src = sources.open_source(save("llama", tmp_path / "m"))
    runner = blockwise.BlockRunner(src)
    assert runner.blocks_name == "model.layers"
    seen = []

    def on_block(name, block):
        live = [i for i, b in enumerate(runner.blocks) if any(p.device.type != "meta" for p in b.parameters())]
        seen.append((name, live))
        return torch.no_grad()

    runner.run(_seqs(n=2), on_block=on_block)
    assert seen == [("model.layers.0", [0]), ("model.layers.1", [1])]
    assert all(p.device.type == "meta" for p in runner.blocks.parameters())  # dropped after its run


def test_a_model_without_blocks_is_refused_by_name():
    with pytest.raises(blockwise.NoBlocks, match="Sequential"):
        blockwise.find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)))


def test_a_block_missing_from_the_files_is_named(tmp_path):
    folder = save("llama", tmp_path / "m")
    weights = load_file(str(folder / "model.safetensors"))
    key = "model.layers.1.mlp.up_proj.weight"
    del weights[key]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    src = sources.open_source(folder)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        calibration.collect_stats_blockwise(blockwise.BlockRunner(src), _seqs(n=1), progress=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # tied, untied, tied with positions
def test_fisher_pass_equals_the_whole_models(tmp_path, arch):
    from eoq.calibrate import sensitivity

    src = sources.open_source(save(arch, tmp_path / "m"))
    seqs = _seqs()
    whole = sensitivity.fisher_pass(src.load_model(), seqs, row_params=src.vocab, seed=3)
    runner = blockwise.BlockRunner(src)
    loaded = []
    load = runner.load_block

    def spy(i):
        live = [j for j, b in enumerate(runner.blocks) if any(p.device.type != "meta" for p in b.parameters())]
        loaded.append((i, live))
        return load(i)

    runner.load_block = spy
    blocks = fisher_blockwise.fisher_pass_blockwise(runner, seqs, row_params=src.vocab, seed=3)
    assert [i for i, _ in loaded] == [0, 1, 1, 0] and all(live == [] for _, live in loaded)  # forward, backward
    assert blocks.tokens == whole.tokens
    assert blocks.fisher.keys() == whole.fisher.keys() and blocks.rows.keys() == whole.rows.keys()
    for n in whole.fisher:  # the same sums up to the order of float additions (rounded to 9 digits)
        assert blocks.fisher[n] == pytest.approx(whole.fisher[n], rel=1e-7), n
        assert blocks.fisher_w2[n] == pytest.approx(whole.fisher_w2[n], rel=1e-7), n
        assert blocks.mean_w2[n] == whole.mean_w2[n], n
    for n in whole.rows:
        torch.testing.assert_close(blocks.rows[n], whole.rows[n], rtol=1e-7, atol=0)
    if arch != "qwen2":  # a tied matrix: its two roles' gradients added before squaring
        assert len(runner.tied) == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # tied, untied, tied with positions
def test_fisher_pass_with_streamed_vocabulary_matrices(tmp_path, monkeypatch, arch):
    # The head run from its file in row chunks, its weight gradient never formed, and the
    # embedding by the rows its tokens select (eoq.calibrate.streamed_vocab): the same sums as the whole
    # model's within float32 rounding (x's gradient is added chunk after chunk), here with
    # 7-row chunks.
    from eoq.calibrate import sensitivity
    from eoq.calibrate import streamed_vocab

    src = sources.open_source(save(arch, tmp_path / "m"))
    seqs = _seqs()
    whole = sensitivity.fisher_pass(src.load_model(), seqs, row_params=src.vocab, seed=3)
    hidden = src.config.hidden_size
    monkeypatch.setattr(streamed_vocab, "STREAM_VALUES", 0)
    monkeypatch.setattr(streamed_vocab, "ROWS_VALUES", 7 * hidden)
    monkeypatch.setattr(sensitivity, "CHUNK_ELEMENTS", 7 * hidden)
    runner = blockwise.BlockRunner(src)
    assert runner.head is not None
    head = runner.model.get_submodule(runner.head)
    chunks = []
    real = streamed_vocab._Head.backward

    def spy(ctx, g):
        on_grad = ctx.on_grad
        ctx.on_grad = lambda r0, gw, w: chunks.append(gw.shape[0]) or on_grad(r0, gw, w)
        return real(ctx, g)

    monkeypatch.setattr(streamed_vocab._Head, "backward", staticmethod(spy))
    blocks = fisher_blockwise.fisher_pass_blockwise(runner, seqs, row_params=src.vocab, seed=3)
    assert chunks and max(chunks) == 7 and sum(chunks) == 3 * head.out_features  # 3 sequences
    embedding = runner.model.get_input_embeddings()
    assert next(n for n, m in runner.model.named_modules() if m is embedding) in runner.embeddings  # (gpt2: wpe too)
    assert head.weight.is_meta and embedding.weight.is_meta  # neither module's own weight was ever read
    for n in whole.fisher:
        assert blocks.fisher[n] == pytest.approx(whole.fisher[n], rel=1e-5), n
        assert blocks.fisher_w2[n] == pytest.approx(whole.fisher_w2[n], rel=1e-5), n
        assert blocks.mean_w2[n] == whole.mean_w2[n], n
    for n in whole.rows:
        torch.testing.assert_close(blocks.rows[n], whole.rows[n], rtol=1e-5, atol=0)


def test_calibration_holds_one_vocabulary_matrix_at_a_time(tmp_path, monkeypatch):
    # Both passes (statistics, Fisher) run on one BlockRunner, which reads a module outside the
    # blocks when it runs and drops it when the pass that ran it ends: the embedding (tied to
    # the head here, so read under both names) is never held while the head is, nor a block
    # while either is. Each read is a pass that needs it: the embedding in the two captures
    # and the Fisher pass's embedding step, the head in the two tails.
    import eoq
    from eoq.convert import calibration as convert
    from tinymodels import tokenizer

    folder = tokenizer(save("llama", tmp_path / "m"))
    text = tmp_path / "calib.txt"
    text.write_text("Some calibration text for a tiny model, over and over. " * 60)
    built = []
    real_runner = convert.block_runner
    monkeypatch.setattr(convert, "block_runner", lambda *a, **k: built.append(real_runner(*a, **k)) or built[-1])
    reads, held = [], []
    real_get = sources.FolderSource.get

    def get(self, name):
        model = built[-1].model
        held.append((name, [n for n, p in model.named_parameters(remove_duplicate=False)  # (a placeholder
                            if not p.is_meta and p.untyped_storage().nbytes() >= p.nbytes]))  # holds one value)
        reads.append(name)
        return real_get(self, name)

    monkeypatch.setattr(sources.FolderSource, "get", get)
    stats, info, sens = convert.calibrate_model(folder, tmp_path / "calib", eoq.QuantConfig(
        calibration=str(text), calib_sequences=2, calib_seq_len=32, sensitivity_sequences=1), progress=False)
    assert sens.tokens > 0 and stats
    assert len(built) == 1
    assert reads.count("model.embed_tokens.weight") == 3
    assert reads.count("lm_head.weight") == 2
    for name, real in held:
        vocab = {"model.embed_tokens.weight", "lm_head.weight"} & set(real)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # neither the other one nor a block
            assert not vocab and not any(n.startswith("model.layers.") for n in real), (name, real)
        if name.startswith("model.layers."):
            assert not vocab, (name, real)


def test_calibration_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    import eoq
    from eoq.convert import calibration as convert
    from tinymodels import tokenizer

    folder = tokenizer(save("llama", tmp_path / "m"))
    text = tmp_path / "calib.txt"
    text.write_text("Some calibration text for a tiny model, over and over. " * 60)
    cfg = eoq.QuantConfig(calibration=str(text), calib_sequences=2, calib_seq_len=32, sensitivity_sequences=1,
                          feedback="gptq")
    built = []
    monkeypatch.setattr(blockwise.BlockRunner, "__init__", lambda *a, **k: built.append(1) or 1 / 0)
    monkeypatch.setenv(blockwise.MEMORY_ENV, "64K")
    with pytest.raises(MemoryError, match=r"calibration needs about .* GiB \(the process itself .*modules outside the blocks.*"
                                          r"input covariances .* the budget is 0.00 GiB \(EOQ_MEMORY_BUDGET"):
        convert.calibrate_model(folder, tmp_path / "calib", cfg, progress=False)
    assert not built  # refused before a single weight was read
    monkeypatch.setenv(blockwise.MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match="EOQ_MEMORY_BUDGET='lots': expected a number of bytes"):
        convert.calibrate_model(folder, tmp_path / "calib", cfg, progress=False)


def test_calibration_memory_estimate_by_part(tmp_path, monkeypatch):
    from eoq.calibrate import streamed_vocab
    from tinymodels import build

    config = sources.open_source(save("llama", tmp_path / "m")).config
    base = blockwise.calibration_memory(config, tokens=1000, seq_len=100, fisher_tokens=0, covariance=False)
    more = blockwise.calibration_memory(config, tokens=2000, seq_len=100, fisher_tokens=500, covariance=True)
    h = config.hidden_size
    assert more["hidden states of the calibration sequences"] == 2 * base["hidden states of the calibration sequences"]
    assert more["the Fisher pass's stored inputs of one block (the rest on disk)"] == 4 * 500 * h
    cov = [v for k, v in more.items() if k.startswith("input covariances for error feedback: one block's")]
    assert len(cov) == 1 and len(base) == len(more) - 1
    # one block's four distinct inputs (counted per Linear: q, k, v, o, gate, up read hidden-wide
    # inputs, down the intermediate) and the head's; the other block's are on disk
    assert cov[0] == 8 * (6 * h * h + config.intermediate_size ** 2) + 8 * h * h
    sampled = blockwise.calibration_memory(config, tokens=1000, seq_len=100, fisher_tokens=0, covariance=False,
                                           cache_tokens=1000)
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    assert sampled["the sampled text's key/value cache and one step's logits (float32)"] == 4 * (
        2 * config.num_hidden_layers * 1000 * kv + 3 * 10 * config.vocab_size)
    grad = "the largest one's gradient in the Fisher pass"
    model = build("llama")
    vocab = model.model.embed_tokens.weight.numel()  # the tiny llama's embedding and head (tied: counted twice)
    assert base[grad] == 0 and more[grad] == 4 * vocab
    outside = sum(p.numel() for n, p in model.named_parameters(remove_duplicate=False) if ".layers." not in n)
    assert base["modules outside the blocks read whole, one vocabulary matrix at a time (float32)"] == \
        4 * (outside - vocab)
    monkeypatch.setattr(streamed_vocab, "STREAM_VALUES", 0)  # both streamed: neither held, nor a gradient
    streamed = blockwise.calibration_memory(config, tokens=2000, seq_len=100, fisher_tokens=500, covariance=False)
    norms = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n and p.dim() == 1)
    assert streamed["modules outside the blocks read whole, one vocabulary matrix at a time (float32)"] == 4 * norms
    assert streamed[grad] == 4 * norms


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied, untied
def test_fisher_pass_keeps_block_inputs_on_disk_and_releases_the_head(tmp_path, monkeypatch, arch):
    # Each block's inputs go to a file under runner.scratch between the two sweeps, and the
    # streamed head (a memory map) is gone once its pass ends, before the blocks run backward.
    import gc
    import weakref

    from eoq.calibrate import streamed_vocab
    from eoq.calibrate.stored_inputs import StoredInputs

    monkeypatch.setattr(streamed_vocab, "STREAM_VALUES", 0)
    src = sources.open_source(save(arch, tmp_path / "m"))
    runner = blockwise.BlockRunner(src, scratch=tmp_path / "scratch")
    (tmp_path / "scratch").mkdir()
    puts, heads, backward_loads = [], [], []
    real_put, real_get, real_load = StoredInputs.put, sources.FolderSource.get, runner.load_block

    def put(self, i, tensors):
        real_put(self, i, tensors)
        puts.append(len(list((tmp_path / "scratch").rglob("block-*.pt"))))

    def get(self, name):
        t = real_get(self, name)
        if name == "lm_head.weight":
            heads.append(weakref.ref(t))
        return t

    def load_block(i):
        if len(backward_loads) or len(puts) == len(runner.blocks) + 1 and heads:
            backward_loads.append(all(r() is None for r in heads))
        return real_load(i)

    monkeypatch.setattr(StoredInputs, "put", put)
    monkeypatch.setattr(sources.FolderSource, "get", get)
    monkeypatch.setattr(runner, "load_block", load_block)
    gc.disable()  # the head must be released by the pass itself, not by a collection that happens to run
    try:
        sens = fisher_blockwise.fisher_pass_blockwise(runner, _seqs(n=2), row_params=src.vocab, seed=3)
    finally:
        gc.enable()
    assert sens.tokens == 80
    assert puts == list(range(1, len(runner.blocks) + 2))  # every block's input, and the tail's
    assert heads and backward_loads == [True] * len(runner.blocks)
    assert not list((tmp_path / "scratch").iterdir())


def test_streamed_head_gives_its_weight_gradient_by_chunks_and_lets_go_of_the_weight():
    import weakref

    from eoq.calibrate import streamed_vocab

    g = torch.Generator().manual_seed(0)
    w = torch.randn(23, 8, generator=g).to(torch.bfloat16)
    x = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    chunks = []
    out = streamed_vocab.head_logits(x, w, lambda r0, gw, wc: chunks.append((r0, gw.clone())), torch.float32)
    torch.testing.assert_close(out, x @ w.float().t())
    up = torch.randn(out.shape, generator=g)
    (out * up).sum().backward()
    assert [r0 for r0, _ in chunks] == [0]  # 23 rows of 8 values: one chunk of ROWS_VALUES
    torch.testing.assert_close(chunks[0][1], up.reshape(-1, 23).t() @ x.detach().reshape(-1, 8))
    torch.testing.assert_close(x.grad, up @ w.float())
    ref = weakref.ref(w)
    del w
    assert ref() is None  # the graph (still held through `out`) does not keep the weight
    with pytest.raises(RuntimeError, match="backpropagated through twice"):
        out.grad_fn.apply(torch.ones_like(out))
