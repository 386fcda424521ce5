"""eoq.evaluate: both perplexity protocols against hand computations, and the KL statistics."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from eoq.evaluate import evaluate_tokens, windows

from tinymodels import build


@pytest.fixture(scope="module")
def model():
    return build("llama", dtype=torch.float32)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 320, (150,), generator=torch.Generator().manual_seed(1))


def test_llama_cpp_protocol_by_hand(model, ids):
    n_ctx, bos = 32, 1
    nll = []
    for c in range(len(ids) // n_ctx):          # 4 windows; the last 22 tokens are dropped
        x = ids[c * n_ctx:(c + 1) * n_ctx].clone()
        x[0] = bos
        with torch.no_grad():
            logits = model(x[None]).logits[0].double()
        for j in range(n_ctx // 2, n_ctx - 1):  # the second half, as llama-perplexity scores it
            nll.append(-(logits[j].log_softmax(-1)[ids[c * n_ctx + j + 1]]).item())
    r = evaluate_tokens(model, ids, protocol="llama.cpp", n_ctx=n_ctx, bos_id=bos, progress=False)
    assert r["windows"] == 4 and r["tokens"] == 4 * 15 == len(nll)
    mean = sum(nll) / len(nll)
    assert r["nll"] == pytest.approx(mean, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(mean), rel=1e-5)
    sd = math.sqrt(sum((v - mean) ** 2 for v in nll) / (len(nll) - 1))
    assert r["nll_stderr"] == pytest.approx(sd / math.sqrt(len(nll)), rel=1e-4)


def test_sliding_protocol_matches_the_hf_recipe(model, ids):
    """The Hugging Face recipe with labels and -100 masking, counting the labels the loss really
    averaged over; every token but the first is scored once."""
    max_len, stride = 40, 16
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_len, len(ids))
        trg = end - prev_end
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = model(x, labels=labels).loss.double().item()
        n = int((labels[:, 1:] != -100).sum())
        nll_sum += loss * n
        count += n
        prev_end = end
        if end == len(ids):
            break
    r = evaluate_tokens(model, ids, protocol="sliding", n_ctx=max_len, stride=stride, progress=False)
    assert r["tokens"] == count == len(ids) - 1
    assert r["ppl"] == pytest.approx(math.exp(nll_sum / count), rel=1e-5)


def test_windows_cover_every_token_once():
    for n, n_ctx, stride in ((150, 40, 16), (100, 100, 100), (37, 16, 5), (16, 512, 256)):
        scored = []
        for w in windows(n, "sliding", n_ctx, stride):
            scored += list(range(w.start + w.first + 1, w.end))
            assert w.end - w.start <= n_ctx
        assert scored == list(range(1, n)), (n, n_ctx, stride)
    assert [w.scored for w in windows(1100, "llama.cpp", 512)] == [255, 255]


def test_kld_against_itself_and_a_perturbed_copy(model, ids):
    r = evaluate_tokens(model, ids, base=model, protocol="llama.cpp", n_ctx=32, bos_id=1, progress=False)
    assert r["kld"]["max"] < 1e-6 and r["same_top1"] == 1.0 and r["rms_dp"] < 1e-6
    assert r["ppl_ratio"] == pytest.approx(1.0)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in noisy.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.5)
    r = evaluate_tokens(noisy, ids, base=model, protocol="sliding", n_ctx=40, stride=20, progress=False)
    cache = {}
    r1 = evaluate_tokens(noisy, ids, base=model, protocol="sliding", n_ctx=40, stride=20, progress=False,
                         base_cache=cache)
    r2 = evaluate_tokens(noisy, ids, base=model, protocol="sliding", n_ctx=40, stride=20, progress=False,
                         base_cache=cache)
    assert len(cache) == r["windows"] and r1 == r2 == r
    assert r["kld"]["mean"] > 1e-3 and r["kld"]["median"] <= r["kld"]["p99"] <= r["kld"]["max"]
    assert r["same_top1"] < 1.0 and r["rms_dp"] > 0
    assert r["base"]["tokens"] == r["tokens"] == len(ids) - 1


def test_bad_arguments(model, ids):
    with pytest.raises(ValueError, match="protocol"):
        list(windows(100, "wiki"))
    with pytest.raises(ValueError, match="BOS"):
        evaluate_tokens(model, ids, protocol="llama.cpp", n_ctx=32, progress=False)
    with pytest.raises(ValueError, match="no window"):
        evaluate_tokens(model, ids[:10], protocol="llama.cpp", n_ctx=32, bos_id=1, progress=False)
