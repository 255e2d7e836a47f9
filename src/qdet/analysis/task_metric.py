"""The task metric (top-1, COCO mAP) as a cheap, repeatable `metric_fn(model) -> float` for sweeps.

Sensitivity sweeps, mixed-precision searches and calibration studies evaluate the same data tens of
times. `task_metric` decodes and preprocesses the evaluation set ONCE (CIFAR/ImageNet tensors,
YOLO letterboxed images with their letterbox geometry) and each call then only runs the model,
post-processing and the evaluator — the same functions `qdet eval` uses, so a value from here equals
`qdet eval` on the same model and runtime. Values are in points (top-1 in %, mAP × 100) so an
accuracy budget (`max_drop=0.3`) reads the same for classifiers and detectors.

`runtime_metric` measures the same metric on a real runtime: each call lowers the QuantizedModel in
its current quantizer state (layers switched float by a sensitivity sweep are exported float), so a
ranking or mixed-precision search can be done on what is deployed instead of the fake-quant reference.

    >>> import torch, qdet
    >>> from torch import nn
    >>> data = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))]
    >>> metric = classification_metric(data)
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(192, 2)).eval()
    >>> 0.0 <= metric(net) <= 100.0, metric.name
    (True, 'top-1 (%)')
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from qdet.errors import ConfigError
from qdet.eval.classification import topk_correct
from qdet.models.base import Task
from qdet.parallel.backend import shard_bounds

__all__ = ["TaskMetric", "classification_metric", "yolo_coco_metric", "runtime_metric", "sharded_metric", "shard_bounds",
           "check_metric_images", "task_metric"]


class TaskMetric:
    """A callable `metric(model) -> float` (higher is better, in points) with a display `name`."""

    name: str = "metric"

    def __call__(self, model: Callable[..., Any]) -> float:  # pragma: no cover - interface
        raise NotImplementedError


class classification_metric(TaskMetric):
    """Top-1 (%) over (images, labels) batches held in memory (batches are kept as given)."""

    name = "top-1 (%)"

    def __init__(self, batches: Iterable[tuple[Tensor, Tensor]], *, progress: bool = False) -> None:
        self.batches = [(x, torch.as_tensor(y).reshape(-1)) for x, y in tqdm(batches, desc="caching eval set",
                                                                             disable=not progress, leave=False)]
        self.n = sum(len(y) for _, y in self.batches)
        if self.n == 0:
            raise ConfigError("classification metric: the evaluation set is empty")

    @property
    def shard_units(self) -> int:
        """The cached batches: shards are contiguous ranges of them (`sharded_metric`)."""
        return len(self.batches)

    def shard(self, model: Callable[..., Any], start: int = 0, stop: int | None = None) -> int:
        """Top-1 correct count over batches [start, stop)."""
        correct = 0
        with torch.inference_mode():
            for x, y in self.batches[start:stop]:
                out = model(x)
                logits = out[0] if isinstance(out, (tuple, list)) else out
                correct += topk_correct(torch.as_tensor(logits), y, (1,))[1]
        return int(correct)

    def merge(self, parts: list[Any]) -> float:
        """The metric from the shards' results, in shard order."""
        return 100.0 * sum(parts) / self.n

    def __call__(self, model: Callable[..., Any]) -> float:
        return self.merge([self.shard(model)])


@dataclass(frozen=True)
class _Letterboxed:
    image: np.ndarray  # (S, S, 3) uint8, the network input before /255
    info: Any  # LetterboxInfo, to map boxes back to the original image
    image_id: int


