"""Tiny Llama-, Qwen2- and GPT-2-style models built from configs (random weights, seconds),
saved as HF folders for the conversion tests."""

from __future__ import annotations

import pathlib

import torch

ARCHS = ("llama", "qwen2", "gpt2")


def build(arch: str, seed: int = 0, dtype=torch.bfloat16):
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             bos_token_id=1, eos_token_id=2)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        # hidden 96: not a multiple of 32 or 64, so the rotation pads / picks small blocks
        cfg = tf.Qwen2Config(vocab_size=300, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                             bos_token_id=1, eos_token_id=2)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=300, n_embd=96, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                            eos_token_id=2)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    # Initialised weights are tiny (std 0.02) and biases zero; give the biases values so that
    # a lost bias would show.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    return model.to(dtype).eval()


def save(arch: str, folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
    model = build(arch, seed)
    model.save_pretrained(str(folder))
    return folder


TEXT = ("The quick brown fox jumps over the lazy dog. A tiny model reads a tiny text, "
        "and a byte-level tokenizer learns its pieces. ") * 4


def tokenizer(folder: pathlib.Path, vocab_size: int = 300) -> pathlib.Path:
    """Train a byte-level BPE tokenizer (ids below vocab_size; <s> = 1, </s> = 2, as the tiny
    configs say) and save it into folder: evaluation and generation need one, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))
    return folder


def with_outliers(stats: dict, channels: int = 4, factor: float = 1e4) -> dict:
    """Activation statistics with a few loud input channels, as real LLMs have (random tiny
    models have none): there AWQ's scales pay for their side data and are kept."""
    for s in stats.values():
        s.sum_sq[:channels] *= factor
    return stats


def correlated_layer(rows=192, cols=256, tokens=4096, seed=0):
    """(w, H, activations): inputs with a strongly correlated covariance (a = L z)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    a = torch.randn(tokens, cols, generator=g) @ mix.t()
    a[:, :8] *= 6.0  # a few loud channels, as in LLMs
    w = torch.randn(rows, cols, generator=g) * 0.02
    h = (a.double().t() @ a.double()) / tokens
    return w, h, a
