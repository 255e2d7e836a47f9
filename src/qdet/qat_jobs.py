"""`qdet qat` for classifiers: float vs PTQ vs QAT on held-out images, one table, one saved model.

Split (seeded, stated in the table title): the evaluation folder (for the CIFAR ResNets, the
10,000 CIFAR-10 test images, the only CIFAR images bundled) is permuted with the seed; the first
`train_images` are for calibration and fine-tuning, the rest only for evaluation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from qdet import api
from qdet.config import QATConfig, QuantConfig
from qdet.data.folders import seeded_split
from qdet.errors import ConfigError
from qdet.jobs import JobOptions, JobResult
from qdet.models.base import Task
from qdet.qmodel import QuantizedModel
from qdet.train import ShuffledBatches, classification_loss, stack_dataset, train_qat


@dataclass(frozen=True)
class QATOptions:
    """Fine-tuning options of `qdet qat`."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-4
    train_images: int = 5000
    schedule: QATConfig = field(default_factory=QATConfig)


def classification_qat_job(adapter: Any, model: torch.nn.Module, cfg: QuantConfig, opts: JobOptions,
                           qopts: QATOptions) -> tuple[JobResult, QuantizedModel]:
    """PTQ and QAT of a classifier with the same config; top-1 of float, PTQ, QAT on held-out data."""
    if adapter.task is not Task.CLASSIFICATION:
        raise ConfigError(f"`qdet qat` supports classifiers; {adapter.name} is a detector "
                          "(detector QAT needs a detection loss: use qdet.prepare_qat with your own loop)")
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
    t0 = time.perf_counter()
    log = train_qat(qat_model, batches, classification_loss, steps=qopts.steps, lr=qopts.lr, progress=opts.progress)
    train_s = time.perf_counter() - t0
    qmodel = api.convert(qat_model)
    low_bit = min(s.bits for s in (cfg.weights, cfg.activations)) < 8  # type: ignore[union-attr]
    runtime = "reference" if low_bit else opts.runtime
    rows: list[dict[str, Any]] = []
    for label, fn in (("float", model), (f"PTQ ({runtime})", api.lower(ptq, runtime, threads=opts.threads)),
                      (f"QAT {qopts.steps} steps ({runtime})", api.lower(qmodel, runtime, threads=opts.threads))):
        res = api.evaluate(fn, adapter, eval_set, progress=opts.progress)
        rows.append({"model": label, "top1": res.top1, "top5": res.top5})
    drop = rows[0]["top1"] - rows[1]["top1"]
    for r in rows:
        r["d_top1"] = r["top1"] - rows[0]["top1"]
    rows[2]["recovered_pct"] = 100.0 * (rows[2]["top1"] - rows[1]["top1"]) / drop if drop > 0 else None
    meta = {"model": adapter.name, "config": cfg.to_dict(), "seed": opts.seed, "train_images": len(x_tr),
            "eval_images": len(eval_set), "calibration_images": n_calib, "steps": qopts.steps,
            "batch_size": qopts.batch_size, "lr": qopts.lr, "train_seconds": train_s, "events": log.events,
            "last_loss": sum(log.losses[-20:]) / len(log.losses[-20:]), "runtime": runtime}
    qmodel.metrics = {"rows": rows, **meta}
    title = (f"{adapter.name}: float vs PTQ vs QAT, top-1 on {len(eval_set)} held-out images (seed {opts.seed} split: "
             f"{len(x_tr)} images for calibration/fine-tuning, disjoint from them); QAT {qopts.steps} steps of "
             f"{qopts.batch_size}, Adam lr {qopts.lr}, {train_s:.0f} s")
    return JobResult(title, rows, ["model", "top1", "top5", "d_top1", "recovered_pct"], meta), qmodel