class yolo_coco_metric(TaskMetric):
    """COCO mAP50-95 (× 100) of a YOLO detector (decoded (B, N, 5+nc) output) over a COCO dataset,
    with the reference evaluation settings of `run_yolo_on_coco` (square letterbox, conf 0.001, NMS 0.6)."""

    name = "mAP50-95 (pts)"

    def __init__(self, dataset: Any, *, img_size: int = 640, batch_size: int = 8, key: str = "map",
                 progress: bool = False) -> None:
        from qdet.models.yolo.postprocess import preprocess

        self.dataset, self.batch_size, self.key = dataset, batch_size, key
        self.items: list[_Letterboxed] = []
        for i in tqdm(range(len(dataset)), desc="letterboxing eval set", disable=not progress, leave=False):
            image, meta = dataset[i]
            lb, info = preprocess(image, img_size)
            self.items.append(_Letterboxed(lb, info, int(meta["image_id"])))
        if not self.items:
            raise ConfigError("COCO metric: the evaluation set is empty")
        self.last_result: Any = None  # the full CocoResult of the last call

    @property
    def shard_units(self) -> int:
        """Batches of `batch_size` images: shards are contiguous ranges of whole batches, so every image
        is run in the same batch as unsharded (batch composition can change float results)."""
        return -(-len(self.items) // self.batch_size)

    def shard(self, model: Callable[..., Any], start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """COCO-json detections of batches [start, stop)."""
        stop = self.shard_units if stop is None else stop
        return self.detections(model, start * self.batch_size, stop * self.batch_size)

    def merge(self, parts: list[Any]) -> float:
        """Detections of all shards concatenated (in image order) and scored once by pycocotools."""
        from qdet.eval.coco import evaluate_coco

        dets = [d for part in parts for d in part]
        self.last_result = evaluate_coco(dets, self.dataset.annotations_json, image_ids=self.dataset.image_ids)
        return 100.0 * float(getattr(self.last_result, self.key))

    def detections(self, model: Callable[..., Any], start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """COCO-json detections of `model` over the cached images [start, stop) (default: all)."""
        from qdet.models.yolo.detect import _detections, predictions, to_input
        from qdet.models.yolo.postprocess import non_max_suppression
        from qdet.data.coco import COCO80_TO_91

        out: list[dict[str, Any]] = []
        items = self.items[start:stop]
        with torch.inference_mode():
            for k in range(0, len(items), self.batch_size):
                chunk = items[k : k + self.batch_size]
                pred = predictions(model(to_input([c.image for c in chunk])), None)  # (B, N, 5+nc)
                for det, c in zip(non_max_suppression(pred, 0.001, 0.6, multi_label=True, max_det=300), chunk):
                    out += _detections(det, c.info, c.image_id, COCO80_TO_91)
        return out

    def __call__(self, model: Callable[..., Any]) -> float:
        return self.merge([self.detections(model)])


class runtime_metric(TaskMetric):
    """`metric` of a QuantizedModel lowered to `runtime` as it stands (enabled quantizers int8, disabled
    ones float: the graph the fake-quant model runs in that state, so a layer kept float also feeds its
    consumers float, whereas re-quantizing with `skip` gives them an input quantizer); other callables
    are evaluated as given. One export + compile per call (~5 s for YOLOv5n on OpenVINO); detectors run
    one image at a time because runtimes compile static shapes.

        metric = runtime_metric(task_metric(adapter), "openvino", threads=2)
        layer_sensitivity(qm, metric, mode="skip")   # each layer kept float, measured on OpenVINO
    """

    def __init__(self, metric: TaskMetric, runtime: str, *, threads: int | None = None) -> None:
        from qdet.runtimes.base import get_runtime

        self.metric, self.runtime = metric, get_runtime(runtime, threads=threads)  # fails early on a bad name
        self.name = f"{metric.name}, {self.runtime.name}"

    def __call__(self, model: Callable[..., Any]) -> float:
        from qdet.qmodel import QuantizedModel

        if not isinstance(model, QuantizedModel):
            return self.metric(model)
        lowered = self.runtime.lower(model, quantized=True)
        if not isinstance(self.metric, yolo_coco_metric):
            return self.metric(lowered)
        saved, self.metric.batch_size = self.metric.batch_size, 1
        try:
            return self.metric(lowered)
        finally:
            self.metric.batch_size = saved


def _shard_task(state: tuple[Any, Callable[..., Any]], start: int, stop: int) -> Any:
    metric, model = state
    return metric.shard(model, start, stop)


class sharded_metric(TaskMetric):
    """`metric` evaluated as image shards on `backend` (one task per shard), the shards' results merged
    and scored once: COCO detections concatenated and scored by pycocotools (not averaged per shard),
    top-1 correct counts summed. Equals `metric(model)`: every image is run in the same batch.

        value = sharded_metric(task_metric(adapter), RayBackend("auto"))(model)
    """

    def __init__(self, metric: TaskMetric, backend: Any, *, shards: int | None = None,
                 progress: bool = False) -> None:
        if not hasattr(metric, "shard"):
            raise ConfigError(f"sharded evaluation: {type(metric).__name__} cannot be split into image shards "
                              "(top-1 and YOLO COCO metrics can)")
        self.metric, self.backend, self.progress = metric, backend, progress
        self.shards = shards or backend.workers
        self.name = metric.name

    def __call__(self, model: Callable[..., Any]) -> float:
        from qdet.parallel import Task as ParallelTask  # not qdet.models.base.Task (the model's task kind)

        bounds = shard_bounds(self.metric.shard_units, self.shards)
        tasks = [ParallelTask(f"shard/{a}-{b}", (a, b)) for a, b in bounds]
        parts = self.backend.map(_shard_task, (self.metric, model), tasks, desc="sharded evaluation",
                                 progress=self.progress)
        return self.metric.merge(parts)


def check_metric_images(adapter: Any, on: str) -> None:
    """ConfigError unless `task_metric(adapter, on=on)` has images to measure on (checked before any work)."""
    if on not in ("eval", "calibration"):
        raise ConfigError(f"task metric: on={on!r}; choose 'eval' or 'calibration'")
    if on == "calibration" and not hasattr(adapter, "labeled_calibration_dataset"):
        raise ConfigError(f"model {adapter.name!r}: no labeled calibration set separate from the evaluation "
                          "images; measure the search on the evaluation set (--search-on eval)")


def task_metric(adapter: Any, *, data: str | None = None, eval_images: int | None = None, seed: int = 1,
                batch_size: int = 8, on: str = "eval", progress: bool = True) -> TaskMetric:
    """The adapter's task metric over its evaluation set (a seeded subset of `eval_images` for classifiers).

    Classifiers: top-1 (%); YOLO detectors: COCO mAP50-95 (pts). Other detectors raise a ConfigError.
    `on="calibration"` measures on the labeled calibration images instead (detectors only: classifiers
    calibrate on part of their evaluation folder), so that what a search selects there can be checked
    on evaluation images it never saw.
    """
    check_metric_images(adapter, on)
    if adapter.task is Task.CLASSIFICATION:
        from qdet.data.folders import make_loader, seeded_subset

        dataset = adapter.eval_dataset(data)
        if eval_images is not None and eval_images < len(dataset):
            dataset = seeded_subset(dataset, eval_images, seed=seed)
        return classification_metric(make_loader(dataset, 256), progress=progress)
    if getattr(adapter, "name", "").startswith("yolov5"):
        if eval_images is not None:
            raise ConfigError("--eval-images is supported for classifiers only; detectors evaluate the whole set")
        dataset = adapter.labeled_calibration_dataset(data) if on == "calibration" else adapter.eval_dataset(data)
        return yolo_coco_metric(dataset, img_size=adapter.img_size, batch_size=batch_size, progress=progress)
    raise ConfigError(f"model {adapter.name!r}: no cached task metric; use output SQNR (--metric sqnr)")

