"""eoq.testing.kquants against gguf-py: the fields read from raw Q4_K / Q6_K blocks give
gguf-py's dequantized weights bit for bit, and each weight's cell is where the format says."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from eoq.testing import kquants


def random_blocks(kind: str, n: int, seed: int) -> np.ndarray:
    """n blocks of random bytes with finite, realistic super-block scales."""
    rng = np.random.default_rng(seed)
    size = kquants.Q4_K_BYTES if kind == "Q4_K" else kquants.Q6_K_BYTES
    b = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    scale = (np.abs(rng.normal(size=(n, 2))) * 1e-3).astype("<f2")
    if kind == "Q4_K":
        b[:, 0:4] = scale.view(np.uint8).reshape(n, 4)
    else:
        b[:, 208:210] = scale[:, :1].view(np.uint8).reshape(n, 2)
    return b.reshape(-1)


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_fields_give_gguf_py_weights_bit_for_bit(kind):
    raw = random_blocks(kind, 64, seed=1)
    ours = kquants.dequantize(kind, raw)
    theirs = quants.dequantize(raw, getattr(GGMLQuantizationType, kind)).reshape(-1)
    assert ours.dtype == theirs.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_codes_span_their_range_and_steps_are_per_sub_block(kind):
    codes, steps, offsets = kquants.FIELDS[kind](random_blocks(kind, 32, seed=2))
    lo, hi, sub = (0, 15, 32) if kind == "Q4_K" else (-32, 31, 16)
    assert codes.min() == lo and codes.max() == hi
    # one step (and offset) per sub-block
    assert (steps.reshape(32, -1, sub) == steps.reshape(32, -1, sub)[..., :1]).all()
    assert (offsets.reshape(32, -1, sub) == offsets.reshape(32, -1, sub)[..., :1]).all()
    if kind == "Q6_K":
        assert not offsets.any()


def test_a_partial_block_is_refused():
    with pytest.raises(ValueError, match="Q4_K: 143 bytes is not a whole number of 144-byte blocks"):
        kquants.q4_k_fields(np.zeros(143, dtype=np.uint8))


def test_the_dithered_builder_reads_k_quant_cells_and_qwen2_names():
    """eoq.testing.dithered's step map of a K-quant tensor is the blocks' step, row by row (GGUF
    order: ne0 = columns first), and the qwen2 biases have their transformers names."""
    import types

    from eoq.testing import dithered

    rows, cols = 3, 512
    raw = random_blocks("Q4_K", rows * cols // 256, seed=3)
    t = types.SimpleNamespace(name="blk.0.attn_q.weight", tensor_type=types.SimpleNamespace(name="Q4_K"),
                              shape=[cols, rows], data=raw)
    steps = dithered.block_steps(t)
    _, want, _ = kquants.q4_k_fields(raw)
    assert steps.shape == (rows, cols) and np.array_equal(steps.numpy(), np.abs(want).reshape(rows, cols))
    raw6 = random_blocks("Q6_K", rows * cols // 256, seed=4)  # signed scales: the cell's width is |step|
    t6 = types.SimpleNamespace(name="blk.0.ffn_down.weight", tensor_type=types.SimpleNamespace(name="Q6_K"),
                               shape=[cols, rows], data=raw6)
    _, want6, _ = kquants.q6_k_fields(raw6)
    assert (want6 < 0).any() and (dithered.block_steps(t6).numpy() == np.abs(want6).reshape(rows, cols)).all()
    t.shape = [cols + 1, rows]
    with pytest.raises(dithered.DitherError, match="unexpected shape"):
        dithered.block_steps(t)
    assert dithered.hf_name("blk.3.attn_k.bias") == "model.layers.3.self_attn.k_proj.bias"
    assert dithered.hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
