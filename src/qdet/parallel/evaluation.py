"""An adapter's evaluation in image shards on a backend (Ray): the same numbers as one pass, sooner.

Every detector adapter's `evaluate` is `score(predict(model, data), data)`: `predict(..., indices=)`
runs the model over some images and returns JSON values (COCO detections, KITTI frames), so the
lists of contiguous index ranges concatenate to the list of their union; `score` runs the evaluator
once. A sharded evaluation makes each range a task, concatenates the shards' lists in image order
and scores them ONCE — pycocotools sees every detection, nothing is averaged per shard. Classifiers
add up top-1/top-5 hit counts. Shards are whole evaluation batches (`eval_batch_size`, 256 images for
classifiers), so every image runs in the batch it runs in unsharded.

A model lowered to OpenVINO or onnxruntime travels as its ONNX graphs and is compiled again in
each worker, with the worker's thread count (~1 s; exporting YOLOv5n's QDQ graph again would cost
~23 s per worker). What does not pickle (the `torch` runtime's quantized modules) travels as
`OnRuntime`: the QuantizedModel and the runtime's name, lowered once per worker on its first shard.

    >>> import types, torch, qdet
    >>> from torch.utils.data import TensorDataset
    >>> from qdet.models.base import Task
    >>> from qdet.parallel import SerialBackend
    >>> data = TensorDataset(torch.randn(600, 3, 4, 4), torch.randint(0, 3, (600,)))
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)).eval()
    >>> adapter = types.SimpleNamespace(name="tiny", task=Task.CLASSIFICATION)
    >>> sharded = evaluate_sharded(net, adapter, data, SerialBackend(), shards=3, progress=False)
    >>> sharded == qdet.evaluate(net, adapter, data, progress=False)
    True
"""
from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

from torch import nn

from qdet.errors import ConfigError
from qdet.models.base import Task as ModelTask
from qdet.parallel.backend import Backend, Task, shard_bounds
from qdet.runtimes.base import set_runtime_threads

__all__ = ["CLASSIFIER_BATCH", "OnRuntime", "evaluate_sharded", "portable", "shard_ranges"]

CLASSIFIER_BATCH = 256  # `qdet.evaluate`'s batch for classifiers: a shard holds whole batches of it


class OnRuntime:
    """`module` (a QuantizedModel or its float twin) lowered to `runtime` in the process that runs it:
    pickles as the module and the runtime's name, lowers on the first `get()` there, then reuses it."""

    def __init__(self, module: Any, runtime: str, *, quantized: bool) -> None:
        self.module, self.runtime, self.quantized = module, runtime, quantized
        self._lowered: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_lowered": None}  # a lowered copy stays in the process that built it

    def get(self, threads: int | None = None) -> Any:
        """The lowered model (built once per process, with `threads` runtime threads)."""
        if self._lowered is None:
            from qdet import api

            self._lowered = api.lower(self.module, self.runtime, quantized=self.quantized, threads=threads)
        return self._lowered


def portable(lowered: Any, module: Callable[[], Any], runtime: str, *, quantized: bool) -> Any:
    """What a worker receives for `lowered` (`module()` on `runtime`): `lowered` itself when it pickles
    (ONNX runtimes: the graphs travel, compiled again there), else an `OnRuntime` of `module()`."""
    try:
        pickle.loads(pickle.dumps(lowered))  # a round trip: PyTorch's quantized modules pickle, then fail to load
    except Exception:  # noqa: BLE001 - any pickling failure: lower it where it runs instead
        return OnRuntime(module(), runtime, quantized=quantized)
    return lowered


def shard_ranges(n_images: int, batch: int, shards: int) -> list[tuple[int, int]]:
    """Image ranges [a, b) of `shards` near-equal runs of whole `batch`-image batches.

    >>> shard_ranges(10, 4, 2)  # three batches of 4: two shards
    [(0, 8), (8, 10)]
    """
    units = -(-n_images // batch)
    return [(a * batch, min(b * batch, n_images)) for a, b in shard_bounds(units, shards)]


def _predict_shard(state: tuple[Any, Any, Any, int | None], start: int, stop: int) -> list[Any]:
    adapter, model, data, threads = state
    if isinstance(model, OnRuntime):
        model = model.get(threads)
    elif threads is not None and isinstance(model, nn.Module):
        set_runtime_threads(model, threads)  # a received lowered model: compiled with this worker's threads
    if adapter.task is ModelTask.CLASSIFICATION:
        from torch.utils.data import Subset

        from qdet.data.folders import make_loader
        from qdet.eval.classification import count_topk

        correct, n = count_topk(model, make_loader(Subset(data, range(start, stop)), CLASSIFIER_BATCH), progress=False)
        return [[correct[1], correct[5], n]]
    return adapter.predict(model, data, indices=range(start, stop), progress=False)


def evaluate_sharded(model: Callable[..., Any] | OnRuntime, adapter: Any, data: Any, backend: Backend, *,
                     shards: int | None = None, progress: bool = True, desc: str | None = None) -> Any:
    """What `qdet.evaluate(model, adapter, data)` returns, measured as image shards on `backend`.

    `shards` defaults to 4 per worker (the progress bar moves, a slow shard does not hold the rest);
    `model` is anything picklable the adapter evaluates (see `portable`), or an `OnRuntime`. Each
    shard runs with the backend's threads — torch's and the runtime regions' (on the serial backend
    this re-targets the caller's lowered model) — so Ray's 1-thread workers give the numbers of a
    one-pass evaluation with 1 thread.
    """
    if adapter.task is ModelTask.CLASSIFICATION:
        batch = CLASSIFIER_BATCH
    elif callable(getattr(adapter, "predict", None)) and callable(getattr(adapter, "score", None)):
        batch = getattr(adapter, "eval_batch_size", 1)
    else:
        raise ConfigError(f"model {getattr(adapter, 'name', adapter)!r}: its evaluation cannot be split into image "
                          "shards (the adapter has no predict/score); evaluate it without --ray")
    if len(data) == 0:
        raise ConfigError("sharded evaluation: the evaluation set is empty")
    label = desc or getattr(adapter, "name", "evaluation")
    tasks = [Task(f"{label}/images {a}-{b}", (a, b))
             for a, b in shard_ranges(len(data), batch, shards or 4 * backend.workers)]
    parts = backend.map(_predict_shard, (adapter, model, data, backend.threads), tasks, desc=f"{label}: image shards",
                        progress=progress)
    predictions = [p for part in parts for p in part]
    if adapter.task is ModelTask.CLASSIFICATION:
        from qdet.eval.classification import topk_result

        return topk_result({1: sum(p[0] for p in predictions), 5: sum(p[1] for p in predictions)},
                           sum(p[2] for p in predictions))
    return adapter.score(predictions, data)
