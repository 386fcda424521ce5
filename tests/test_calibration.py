"""Calibration statistics: hooks against a hand computation, file round trip, text sources."""

import pytest
import torch
import transformers

from eoq.calibrate import statistics as calibration


@pytest.fixture(scope="module")
def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


class CharTokenizer:
    """Bytes as tokens: enough of a tokenizer for these tests."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + b for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode(errors="replace")


def test_stats_match_a_hand_computation(tiny_llama):
    seqs = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (17, 40)]
    stats = calibration.collect_stats(tiny_llama, seqs, progress=False)
    assert len(stats) == 2 * 7 + 1  # 7 Linears a layer, plus lm_head
    seen = []
    h = tiny_llama.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0]))
    with torch.no_grad():
        for s in seqs:
            tiny_llama(input_ids=s[None])
    h.remove()
    a = torch.cat(seen).double()
    st = stats["model.layers.1.mlp.down_proj"]
    assert st.count == 57
    torch.testing.assert_close(st.sum_sq, a.pow(2).sum(0))
    torch.testing.assert_close(st.sum, a.sum(0))
    torch.testing.assert_close(st.mean_sq, a.pow(2).mean(0).float())


def test_include_filter(tiny_llama):
    stats = calibration.collect_stats(tiny_llama, [torch.arange(3, 20)], include=lambda n: n.endswith("down_proj"),
                                      progress=False)
    assert sorted(stats) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_save_and_load_round_trip(tiny_llama, tmp_path):
    stats = calibration.collect_stats(tiny_llama, [torch.arange(3, 50)], progress=False)
    path = tmp_path / "stats.safetensors"
    calibration.save_stats(stats, path, source="unit test")
    back = calibration.load_stats(path)
    assert back.keys() == stats.keys()
    for k in stats:
        assert torch.equal(back[k].sum_sq, stats[k].sum_sq) and back[k].count == stats[k].count
    assert not list(tmp_path.glob("*.tmp"))


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an eoq activation-statistics file"):
        calibration.load_stats(tmp_path / "other.safetensors")


def test_text_sources(tmp_path, tiny_llama):
    p = tmp_path / "calib.txt"
    p.write_text("def f(x):\n    return x\n" * 50)
    assert calibration.load_text(str(p)).startswith("def f")
    wiki = tmp_path / "wiki.test.raw"
    wiki.write_text("evaluation text")
    with pytest.raises(ValueError, match="evaluation text"):
        calibration.load_text(str(wiki))
    with pytest.raises(ValueError, match="evaluation text"):
        calibration.load_text("wikitext:wikitext-2-raw-v1:test")
    with pytest.raises(FileNotFoundError):
        calibration.load_text(str(tmp_path / "missing.txt"))
    tok = CharTokenizer()
    a = calibration.load_text("self", tiny_llama, tok, n_tokens=40, seed=5)
    b = calibration.load_text("self", tiny_llama, tok, n_tokens=40, seed=5)
    assert a == b and len(a) > 0


def test_token_sequences_are_even_windows():
    tok = CharTokenizer()
    seqs = calibration.token_sequences("abcdefghij" * 100, tok, n_sequences=4, seq_len=64)
    assert len(seqs) == 4 and all(s.numel() == 64 for s in seqs)
    assert seqs[0][0] == 3 + ord("a") and seqs[-1][-1] == 3 + ord("j")
    with pytest.raises(ValueError, match="fewer than one sequence"):
        calibration.token_sequences("short", tok, seq_len=64)
