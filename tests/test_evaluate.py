"""eoq.evaluate: both perplexity protocols against hand computations, and the KL statistics."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from eoq.evaluate.compare import evaluate_tokens, windows

from tinymodels import build


@pytest.fixture(scope="module")
def model():
    return build("llama", dtype=torch.float32)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 320, (150,), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def perturbed(model, scale: float):
    """A copy with seeded Gaussian noise of scale x each matrix's std added to every matrix."""
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    for p in noisy.parameters():
        if p.dim() == 2:
            p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return noisy


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
    noisy = perturbed(model, 0.5)
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


def test_resolve_device():
    from eoq.evaluate.compare import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_evaluation_matches_cpu(model, ids):
    """The same windows on the GPU: NLL and KL statistics agree with the CPU's to float32
    accuracy; a base on the CPU (its cached log-probabilities) works with a model on the GPU."""
    noisy = perturbed(model, 0.3)
    cpu = evaluate_tokens(noisy, ids, base=model, protocol="llama.cpp", n_ctx=32, bos_id=1, progress=False)
    gpu_model = copy.deepcopy(noisy).cuda()
    gpu = evaluate_tokens(gpu_model, ids, base=copy.deepcopy(model).cuda(), protocol="llama.cpp", n_ctx=32,
                          bos_id=1, progress=False)
    mixed = evaluate_tokens(gpu_model, ids, base=model, protocol="llama.cpp", n_ctx=32, bos_id=1, progress=False)
    for r in (gpu, mixed):
        assert r["tokens"] == cpu["tokens"]
        assert r["nll"] == pytest.approx(cpu["nll"], rel=1e-4)
        assert r["kld"]["mean"] == pytest.approx(cpu["kld"]["mean"], rel=1e-3, abs=1e-6)
        assert r["same_top1"] == pytest.approx(cpu["same_top1"], abs=2 / cpu["tokens"])


@cuda
def test_load_quantized_on_cuda_is_bit_identical(tmp_path):
    import eoq
    from eoq.evaluate.compare import load_model

    from tinymodels import save

    out = tmp_path / "q"
    eoq.quantize_model(save("llama", tmp_path / "src"), out, eoq.QuantConfig(calibration=None, awq=False),
                       progress=False, verbose=False)
    on_cpu, _ = eoq.load_quantized(out, dtype=torch.float32)
    on_gpu, _, desc = load_model(out, torch.float32, "cuda")
    assert desc["kind"] == "eoq" and next(on_gpu.parameters()).is_cuda
    for (n, a), (_, b) in zip(on_cpu.state_dict().items(), on_gpu.state_dict().items()):
        assert torch.equal(a, b.cpu()), n


def test_a_folder_without_a_tokenizer_is_named(tmp_path):
    from eoq.evaluate.compare import evaluate

    from tinymodels import save

    text = tmp_path / "t.txt"
    text.write_text("some words " * 50)
    with pytest.raises(ValueError, match="src comes without a tokenizer"):
        evaluate(save("llama", tmp_path / "src"), str(text), device="cpu", samples=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_evaluate_a_converted_tiny_model(tmp_path, device):
    """eoq.evaluate end to end on a device: both models load there, the summary, the samples
    and the JSON files come out, and the KL divergence of a 3-bit copy is positive."""
    import json

    import eoq
    from eoq.evaluate.compare import evaluate

    from tinymodels import TEXT, save, tokenizer

    src = tokenizer(save("llama", tmp_path / "src"))
    out = tmp_path / "q"
    eoq.quantize_model(src, out, eoq.QuantConfig(bits=3, calibration=None, awq=False), progress=False,
                       verbose=False)
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 8)
    s = evaluate(out, str(text), base=src, n_ctx=32, out_dir=out, max_new_tokens=6, progress=False, device=device)
    assert s["device"].startswith(device) and s["model"]["kind"] == "eoq" and s["base"]["kind"] == "hf-folder"
    r = s["result"]
    assert r["windows"] >= 4 and r["kld"]["mean"] > 0 and 0 <= r["same_top1"] <= 1
    assert json.loads((out / "eval_summary.json").read_text())["result"]["tokens"] == r["tokens"]
    rows = json.loads((out / "sample_generations.json").read_text())
    assert len(rows) == 4 and all({"prompt", "model", "base"} <= set(row) for row in rows)
