"""Execution backends for the analyses that fan out: serial (the default and the reference) and Ray.

A job is a list of `Task(key, args)` and a module-level function `fn(shared, *args) -> result`;
`backend.map(fn, shared, tasks)` runs them and returns the results in task order. `shared` (model,
calibration batches, evaluation set) is sent once — for Ray it goes into the object store once and
each worker process deserializes it once — and every task is seeded from its key and run with the
backend's thread count, so Ray's results equal the serial ones. Results are JSON values; with a
`Checkpoint` each is appended to a JSONL file as it arrives and a rerun skips finished tasks.

    >>> def square(offset, x):
    ...     return x * x + offset
    >>> SerialBackend().map(square, 1, [Task(f"x={x}", (x,)) for x in range(4)], progress=False)
    [1, 2, 5, 10]
"""
from qdet.parallel.backend import Backend, SerialBackend, Task, TaskError, task_seed
from qdet.parallel.checkpoint import Checkpoint, state_fingerprint

__all__ = [
    "Backend",
    "Checkpoint",
    "RayBackend",
    "SerialBackend",
    "Task",
    "TaskError",
    "make_backend",
    "state_fingerprint",
    "task_seed",
]


def __getattr__(name: str):  # Ray is optional: imported only when asked for
    if name in ("RayBackend", "make_backend"):
        from qdet.parallel import ray_backend

        return getattr(ray_backend, name)
    raise AttributeError(name)
