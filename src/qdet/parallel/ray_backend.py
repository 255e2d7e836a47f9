"""Ray as the execution backend: a local Ray (`address="auto"`) or an existing cluster (its address).

Each task is a Ray task of one CPU whose worker runs torch with `threads` threads (1 by default,
and OMP/MKL pinned to 1 through the workers' environment). The shared state is `ray.put` once per
job; a worker process deserializes it once and keeps it for the job's following tasks. A worker
killed mid-task (OOM, a node lost, `kill PID`) is retried by Ray up to `max_retries` times; a task
whose code raises is not retried (`retry_exceptions=False`) and comes back as a TaskError naming it.

    >>> with RayBackend("auto", workers=2) as backend:  # doctest: +SKIP
    ...     layer_sensitivity(qm, metric, batches, backend=backend)
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from qdet.errors import ConfigError
from qdet.parallel.backend import (
    Backend,
    SerialBackend,
    Shared,
    Task,
    TaskFn,
    describe,
    run_one,
)

__all__ = ["WORKER_ENV", "RayBackend", "make_backend", "require_ray"]

# what a one-thread worker needs set before torch/OpenMP start in it (torch.set_num_threads does the rest);
# OpenVINO must not pin threads: it pins every process's first thread to the same core
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "QDET_OPENVINO_CPU_PINNING": "0"}

_CACHE: dict[str, Any] = {}  # in a worker process: the shared state of the current job, by object id


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'qdet[ray]' (or pip install ray)") from None
    return ray


def _shared_state(holder: list[Any]) -> Any:
    """The job's shared state in this worker: fetched from the object store on the first task only."""
    import ray

    ref = holder[0]  # inside a list, so Ray hands the task the reference and not a fresh copy each time
    key = ref.hex()
    if key not in _CACHE:
        _CACHE.clear()  # one job's state at a time: bounded memory
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


def _execute(fn: TaskFn, holder: list[Any], task: Task, threads: int | None) -> Any:
    return run_one(fn, _shared_state(holder), task, threads)


class RayBackend(Backend):
    """`address="auto"` starts a local Ray with `workers` CPUs (default: this machine's cores) and shuts
    it down on `close()`; any other address joins that cluster (workers = its CPUs) and only
    disconnects. `init_kwargs` go to `ray.init` (tests pass a small `object_store_memory`). When Ray
    is already initialised in this process, it is used as it is (and left running)."""

    name = "ray"

    def __init__(self, address: str = "auto", *, workers: int = 0, threads: int | None = 1, max_retries: int = 3,
                 **init_kwargs: Any) -> None:
        ray = require_ray()
        super().__init__(workers, threads)
        self.address, self.max_retries, self._owns = address, max_retries, False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "runtime_env": {"env_vars": dict(WORKER_ENV)},
                                      "logging_level": "WARNING", **init_kwargs}
            if address in ("auto", "local"):
                kwargs.update(address="local", num_cpus=workers or os.cpu_count() or 1)
            else:
                kwargs.update(address=address)
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise ConfigError(f"--ray {address}: cannot join a Ray cluster there ({exc})") from None
            self._owns = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=False)(_execute)

    def share(self, obj: Any) -> Shared:
        import ray

        return obj if isinstance(obj, Shared) else Shared(obj, ray.put(obj))

    def _run(self, fn: TaskFn, shared: Shared, tasks: Sequence[Task]) -> Iterator[tuple[str, bool, Any, str]]:
        import ray
        from ray.exceptions import RayTaskError

        holder = [shared.handle]
        pending = {self._remote.remote(fn, holder, t, self.threads): t.key for t in tasks}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    key = pending.pop(ref)
                    try:
                        item = (key, True, ray.get(ref), "")
                    except RayTaskError as exc:  # the task's own code raised: not retried
                        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                        item = (key, False, describe(cause), str(exc))
                    except ray.exceptions.RayError as exc:  # worker/node lost more than max_retries times
                        first = (str(exc).strip().splitlines() or [""])[0]
                        item = (key, False, f"{type(exc).__name__} after {self.max_retries} retries: {first}", str(exc))
                    yield item
        finally:
            for ref in pending:  # driver interrupted: do not leave tasks running
                ray.cancel(ref, force=True)

    def close(self) -> None:
        import ray

        if self._owns and ray.is_initialized():
            ray.shutdown()
        self._owns = False


def make_backend(ray_address: str | None, *, workers: int = 0, threads: int | None = None, **kwargs: Any) -> Backend:
    """`--ray` → a backend: None → SerialBackend(threads); "auto" → a local Ray; else join that cluster.

    >>> make_backend(None).name
    'serial'
    """
    if not ray_address:
        return SerialBackend(threads=threads)
    return RayBackend(ray_address, workers=workers, **kwargs)
