"""The Ray executor: a conversion whose per-tensor jobs run as Ray tasks gives the same bytes
as a local one (every file), resumes a local run that was killed, survives a worker that
dies, and stops cleanly on a job's error; the waves that carry unspent bits; ray stays an
optional import."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import ray  # CI installs it (Makefile, the "test" extra): these tests must run, not skip
import torch

import eoq
from eoq.format import repo
from eoq.convert.jobs import TensorJob
from eoq.convert.pipeline import FAULT_ENV
from eoq.convert.rates import CARRY_WAVE, wave_bits, waves
from eoq.convert.executor import LocalExecutor, RayExecutor, make_executor

from tinymodels import save, tokenizer

# calibrated (self-sampled text), sensitivity allocation to a whole-model budget: curve jobs,
# then quantize jobs in waves carrying what the earlier waves left unspent
CONFIG = eoq.QuantConfig(bits=3.5, calib_sequences=2, calib_self_len=32, sensitivity_sequences=1)
FIXED = 6  # tiny llama: 5 norms and the tied head are written before the allocation


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # the test's own job wrappers are defined here, a module the workers cannot import
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    folder = save("llama", tmp_path_factory.mktemp("ray") / "llama")
    tokenizer(folder, 320)
    return folder


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    """The local conversion every Ray run must equal, and its curve cache."""
    root = tmp_path_factory.mktemp("ref")
    eoq.quantize_model(src, root / "q", CONFIG, curve_cache=root / "curves", progress=False, verbose=False)
    return root


def tree_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file under the folder, by its relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ray_run_is_byte_identical_to_local(cluster, src, reference, tmp_path):
    m = eoq.quantize_model(src, tmp_path / "q", CONFIG, curve_cache=tmp_path / "curves", executor="ray",
                           progress=False, verbose=False)
    assert tree_bytes(tmp_path / "q") == tree_bytes(reference / "q")
    # the curves were measured (and cached) by the tasks, on the shared folder
    assert tree_bytes(tmp_path / "curves") == tree_bytes(reference / "curves")
    assert len(list((tmp_path / "curves").glob("curve-*.json"))) == m["allocation"]["tensors"] == 15
    stored = 8 * m["totals"]["stored_bytes"] / m["totals"]["all_params"]
    assert 0.995 * CONFIG.bits <= stored <= CONFIG.bits
    assert ray.is_initialized()  # a Ray the caller started is left running


def test_local_run_killed_then_finished_on_ray(cluster, src, reference, tmp_path):
    out = tmp_path / "q"
    script = ("import sys, eoq; eoq.quantize_model(sys.argv[1], sys.argv[2], "
              "eoq.QuantConfig.from_json(sys.argv[3]), progress=False, verbose=False)")
    # killed in the second wave (waves of 8, 4, 2, 1 over the 15 allocated tensors)
    env = dict(os.environ, **{FAULT_ENV: str(FIXED + 9)})
    r = subprocess.run([sys.executable, "-c", script, str(src), str(out), CONFIG.to_json()], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 75, r.stderr
    partial = tmp_path / ".q.eoq-partial"
    assert (partial / "allocation.json").is_file()
    assert len(list((partial / "parts").glob("*.safetensors"))) == FIXED + 9
    eoq.quantize_model(src, out, CONFIG, executor="ray", progress=False, verbose=False)
    assert tree_bytes(out) == tree_bytes(reference / "q") and not partial.exists()


class DieOnce:
    """The job function, except that the first call of all kills its worker process (as an
    out-of-memory kill or a lost node would); the marker file says whose process it was."""

    def __init__(self, fn, marker: pathlib.Path):
        self.fn, self.marker = fn, marker

    def __call__(self, job):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self.fn(job)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)


class FailOn:
    """The job function, except that quantizing `name` raises."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, job):
        if isinstance(job, TensorJob) and job.name == self.name:
            raise RuntimeError(f"injected failure on {job.name}")
        return self.fn(job)


class Wrapping(RayExecutor):
    def __init__(self, wrap):
        super().__init__()
        self.wrap = wrap

    def map(self, fn, jobs):
        return super().map(self.wrap(fn), jobs)


