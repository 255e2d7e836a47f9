"""The backend interface, the serial reference backend, per-task seeding and failure reporting.

    >>> def add(shared, x):
    ...     return shared + x
    >>> SerialBackend().map(add, 10, [Task("a", (1,)), Task("b", (2,))], progress=False)
    [11, 12]
"""
from __future__ import annotations

import json
import random
import traceback
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qdet.errors import ConfigError, QdetError
from qdet.parallel.checkpoint import Checkpoint

__all__ = ["Backend", "SerialBackend", "Shared", "Task", "TaskError", "describe", "run_one", "shard_bounds", "task_seed"]

TaskFn = Callable[..., Any]  # fn(shared, *args) -> a JSON value


@dataclass(frozen=True)
class Task:
    """One unit of work: `key` names it (unique in a job; the checkpoint key and the seed), `args`
    follow `shared` in the call."""

    key: str
    args: tuple[Any, ...] = ()


class TaskError(QdetError):
    """Tasks raised an exception (a model reason: reported, not retried); the others finished and,
    with a checkpoint, are not redone by a rerun. `failures` maps task key → "Type: message";
    `details` holds the tracebacks."""

    def __init__(self, failures: dict[str, str], details: dict[str, str] | None = None, total: int = 0) -> None:
        self.failures, self.details = dict(failures), dict(details or {})
        first_key, first = next(iter(self.failures.items()))
        more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
        super().__init__(f"{len(self.failures)} of {total or len(self.failures)} task(s) failed; task "
                         f"{first_key!r}: {first}{more}")


def task_seed(key: str) -> int:
    """The seed of the task named `key`: the same in every process and run (crc32, not Python's
    salted `hash`).

    >>> task_seed("layer:conv1") == task_seed("layer:conv1")
    True
    """
    return zlib.crc32(key.encode("utf-8"))


def shard_bounds(units: int, shards: int) -> list[tuple[int, int]]:
    """`units` split into `shards` contiguous, near-equal, non-empty ranges.

    >>> shard_bounds(20, 3)
    [(0, 7), (7, 13), (13, 20)]
    """
    shards = max(1, min(shards, units))
    edges = [round(i * units / shards) for i in range(shards + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def run_one(fn: TaskFn, shared: Any, task: Task, threads: int | None) -> Any:
    """Run one task the way every backend does: torch threads pinned, torch/numpy/random seeded from
    the key, the result normalised to what JSON gives back (so a fresh result and one read from a
    checkpoint are the same values and types)."""
    seed = task_seed(task.key)
    old = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        return json.loads(json.dumps(fn(shared, *task.args)))
    finally:
        torch.set_num_threads(old)


def describe(exc: BaseException) -> str:
    """"Type: first line of the message": how a failed task is reported."""
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}".rstrip(": ")


@dataclass(frozen=True)
class Shared:
    """State sent to the workers once (`Backend.share`): the object, and its handle on the backend
    (the object itself for the serial backend, an object-store reference for Ray)."""

    obj: Any
    handle: Any


class Backend:
    """Runs `fn(shared, *task.args)` for each task; `workers` run at once, each task with `threads`
    torch threads (None: leave the process's setting)."""

    name = "serial"

    def __init__(self, workers: int = 1, threads: int | None = None) -> None:
        self.workers, self.threads = workers, threads

    def __repr__(self) -> str:
        return f"{type(self).__name__}(workers={self.workers}, threads={self.threads})"

    def share(self, obj: Any) -> Shared:
        """Send `obj` to the workers once; pass the result to several `map` calls of one job."""
        return obj if isinstance(obj, Shared) else Shared(obj, obj)

    def map(self, fn: TaskFn, shared: Any, tasks: Sequence[Task], *, desc: str = "tasks", progress: bool = True,
            checkpoint: Checkpoint | None = None) -> list[Any]:
        """Results in task order. `shared` is an object or what `share` returned. Finished tasks found
        in `checkpoint` are not run again; new results are appended to it as they arrive. A task that
        raises does not stop the others: once all have finished, a TaskError names the failed ones
        and their errors."""
        keys = [t.key for t in tasks]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ConfigError(f"task keys must be unique in a job; {dup!r} repeats")
        done: dict[str, Any] = {}
        if checkpoint is not None:
            done = {k: checkpoint[k] for k in keys if k in checkpoint}
        todo = [t for t in tasks if t.key not in done]
        failures: dict[str, str] = {}
        details: dict[str, str] = {}
        if todo:
            handle = self.share(shared)
            with tqdm(total=len(tasks), initial=len(done), desc=desc, disable=not progress, leave=False) as bar:
                for key, ok, value, detail in self._run(fn, handle, todo):
                    bar.update()
                    if ok:
                        done[key] = value
                        if checkpoint is not None:
                            checkpoint.add(key, value)
                    else:
                        failures[key], details[key] = value, detail
        if failures:
            raise TaskError(failures, details, total=len(tasks))
        return [done[k] for k in keys]

    def _run(self, fn: TaskFn, shared: Shared, tasks: Sequence[Task]) -> Iterator[tuple[str, bool, Any, str]]:
        """Yield (key, ok, result or error message, traceback) as tasks finish, in any order."""
        for task in tasks:
            try:
                yield task.key, True, run_one(fn, shared.obj, task, self.threads), ""
            except Exception as exc:  # noqa: BLE001 - reported with the task's name once the job is done
                yield task.key, False, describe(exc), traceback.format_exc()

    def close(self) -> None:
        """Release what the backend started (nothing for the serial one)."""

    def __enter__(self) -> Backend:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialBackend(Backend):
    """Tasks one after another in this process: the default, and the reference the others must equal."""
