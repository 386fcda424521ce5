"""Error feedback through the methods and the pipeline: the input covariance the calibration
collects (shared between Linears that read one input), every method with ``hessian=``, AWQ
with feedback in its alpha search, QuantConfig(feedback="gptq") end to end. The kernel itself
is tested in test_feedback.py."""

import json

import pytest
import torch

import eoq
from eoq.calibrate import statistics as calibration
from eoq.format import fused
from eoq.format import repo
from eoq.standalone import load_quantized as standalone
from tinymodels import build, correlated_layer, save

METHODS = {"ecsq": 3.0, "absmax": 3, "polar": 3, "turbo": 3}


def output_error(w, w_hat, h):
    e = (w - w_hat).double()
    return float(((e @ h) * e).sum())


# ---- the covariance --------------------------------------------------------------------------

def test_covariance_is_shared_and_exact(tmp_path):
    model = build("llama").float()
    seqs = [torch.randint(3, 320, (24,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    seen = {}

    def grab(name):
        def hook(module, args):
            seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        return hook

    hooks = [m.register_forward_pre_hook(grab(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    stats = calibration.collect_stats(model, seqs, progress=False, covariance=True)
    for h in hooks:
        h.remove()
    layer = "model.layers.0"
    q, k, v = (stats[f"{layer}.self_attn.{p}_proj"] for p in "qkv")
    assert q.sum_outer is k.sum_outer is v.sum_outer  # one matrix for one input
    gate, up = stats[f"{layer}.mlp.gate_proj"], stats[f"{layer}.mlp.up_proj"]
    assert gate.sum_outer is up.sum_outer and gate.sum_outer is not q.sum_outer
    assert stats[f"{layer}.self_attn.o_proj"].sum_outer is not q.sum_outer
    for name, s in stats.items():
        a = torch.cat(seen[name])
        assert s.count == a.shape[0]
        torch.testing.assert_close(s.sum_outer, a.t() @ a, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(s.hessian, a.t() @ a / a.shape[0], rtol=1e-9, atol=1e-9)
    # saved once per matrix, loaded back shared
    path = tmp_path / "stats.safetensors"
    calibration.save_stats(stats, path)
    back = calibration.load_stats(path)
    assert back[f"{layer}.self_attn.k_proj"].sum_outer is back[f"{layer}.self_attn.q_proj"].sum_outer
    for name in stats:
        assert torch.equal(back[name].sum_outer, stats[name].sum_outer)


def test_covariance_unshares_when_inputs_differ():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
            self.calls = 0

        def forward(self, input_ids):
            x = input_ids.float().reshape(-1, 8)
            self.calls += 1
            y = self.a(x)
            return y + self.b(x if self.calls < 3 else x * 2)  # the third call feeds b differently

    m = Two()
    seqs = [torch.arange(16) + i for i in range(4)]
    stats = calibration.collect_stats(m, seqs, progress=False, covariance=True)
    xs = [s.float().reshape(-1, 8).double() for s in seqs]
    want_a = sum(x.t() @ x for x in xs)
    want_b = sum((x if i < 2 else 2 * x).t() @ (x if i < 2 else 2 * x) for i, x in enumerate(xs))
    torch.testing.assert_close(stats["a"].sum_outer, want_a)
    torch.testing.assert_close(stats["b"].sum_outer, want_b)


def test_damaged_covariance_file_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    model = build("llama").float()
    stats = calibration.collect_stats(model, [torch.randint(3, 320, (16,))], progress=False, covariance=True)
    path = tmp_path / "s.safetensors"
    calibration.save_stats(stats, path)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    key = "model.layers.0.mlp.down_proj.sum_outer"
    t[key] = t[key][:3, :3].contiguous()
    save_file(t, str(path), metadata=meta)
    with pytest.raises(ValueError, match="down_proj.*sum_outer has shape"):
        calibration.load_stats(path)


# ---- every method ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(METHODS))
def test_feedback_lowers_the_output_error_of_every_method(method):
    w, h, _ = correlated_layer()
    bits = METHODS[method]
    plain = eoq.quantize_tensor(w, method, bits, seed=3)
    fb = eoq.quantize_tensor(w, method, bits, seed=3, hessian=h)
    e_plain = output_error(w, plain.dequantize(torch.float32), h)
    e_fb = output_error(w, fb.dequantize(torch.float32), h)
    assert fb.meta["feedback"] == "gptq"
    assert e_fb < 0.85 * e_plain, (method, e_fb / e_plain)
    # the same coded rate: fixed-rate methods store the same sizes; ecsq meets its target
    if method == "ecsq":
        assert fb.bits_per_weight() <= bits + 1e-9 and fb.bits_per_weight() > bits - 0.03
        assert plain.bits_per_weight() > bits - 0.03
    else:
        assert fb.stored_bytes("packed") == plain.stored_bytes("packed")


def test_ecsq_feedback_is_deterministic_across_threads():
    w, h, _ = correlated_layer(rows=96)
    before = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            qt = eoq.quantize_tensor(w, "ecsq", 4.0, hessian=h)
            out.append(qt.code_stream().clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0], out[1])


def test_ecsq_feedback_entries_load_through_every_reader():
    w, h, _ = correlated_layer(rows=64)
    for bits in (3.0, 9.0):  # 9: codes past 8 bits with feedback
        qt = eoq.quantize_tensor(w, "ecsq", bits, hessian=h, name="w")
        entry, parts = repo.quantized_entry(qt, "rans", "quantized", False, list(w.shape), None)
        ref = qt.dequantize(torch.bfloat16)
        assert torch.equal(fused.dequantize_fused("w", entry, parts, torch.bfloat16), ref)
        entry["checksum"] = repo.entry_checksum("w", {k: v for k, v in entry.items() if k != "data_crc32c"},
                                                entry.pop("data_crc32c"))
        assert torch.equal(standalone.dequantize_entry("w", entry, parts, torch.bfloat16), ref)


def test_awq_with_feedback_is_no_worse_than_feedback_alone():
    w, h, a = correlated_layer()
    imp = a.pow(2).mean(0)
    # AWQ's fp16 scales (16 bits per column) come out of the same budget: equal sizes
    fb = eoq.quantize_tensor(w, "ecsq", 3.0, hessian=h, importance=imp)
    both = eoq.quantize_tensor(w, "ecsq", 3.0, hessian=h, importance=imp, awq=True, awq_rows=None)
    e_fb = output_error(w, fb.dequantize(torch.float32), h)
    e_both = output_error(w, both.dequantize(torch.float32), h)
    assert "awq_alpha" in both.meta and abs(both.stored_bytes() - fb.stored_bytes()) < 0.01 * fb.stored_bytes()
    assert e_both <= 1.02 * e_fb


def test_singular_and_dead_covariances_do_not_crash():
    w, _, _ = correlated_layer(rows=32, cols=128)
    z = torch.randn(16, 128, dtype=torch.float64)
    for h in (z.t() @ z,                              # rank 16 of 128
              torch.zeros(128, 128, dtype=torch.float64),  # nothing seen at all
              torch.diag(torch.cat([torch.zeros(64), torch.ones(64)])).double()):  # dead columns
        for method in ("ecsq", "absmax"):
            with pytest.warns(RuntimeWarning, match="w0"):
                qt = eoq.quantize_tensor(w, method, 4, hessian=h, name="w0", hessian_tokens=16)
            assert torch.isfinite(qt.dequantize(torch.float32)).all()


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(3, 3), "shape"),
    (torch.full((128, 128), float("nan")), "non-finite"),
    (torch.triu(torch.ones(128, 128)), "symmetric"),
])
def test_bad_hessian_is_refused(bad, match):
    w, _, _ = correlated_layer(rows=8, cols=128)
    with pytest.raises(ValueError, match=match):
        eoq.quantize_tensor(w, "ecsq", 4, hessian=bad, name="w")


# ---- the pipeline ----------------------------------------------------------------------------

def test_quantize_model_with_feedback(tmp_path, monkeypatch):
    from eoq.convert import allocate

    src = save("llama", tmp_path / "src")
    seqs = [torch.randint(3, 320, (64,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model = build("llama")
    stats = calibration.collect_stats(model, seqs, progress=False, covariance=True)
    cfg = eoq.QuantConfig(bits=4, allocation="proxy", feedback="gptq", calibration="self")
    m = eoq.quantize_model(src, tmp_path / "out", cfg, stats=stats, progress=False, verbose=False)
    quantized = [e for e in m["tensors"].values() if e.get("method") == "ecsq"]
    assert quantized and all(e["meta"].get("feedback") == "gptq" for e in quantized)
    # the allocation uses plain rounding's curves (allocate.FEEDBACK_CURVES is off: BENCHMARKS.md)
    assert m["allocation"]["feedback_curves"] == 0

    def rates(manifest):
        return {n: e["bits"] for n, e in manifest["tensors"].items() if e.get("method") == "ecsq"}

    # switched on, it measures error feedback's curves, and they move the rates
    monkeypatch.setattr(allocate, "FEEDBACK_CURVES", True)
    on = eoq.quantize_model(src, tmp_path / "on", cfg, stats=stats, progress=False, verbose=False)
    assert on["allocation"]["feedback_curves"] == len(quantized)
    assert rates(on).keys() == rates(m).keys() and rates(on) != rates(m)
    sd = eoq.read_state_dict(tmp_path / "out")
    _, state = standalone.read_folder(tmp_path / "out")
    for name, t in sd.items():
        assert torch.equal(state[name], t), name
    # stats without the covariance are refused rather than silently converting without feedback
    plain = calibration.collect_stats(model, seqs, progress=False)
    with pytest.raises(ValueError, match="covariance"):
        eoq.quantize_model(src, tmp_path / "out2", cfg, stats=plain, progress=False, verbose=False)


def test_config_and_cli_take_feedback():
    from eoq.cli import build_parser, config_from_args

    with pytest.raises(ValueError, match="needs calibration"):
        eoq.QuantConfig(feedback="gptq", calibration=None, awq=False)
    with pytest.raises(ValueError, match="feedback must be"):
        eoq.QuantConfig(feedback="obq")
    cfg = eoq.QuantConfig(feedback="gptq")
    assert eoq.QuantConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
    a = build_parser().parse_args(["quantize", "m", "-o", "out", "--feedback", "gptq", "--feedback-damp", "0.05"])
    c = config_from_args(a)
    assert c.feedback == "gptq" and c.feedback_damp == 0.05
