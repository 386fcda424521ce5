import os

import pytest
import torch

import eoq  # noqa: F401  (imports torch first, then the extension)


@pytest.fixture
def threads():
    """Run a body under several thread counts and restore the setting afterwards."""
    before = torch.get_num_threads()
    yield [1, 2]
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_path():
    from eoq.testing.models import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_down(smollm2_path):
    """The first layer's down projection of SmolLM2-135M (576 x 1536, float32)."""
    from eoq.format.gguf_weights import linear_weights

    for name, w in linear_weights(smollm2_path):
        if "ffn_down" in name:
            return w
    raise AssertionError(f"no ffn_down weight in {smollm2_path}")


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    """SmolLM2-135M-Instruct as transformers loads its GGUF (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