def test_a_dead_worker_is_retried(cluster, src, reference, tmp_path):
    marker = tmp_path / "died"
    ex = Wrapping(lambda fn: DieOnce(fn, marker))
    eoq.quantize_model(src, tmp_path / "q", CONFIG, executor=ex, progress=False, verbose=False)
    assert int(marker.read_text()) != os.getpid()  # a worker died, not this process
    assert tree_bytes(tmp_path / "q") == tree_bytes(reference / "q")


def test_a_failing_job_stops_the_run_and_it_resumes(cluster, src, reference, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    out = tmp_path / "q"
    with pytest.raises(RuntimeError, match=f"injected failure on {name}"):
        eoq.quantize_model(src, out, CONFIG, executor=Wrapping(lambda fn: FailOn(fn, name)), progress=False,
                           verbose=False)
    partial = tmp_path / ".q.eoq-partial"
    assert not out.exists() and (partial / "allocation.json").is_file()
    assert len(list((partial / "parts").glob("*.safetensors"))) >= FIXED
    eoq.quantize_model(src, out, CONFIG, executor="ray", progress=False, verbose=False)
    assert tree_bytes(out) == tree_bytes(reference / "q")


def test_waves_taper_and_carry_exactly_what_was_left():
    for n in range(0, 200):
        names = [f"t{i}" for i in range(n)]
        ws = waves(names)
        assert sum(ws, []) == names and all(0 < len(w) <= CARRY_WAVE for w in ws)
        tail = [len(w) for w in ws[-6:]]
        assert n < 63 or tail == [32, 16, 8, 4, 2, 1]  # the last wave is one tensor: nothing is lost but its own
    assert [len(w) for w in waves(list(range(15)))] == [8, 4, 2, 1]
    # two finished tensors that left 1000 and 600 bits unspent; the next wave shares those 1600 bits
    specs = {n: torch.empty(r, 100, device="meta") for n, r in (("a", 10), ("b", 20), ("c", 30), ("d", 50))}
    rates = {"a": 4.0, "b": 3.0, "c": 3.5, "d": 5.0}
    entries = {"a": {"shape": [10, 100], "stored_bytes": (4000 - 1000) // 8},
               "b": {"shape": [20, 100], "stored_bytes": (6000 - 600) // 8}}
    assert repo.entry_numel(entries["a"]) == 1000
    bits = wave_bits(["c", "d"], ["a", "b"], rates, entries, specs, hi=10.0)
    assert bits == {"c": pytest.approx(3.5 + 0.2), "d": pytest.approx(5.0 + 0.2)}  # 1600 bits over 8000 weights
    assert sum(specs[n].numel() * (bits[n] - rates[n]) for n in bits) == pytest.approx(1600)
    assert wave_bits(["c", "d"], ["a", "b"], rates, entries, specs, hi=5.1) == {"c": pytest.approx(3.7), "d": 5.1}
    assert wave_bits(["a", "b"], [], rates, entries, specs, hi=10.0) == {"a": 4.0, "b": 3.0}


def test_executor_arguments_and_optional_import(monkeypatch):
    assert isinstance(make_executor(), LocalExecutor) and isinstance(make_executor("local"), LocalExecutor)
    with pytest.raises(ValueError, match="needs executor='ray'"):
        make_executor("local", ray_address="head:6379")
    with pytest.raises(ValueError, match="expected 'local', 'ray'"):
        make_executor("dask")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    with pytest.raises(ImportError, match=r"pip install eoq\[ray\]"):
        make_executor("ray")
    code = "import sys, eoq, eoq.convert, eoq.convert.executor, eoq.cli; assert 'ray' not in sys.modules, 'ray imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cli_runs_on_ray(cluster, src, tmp_path, capsys):
    from eoq.cli import main

    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "--executor {local,ray}" in capsys.readouterr().out
    assert main(["quantize", str(src), "-o", str(tmp_path / "bad"), "--ray-address", "head:6379"]) == 2
    assert "--ray-address needs --executor ray" in capsys.readouterr().err
    # data-free: proxy allocation, the curves and tensors on Ray
    assert main(["quantize", str(src), "-o", str(tmp_path / "ray"), "--data-free", "--executor", "ray",
                 "--no-progress"]) == 0
    eoq.quantize_model(src, tmp_path / "local", eoq.QuantConfig(calibration=None, awq=False), progress=False,
                       verbose=False)
    assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "local")
