"""Where a conversion's per-tensor jobs run: in this process (``LocalExecutor``) or as tasks on
a Ray cluster (``RayExecutor``).

An executor only runs jobs: ``map(fn, jobs)`` calls ``fn(job)`` for each job and yields
``(job index, result)`` as results come in, in any order. The driver (eoq.convert) builds the
jobs, and it alone writes files (the part files, allocation.json), each under its tensor's
name, so the order results arrive in cannot change a byte of the output.

Ray is optional: this module imports it only when a RayExecutor is made.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Optional

RAY_MAX_RETRIES = 3      # Ray runs a task again when its worker died (killed, out of memory, node lost)
RAY_TASK_CPUS = 1        # a job is one tensor; torch in the task uses this many threads
RAY_IN_FLIGHT_PER_CPU = 2  # queued tasks per cluster CPU: workers stay busy while the driver saves results


class LocalExecutor:
    """Runs the jobs one after another in this process, in order."""

    def map(self, fn: Callable[[Any], Any], jobs: Iterable) -> Iterator[tuple[int, Any]]:
        for i, job in enumerate(jobs):
            yield i, fn(job)

    def close(self) -> None:
        pass


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"executor='ray' needs Ray, which is not installed ({e}): pip install eoq[ray]") from e
    return ray


def _run_task(fn: Callable[[Any], Any], job):
    """A job inside a Ray task: torch gets as many threads as the task has CPUs (its default is
    every core of the node, which tasks running side by side would then fight over)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", RAY_TASK_CPUS)
    torch.set_num_threads(max(1, int(cpus)))
    return fn(job)


class RayExecutor:
    """Runs each job as a Ray task (``num_cpus`` CPUs, retried up to ``max_retries`` times when
    its worker dies). Connects to the cluster at ``address``, else at $RAY_ADDRESS, else starts
    a local Ray instance; a Ray already initialised in this process is used as it is. At most
    RAY_IN_FLIGHT_PER_CPU x the cluster's CPUs tasks are submitted at a time, so the driver
    never holds more than that many jobs' tensors and results."""

    def __init__(self, address: Optional[str] = None, num_cpus: float = RAY_TASK_CPUS,
                 max_retries: int = RAY_MAX_RETRIES):
        ray = import_ray()
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or None)
            self._started = True  # ours to shut down
        self._task = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(_run_task)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.in_flight = max(1, RAY_IN_FLIGHT_PER_CPU * cpus)

    def map(self, fn: Callable[[Any], Any], jobs: Iterable) -> Iterator[tuple[int, Any]]:
        ray = self._ray
        pending: dict = {}  # ObjectRef -> job index
        todo = enumerate(jobs)  # jobs are built lazily, as slots free up
        try:
            for i, job in todo:
                pending[self._task.remote(fn, job)] = i
                del job
                while len(pending) >= self.in_flight:
                    yield self._next(pending)
            while pending:
                yield self._next(pending)
        finally:
            for ref in pending:  # an error, or the caller stopped early: drop what is still queued
                ray.cancel(ref)

    def _next(self, pending: dict) -> tuple[int, Any]:
        """The first task to finish: (its job index, its result); a task's error is raised here."""
        (ref,), _ = self._ray.wait(list(pending), num_returns=1)
        i = pending.pop(ref)
        return i, self._ray.get(ref)

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


def make_executor(executor=None, ray_address: Optional[str] = None):
    """An executor from quantize_model's arguments: None or "local", "ray", or an object with
    ``map`` (and ``close``) used as it is."""
    if ray_address is not None and executor != "ray":
        raise ValueError(f"ray_address={ray_address!r} needs executor='ray' (got executor={executor!r})")
    if executor is None or executor == "local":
        return LocalExecutor()
    if executor == "ray":
        return RayExecutor(ray_address)
    if callable(getattr(executor, "map", None)):
        return executor
    raise ValueError(f"executor={executor!r}: expected 'local', 'ray' or an executor object (eoq.convert.executor)")
