"""eoq.calibrate.sensitivity: the Fisher pass against noise injection, its files, and its rounding."""

from __future__ import annotations

import pytest
import torch

from eoq.calibrate import sensitivity as sens

from tinymodels import build


@pytest.fixture(scope="module")
def model():
    return build("llama", dtype=torch.float32)


@pytest.fixture(scope="module")
def seqs():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 320, (48,), generator=g) for _ in range(6)]


NAMES = ("model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight",
         "model.embed_tokens.weight")


def test_noise_kl_is_linear_in_the_noise_energy(model, seqs):
    """The linear model KL ~ c * eps: doubling the relative squared error doubles the KL."""
    one = sens.noise_kl(model, seqs, NAMES, 1e-3, seed=3)
    two = sens.noise_kl(model, seqs, NAMES, 2e-3, seed=3)
    for n in NAMES:
        assert one[n] > 0
        assert two[n] / one[n] == pytest.approx(2.0, rel=0.1), n


def test_fisher_predicts_noise_injection(model, seqs):
    """The Fisher coefficients predict the KL that noise of known size causes, tensor by
    tensor (a tiny random model: within a factor 2; on SmolLM2 within ~10 % for most tensors,
    BENCHMARKS.md), and every 2-D parameter (a tied one under both names) gets one."""
    s = sens.fisher_pass(model, seqs, row_params=["model.embed_tokens.weight"], seed=0)
    assert s.tokens == sum(x.numel() for x in seqs)
    assert set(s.fisher) == {n for n, p in model.named_parameters(remove_duplicate=False) if p.dim() == 2}
    assert s.fisher["lm_head.weight"] == s.fisher["model.embed_tokens.weight"]
    measured = sens.noise_kl(model, seqs, NAMES, 1e-3, seed=5)
    for n in NAMES:
        predicted = s.noise_coefficient(n) * 1e-3
        assert 0.5 < measured[n] / predicted < 2.0, (n, measured[n], predicted)
        # white noise is what the allocator's error model assumes: the same prediction per mean square
        assert s.white_coefficient(n) * s.mean_w2[n] == pytest.approx(s.noise_coefficient(n), rel=1e-12)
    rows, tokens = s.row_weights("model.embed_tokens.weight")
    assert rows.shape == (320,) and tokens == s.tokens and bool((rows > 0).all())  # tied: the head sees every row
    assert s.coefficient("model.layers.0.self_attn.v_proj.weight") > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_loglik_gradient_is_autograds(dtype):
    """_backward_sampled_loglik (onehot(y) - p formed by hand, log p in row chunks) draws the
    labels exp(log_softmax) sampling draws and gives the gradient autograd gives through
    log_softmax and gather, across more rows than one chunk."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3 * sens.LOGP_ROWS + 5, 16, generator=g)
    w = torch.randn(300, 16, generator=g, dtype=dtype)

    def logits(weight):
        return x.to(dtype) @ weight.t()  # [1, T, 300]

    mine = w.clone().requires_grad_(True)
    sens._backward_sampled_loglik(logits(mine), torch.Generator().manual_seed(9))
    ref = w.clone().requires_grad_(True)
    logp = torch.log_softmax(logits(ref)[0].float(), dim=-1)
    y = torch.multinomial(logp.detach().exp(), 1, generator=torch.Generator().manual_seed(9))
    logp.gather(1, y).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mine.grad.float(), ref.grad.float(), **tol)
    # a different generator state draws different labels, so a different gradient
    other = w.clone().requires_grad_(True)
    sens._backward_sampled_loglik(logits(other), torch.Generator().manual_seed(10))
    assert not torch.allclose(other.grad.float(), ref.grad.float(), **tol)


def test_fisher_pass_leaves_the_model_as_it_was(model, seqs):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    sens.fisher_pass(model, seqs[:2])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad == flags[n]


def test_fisher_pass_is_seeded(model, seqs):
    a = sens.fisher_pass(model, seqs[:2], seed=7)
    b = sens.fisher_pass(model, seqs[:2], seed=7)
    c = sens.fisher_pass(model, seqs[:2], seed=8)
    assert a.fisher == b.fisher and a.fisher != c.fisher


def test_save_load_round_trip_and_damage(model, seqs, tmp_path):
    s = sens.fisher_pass(model, seqs[:2], row_params=["model.embed_tokens.weight"])
    s.token_counts, s.count_tokens = sens.token_counts(seqs, 320)
    s.save(tmp_path / "s.safetensors")
    t = sens.Sensitivity.load(tmp_path / "s.safetensors")
    assert t.fisher == s.fisher and t.fisher_w2 == s.fisher_w2 and t.tokens == s.tokens
    assert torch.equal(t.rows["model.embed_tokens.weight"], s.rows["model.embed_tokens.weight"])
    assert torch.equal(t.token_counts, s.token_counts) and t.count_tokens == sum(x.numel() for x in seqs)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not an eoq sensitivity file"):
        sens.Sensitivity.load(tmp_path / "bad.safetensors")


def test_token_counts_and_encoder_rows():
    counts, n = sens.token_counts([torch.tensor([1, 1, 2, 9, 400])], 10)
    assert n == 4 and counts.tolist() == [0, 2, 1, 0, 0, 0, 0, 0, 0, 1]  # 400 lies outside the table
    s = sens.Sensitivity(0, {}, {}, {}, {}, counts, n)
    assert s.row_weights("emb")[0] is None
    rows, tokens = s.row_weights("emb", input_embedding=True)
    assert rows.tolist() == counts.double().tolist() and tokens == 4
    assert s.coefficient("emb") is None


def test_round_sig():
    x = torch.tensor([123456789.123, 0.000123456789123, 0.0, -2.5e-300], dtype=torch.float64)
    r = sens.round_sig(x, 4)
    assert r.tolist() == pytest.approx([123500000.0, 0.0001235, 0.0, -2.5e-300], rel=1e-12)
