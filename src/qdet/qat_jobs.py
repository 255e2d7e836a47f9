"""`qdet qat`: float vs PTQ vs QAT on held-out images, one table, one saved model.

Classifiers (`classification_qat_job`), split seeded and stated in the table title: the evaluation
folder (for the CIFAR ResNets, the 10,000 CIFAR-10 test images, the only CIFAR images bundled) is
permuted with the seed; the first `train_images` are for calibration and fine-tuning, the rest only
for evaluation.

Detectors (`detection_qat_job`, YOLOv5): calibration and fine-tuning on the COCO train2017 images
(letterboxed as at inference, no augmentation), COCO mAP on the val2017 images; the two sets are
disjoint by construction. The loss is qdet's YOLOv5 loss (`qdet.models.yolo.loss`). Detectors
without a recipe here (Faster R-CNN) train through the Python API: `qdet.prepare_qat`, a loop over
torchvision's own losses (`model(images, targets)` in train mode), `qdet.convert`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable

import torch
from torch import nn

from qdet import api
from qdet.bench.latency import torch_threads
from qdet.config import QATConfig, QuantConfig
from qdet.data.folders import seeded_split
from qdet.errors import ConfigError
from qdet.jobs import JobOptions, JobResult, calibration_loader, headline_metrics
from qdet.models.base import Task
from qdet.qmodel import QuantizedModel
from qdet.train import ShuffledBatches, classification_loss, stack_dataset, train_qat


@dataclass(frozen=True)
class QATOptions:
    """Fine-tuning options of `qdet qat` (defaults: the classifier recipe; `DETECTION_DEFAULTS` for YOLO).

    train_images: classifiers only (the seeded split); detectors train on all train2017 images.
    img_size: detectors only, letterbox size for calibration, fine-tuning and evaluation (None: the
    adapter's). device: where the fine-tuning runs (evaluation and conversion run on the CPU).
    """

    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-4
    train_images: int = 5000
    schedule: QATConfig = field(default_factory=QATConfig)
    img_size: int | None = None
    device: str = "cpu"


# YOLOv5 at 640 on the 160 bundled train2017 images: batches of 8 (CPU memory), a 10× lower lr than
# the classifiers (the COCO weights are converged; 1e-4 moved mAP down in the first tens of steps).
DETECTION_DEFAULTS = QATOptions(steps=200, batch_size=8, lr=1e-5,
                                schedule=QATConfig(freeze_bn_after=1, freeze_observers_after=100))


def classification_qat_job(adapter: Any, model: torch.nn.Module, cfg: QuantConfig, opts: JobOptions,
                           qopts: QATOptions) -> tuple[JobResult, QuantizedModel]:
    """PTQ and QAT of a classifier with the same config; top-1 of float, PTQ, QAT on held-out data."""
    if adapter.task is not Task.CLASSIFICATION:
        raise ConfigError(f"{adapter.name} is a detector: use detection_qat_job")
    torch.manual_seed(opts.seed)
    train_set, eval_set = seeded_split(adapter.eval_dataset(opts.data), qopts.train_images, seed=opts.seed)
    x_tr, y_tr = stack_dataset(train_set, progress=opts.progress)
    if opts.eval_images is not None:
        eval_set = torch.utils.data.Subset(eval_set, list(range(min(opts.eval_images, len(eval_set)))))
    n_calib = min(opts.calib_images, len(x_tr))
    calib = [(x_tr[i:i + opts.calib_batch], y_tr[i:i + opts.calib_batch]) for i in range(0, n_calib, opts.calib_batch)]
    ptq = api.quantize(model, calib, cfg, adapter=adapter, progress=opts.progress)
    schedule = replace(qopts.schedule, calibration_batches=len(calib))
    qat_model = api.prepare_qat(model, calib, cfg, qat=schedule, adapter=adapter, progress=opts.progress)
    batches = ShuffledBatches(x_tr, y_tr, batch_size=qopts.batch_size, seed=opts.seed, augment=True)
    device = torch.device(qopts.device)
    t0 = time.perf_counter()
    log = train_qat(qat_model.to(device), batches, classification_loss, steps=qopts.steps, lr=qopts.lr,
                    transform_fn=lambda b: b[0].to(device), progress=opts.progress)
    train_s = time.perf_counter() - t0
    qmodel = api.convert(qat_model.cpu())
    rows = _float_ptq_qat_rows(adapter, model, ptq, qmodel, eval_set, opts, cfg, qopts.steps)
    runtime = rows[-1]["runtime"]
    meta = {"model": adapter.name, "config": cfg.to_dict(), "seed": opts.seed, "train_images": len(x_tr),
            "eval_images": len(eval_set), "calibration_images": n_calib, "steps": qopts.steps,
            "batch_size": qopts.batch_size, "lr": qopts.lr, "train_seconds": train_s, "events": log.events,
            "last_loss": sum(log.losses[-20:]) / len(log.losses[-20:]), "runtime": runtime}
    qmodel.metrics = {"rows": rows, **meta}
    title = (f"{adapter.name}: float vs PTQ vs QAT, top-1 on {len(eval_set)} held-out images (seed {opts.seed} split: "
             f"{len(x_tr)} images for calibration/fine-tuning, disjoint from them); QAT {qopts.steps} steps of "
             f"{qopts.batch_size}, Adam lr {qopts.lr}, {train_s:.0f} s")
    return JobResult(title, rows, ["model", "top1", "top5", "d_top1", "recovered_pct"], meta), qmodel


@dataclass
class DetectionRecipe:
    """How one detector family fine-tunes: its training batches, the module `train_qat` trains
    (the QAT model or one of its regions), the loss on that module's outputs, and batch → inputs."""

    data: Iterable[Any]
    module: nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    transform_fn: Callable[[Any], Any]
    images: int


def yolo_recipe(adapter: Any, model: nn.Module, qat_model: QuantizedModel, opts: JobOptions, qopts: QATOptions,
                device: torch.device) -> DetectionRecipe:
    """YOLOv5: the quantized body's raw maps → qdet's YOLOv5 loss, on letterboxed train2017 images."""
    from torch.utils.data import DataLoader

    from qdet.errors import DataError
    from qdet.models.yolo.loss import YoloV5Loss
    from qdet.models.yolo.train_data import CocoYoloTargets, collate_targets, yolo_loss_fn

    nc = model.no - 5
    if nc != 80:
        raise ConfigError(f"{adapter.name}: the COCO training targets have 80 classes, the model {nc}")
    dataset = CocoYoloTargets(adapter.coco("train2017", opts.data), adapter.img_size)
    if len(dataset) < qopts.batch_size:
        raise DataError(f"{len(dataset)} train2017 images are fewer than one batch of {qopts.batch_size}")
    loader = DataLoader(dataset, batch_size=qopts.batch_size, shuffle=True, collate_fn=collate_targets,
                        generator=torch.Generator().manual_seed(opts.seed), drop_last=True)
    loss = YoloV5Loss(model.anchors, model.stride, nc=nc, img_size=adapter.img_size)
    return DetectionRecipe(loader, qat_model.model.body, yolo_loss_fn(loss), lambda b: b[0].to(device), len(dataset))


def detection_recipe(adapter: Any) -> Callable[..., DetectionRecipe]:
    """The fine-tuning recipe for `adapter`; a ConfigError naming the Python API route when none exists."""
    from qdet.models.yolo.adapter import YoloAdapter

    if isinstance(adapter, YoloAdapter):
        return yolo_recipe
    raise ConfigError(
        f"`qdet qat` has no fine-tuning recipe for {adapter.name} (recipes: classifiers, YOLOv5). Fine-tune it "
        "through the Python API: qm = qdet.prepare_qat(model, calib, cfg, adapter=adapter); for torchvision "
        "Faster R-CNN sum the loss dict of qm(images, targets) in train mode (qdet.train.train_qat does the "
        "loop and the freeze schedule); then qdet.convert(qm)")


def _with_img_size(adapter: Any, img_size: int | None) -> Any:
    if img_size is None:
        return adapter
    if "img_size" not in {f.name for f in fields(adapter)}:
        raise ConfigError(f"--img-size: {adapter.name} has no fixed input size")
    return replace(adapter, img_size=img_size)


def detection_qat_job(adapter: Any, model: torch.nn.Module, cfg: QuantConfig, opts: JobOptions,
                      qopts: QATOptions) -> tuple[JobResult, QuantizedModel]:
    """PTQ and QAT of a detector with the same config and calibration images (train2017); COCO mAP of
    float, PTQ and QAT on the evaluation images (val2017), all at the same letterbox size."""
    recipe_fn = detection_recipe(adapter)
    if opts.eval_images is not None:
        raise ConfigError("--eval-images is supported for classifiers only; detectors evaluate the whole val2017 set")
    adapter = _with_img_size(adapter, qopts.img_size)
    torch.manual_seed(opts.seed)
    with torch_threads(opts.threads):
        calib = calibration_loader(adapter, opts)
        ptq = api.quantize(model, calib, cfg, adapter=adapter, progress=opts.progress)
        schedule = replace(qopts.schedule, calibration_batches=len(calib))
        qat_model = api.prepare_qat(model, calib, cfg, qat=schedule, adapter=adapter, progress=opts.progress)
        device = torch.device(qopts.device)
        qat_model.to(device)
        recipe = recipe_fn(adapter, model, qat_model, opts, qopts, device)
        t0 = time.perf_counter()
        log = train_qat(recipe.module, recipe.data, recipe.loss_fn, steps=qopts.steps, lr=qopts.lr,
                        transform_fn=recipe.transform_fn, qat=schedule, progress=opts.progress)
        train_s = time.perf_counter() - t0
        qmodel = api.convert(qat_model.cpu())
        eval_set = adapter.eval_dataset(opts.data)
        rows = _float_ptq_qat_rows(adapter, model, ptq, qmodel, eval_set, opts, cfg, qopts.steps)
    n = min(10, len(log.losses))
    meta = {"model": adapter.name, "config": cfg.to_dict(), "seed": opts.seed, "train_split": "train2017",
            "eval_split": "val2017", "train_images": recipe.images, "eval_images": len(eval_set),
            "calibration_images": len(calib.dataset), "img_size": adapter.img_size, "steps": qopts.steps,
            "batch_size": qopts.batch_size, "lr": qopts.lr, "freeze_bn_after": schedule.freeze_bn_after,
            "freeze_observers_after": schedule.freeze_observers_after, "device": qopts.device,
            "train_seconds": train_s, "events": log.events, "first_loss": sum(log.losses[:n]) / n,
            "last_loss": sum(log.losses[-n:]) / n, "runtime": rows[-1]["runtime"], "threads": opts.threads}
    qmodel.metrics = {"rows": rows, **meta}
    title = (f"{adapter.name}: float vs PTQ vs QAT, COCO mAP on {len(eval_set)} val2017 images; calibration "
             f"({len(calib.dataset)} images) and fine-tuning on the {recipe.images} train2017 images; QAT "
             f"{qopts.steps} steps of {qopts.batch_size} at {adapter.img_size}, Adam lr {qopts.lr}, BN frozen after "
             f"{schedule.freeze_bn_after}, observers after {schedule.freeze_observers_after}, {train_s:.0f} s "
             f"on {qopts.device}")
    return JobResult(title, rows, ["model", "map50_95_pts", "map50_pts", "d_map50_95_pts", "recovered_pct"], meta), qmodel


def _float_ptq_qat_rows(adapter: Any, model: nn.Module, ptq: QuantizedModel, qat: QuantizedModel, eval_set: Any,
                        opts: JobOptions, cfg: QuantConfig, steps: int) -> list[dict[str, Any]]:
    """float (PyTorch eager), PTQ and QAT on the runtime (the reference simulation for activations below
    8 bits; narrower signed weights run as int8 codes), each with the task's two headline metrics, the
    change vs float and the share of the PTQ drop QAT recovered."""
    from qdet.quant.quantizer import is_narrow_weight_spec

    weights, acts = cfg.weights, cfg.activations
    runs_int8 = acts.bits == 8 and (weights.bits == 8 or is_narrow_weight_spec(weights))  # type: ignore[union-attr]
    runtime = opts.runtime if runs_int8 else "reference"
    rows: list[dict[str, Any]] = []
    for label, rt, fn in (("float", "torch", model),
                          (f"PTQ ({runtime})", runtime, api.lower(ptq, runtime, threads=opts.threads)),
                          (f"QAT {steps} steps ({runtime})", runtime, api.lower(qat, runtime, threads=opts.threads))):
        res = api.evaluate(fn, adapter, eval_set, progress=opts.progress, desc=label)
        rows.append({"model": label, "runtime": rt, **headline_metrics(res)})
    key = next(k for k in rows[0] if k not in ("model", "runtime"))
    for r in rows:
        r[f"d_{key}"] = r[key] - rows[0][key]
    drop = rows[0][key] - rows[1][key]
    rows[2]["recovered_pct"] = 100.0 * (rows[2][key] - rows[1][key]) / drop if drop > 0 else None
    return rows
