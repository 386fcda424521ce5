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


# The slow tier (`make test-all`, CI): long end-to-end runs. `make test` leaves them out and
# still reaches every module: each of these has fast tests of its parts on tiny models.
SLOW = (
    # SmolLM2-size conversions and what uses them
    "tests/test_convert_models.py::test_smollm2_",
    "tests/test_convert_models.py::test_eval_of_the_converted_smollm2_against_its_base",
    "tests/test_notebooks.py::test_notebook_executes[quickstart.ipynb]",
    "tests/test_testmodels.py::test_dithered_build_is_deterministic",
    "tests/test_testmodels.py::test_dithered_generation_matches_original",
    # kill and resume: conversions killed in a subprocess, then finished
    "tests/test_convert.py::test_resume_after_kill_gives_the_same_bytes",
    "tests/test_whole_model.py::test_resume_after_a_kill_in_the_sensitivity_pass",
    "tests/test_fisher_resume.py::test_a_conversion_resumes_its_fisher_pass_and_writes_the_same_bytes",
    "tests/test_sampling_resume.py::test_a_conversion_resumes_sampling_and_writes_the_same_bytes",
    # the adversarial sweep, the Ray cluster, the short fuzz run
    "tests/test_adversarial.py::test_every_mutation_fails_clearly",
    "tests/test_ray_executor.py::test_ray_run_is_byte_identical_to_local",
    "tests/test_ray_executor.py::test_local_run_killed_then_finished_on_ray",
    "tests/test_ray_executor.py::test_a_dead_worker_is_retried",
    "tests/test_ray_executor.py::test_a_failing_job_stops_the_run_and_it_resumes",
    "tests/test_ray_executor.py::test_cli_runs_on_ray",
    "tests/test_fuzz_short.py::",
    # make demo
    "tests/test_demo.py::",
    # the real 1.5 B model: 1.1 GB from 22 PyPI parts
    "tests/test_qwen_coder.py::test_the_real_file_and_its_k_quants",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
