"""End-to-end jobs behind the CLI: quantize → evaluate → measure size and speed → one table.

Each job returns a `JobResult` (rows for the side-by-side table + metadata) that the CLI prints
and writes as JSON; the numbers are also stored in the saved `.qdet` file.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qdet import api
from qdet.config import QuantConfig
from qdet.data.folders import make_loader, seeded_subset
from qdet.qmodel import QuantizedModel, float_twin
from qdet.bench.latency import torch_threads
from qdet.coverage import coverage, warn_if_runtime_float
from qdet.errors import ConfigError
from qdet.models.base import Task
from qdet.report.table import format_table


@dataclass
class JobResult:
    title: str
    rows: list[dict[str, Any]]
    columns: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # printed after the table (e.g. the coverage summary)

    def table(self) -> str:
        return "\n".join([format_table(self.rows, self.columns), *self.notes])

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "rows": self.rows, "meta": self.meta}


@dataclass(frozen=True)
class JobOptions:
    """What the CLI collects for a quantize/eval/bench job."""

    calib_images: int = 512
    calib_batch: int = 32
    eval_images: int | None = None  # None: the whole evaluation set
    seed: int = 0
    runtime: str = "onnxruntime"
    threads: int = 2
    bench: bool = True
    repeats: int = 20
    data: str | None = None
    progress: bool = True
    with_reference: bool = False  # classifiers: also evaluate the (slow) fake-quant reference simulation
    ray: str | None = None  # evaluate in image shards on Ray: "auto" (local) or a cluster address
    ray_workers: int = 0  # with ray="auto": worker processes (0: one per core)


def calibration_loader(adapter: Any, opts: JobOptions) -> Any:
    """A seeded calibration subset through the inference preprocessing.

    Detectors calibrate on their own training images (`calibration_dataset`), never on the
    evaluation images; the CIFAR models only have the test folder (see README).
    """
    source = getattr(adapter, "calibration_dataset", None) or adapter.eval_dataset
    dataset = source(opts.data)
    subset = seeded_subset(dataset, min(opts.calib_images, len(dataset)), seed=opts.seed)
    return make_loader(subset, opts.calib_batch, collate_fn=getattr(adapter, "collate", None))


def build_model(adapter: Any, weights: str | None, num_classes: int | None = None) -> torch.nn.Module:
    """The float model for `weights`; `num_classes` (the CLI's --num-classes) only when given."""
    options = {} if num_classes is None else {"num_classes": num_classes}
    return adapter.build(weights, **options)


def timing_input(batch: Any, n: int = 1) -> Any:
    """The first `n` images of a calibration batch, as the model takes them: a list of (3, H, W)
    images for detectors whose loader yields such lists, else the first rows of the (B, 3, H, W) tensor."""
    if isinstance(batch, list) and batch and all(isinstance(x, torch.Tensor) and x.dim() == 3 for x in batch):
        return batch[:n]
    return (batch[0] if isinstance(batch, (tuple, list)) else batch)[:n]


def _eval_dataset(adapter: Any, opts: JobOptions) -> Any:
    dataset = adapter.eval_dataset(opts.data)
    if opts.eval_images is not None and opts.eval_images < len(dataset):
        if adapter.task is not Task.CLASSIFICATION:
            raise ConfigError("--eval-images is supported for classifiers only; detectors evaluate the whole set")
        dataset = seeded_subset(dataset, opts.eval_images, seed=opts.seed + 1)
    return dataset


def compare_job(adapter: Any, model: torch.nn.Module, cfg: QuantConfig, opts: JobOptions,
                qmodel: QuantizedModel | None = None) -> tuple[JobResult, QuantizedModel]:
    """Quantize (unless `qmodel` is given), then float vs int8 side by side: the task metric on the
    same data, size on disk and latency on the same input and threads."""
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    calib = calibration_loader(adapter, opts)
    if qmodel is None:
        # calibration under --threads too: the thread count changes float summation order, which alone
        # moved YOLOv5n's int8 mAP by 0.35 points on 158 images (README)
        with torch_threads(opts.threads):
            qmodel = api.quantize(model, calib, cfg, adapter=adapter, progress=opts.progress)
    quant_s = time.perf_counter() - t0
    eval_set = _eval_dataset(adapter, opts)
    lowered_q = api.lower(qmodel, opts.runtime, threads=opts.threads)
    lowered_f = lower_float(adapter, model, qmodel, opts.runtime, threads=opts.threads)
    candidates = {
        "float (PyTorch eager)": ("torch", model),
        f"float ({opts.runtime})": (opts.runtime, lowered_f),
        f"int8 ({opts.runtime})": (opts.runtime, lowered_q),
    }
    if opts.with_reference and adapter.task is Task.CLASSIFICATION and opts.runtime != "reference":
        candidates["int8 (reference simulation)"] = ("reference", qmodel)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    if opts.ray:
        from qdet.parallel.evaluation import portable

        shipped = {  # what the workers receive (a lowered model that does not pickle is lowered there)
            "float (PyTorch eager)": model,
            f"float ({opts.runtime})": portable(lowered_f, lambda: float_twin_for(adapter, model, qmodel),
                                                opts.runtime, quantized=False),
            f"int8 ({opts.runtime})": portable(lowered_q, lambda: qmodel, opts.runtime, quantized=True),
            "int8 (reference simulation)": qmodel,
        }
        jobs = {label: (runtime, shipped[label]) for label, (runtime, _) in candidates.items()}
        notes.append(_evaluate_on_ray(adapter, eval_set, opts, jobs, rows))
    else:
        for label, (runtime, fn) in candidates.items():
            with torch_threads(opts.threads):
                res = api.evaluate(fn, adapter, eval_set, progress=opts.progress, desc=label)
            rows.append({"model": label, "runtime": runtime, **headline_metrics(res)})
    metric_keys = tuple(k for k in rows[0] if k not in ("model", "runtime"))
    key = metric_keys[0]
    for r in rows:
        r[f"d_{key}"] = r[key] - rows[0][key]
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {
            "float (PyTorch eager)": _state_dict_size(model, Path(tmp) / "f.safetensors"),
            f"float ({opts.runtime})": _saved_size(lowered_f, Path(tmp) / "f"),
            f"int8 ({opts.runtime})": _saved_size(lowered_q, Path(tmp) / "q"),
            "int8 (reference simulation)": api.save(qmodel, Path(tmp) / "q.qdet").stat().st_size / 1e6,
        }
    for r in rows:
        size = sizes.get(r["model"])
        r["size_mb"] = None if size is None else round(size, 2)
    if opts.bench:
        x = timing_input(next(iter(calib)))
        timed = api.benchmark({k: (rt, fn, None) for k, (rt, fn) in candidates.items()}, (x,),
                              threads=opts.threads, repeats=opts.repeats, progress=opts.progress)
        eager, same = timed[0].latency.median_ms, timed[1].latency.median_ms
        for r, t in zip(rows, timed):
            r["latency_ms"] = t.latency.median_ms
            if t.runtime == "reference" and opts.runtime != "reference":
                continue  # a simulation, not a deployment: a speed-up would mislead
            r["speedup_vs_eager"] = eager / t.latency.median_ms
            if t.runtime == opts.runtime:
                r["speedup_vs_same_runtime_fp32"] = same / t.latency.median_ms
    meta = {
        "model": adapter.name, "config": cfg.to_dict(), "calibration_images": len(calib.dataset),
        "calibration_batches": qmodel.calibration_batches, "eval_images": len(eval_set),
        "threads": opts.threads, "seed": opts.seed, "runtime": opts.runtime, "quantize_seconds": quant_s,
    }
    if opts.ray:
        meta["evaluation"] = notes[-1]
    cov = coverage(qmodel)
    warn_if_runtime_float(cov.add_runtime(lowered_q))  # what the runtime really executes in int8
    meta["coverage"] = cov.as_dict()
    kept = {k: qmodel.metrics[k] for k in ("ptq_layers", "cle_pairs") if k in qmodel.metrics}  # PTQ algorithms' records
    qmodel.metrics = {"rows": rows, **meta, **kept}
    cols = ["model", *metric_keys, f"d_{key}", "size_mb"]
    if opts.bench:  # untimed jobs (eval, --no-bench) show no empty latency columns
        cols += ["latency_ms", "speedup_vs_eager", "speedup_vs_same_runtime_fp32"]
    threads = "evaluated by 1-thread Ray workers" if opts.ray else f"{opts.threads} threads"
    title = f"{adapter.name}: float vs int8 ({len(eval_set)} images, {threads})"
    return JobResult(title, rows, cols, meta, [cov.table(), *notes]), qmodel


def _evaluate_on_ray(adapter: Any, eval_set: Any, opts: JobOptions, jobs: dict[str, tuple[str, Any]],
                     rows: list[dict[str, Any]]) -> str:
    """Each (runtime, model) of `jobs` evaluated in image shards on Ray (`qdet.parallel.evaluation`),
    a row appended per job; returns the note saying how, and what the numbers equal."""
    from qdet.parallel import make_backend
    from qdet.parallel.evaluation import evaluate_sharded

    t0 = time.perf_counter()
    with make_backend(opts.ray, workers=opts.ray_workers) as backend:
        for label, (runtime, model) in jobs.items():
            res = evaluate_sharded(model, adapter, eval_set, backend, progress=opts.progress, desc=label)
            rows.append({"model": label, "runtime": runtime, **headline_metrics(res)})
        how = f"{backend.workers} workers x {backend.threads} thread"
    return (f"evaluated in image shards on Ray ({how}, {time.perf_counter() - t0:.1f} s): the numbers of a "
            "one-pass evaluation with --threads 1")


def lower_float(adapter: Any, model: torch.nn.Module, qmodel: QuantizedModel, runtime: str, *,
                threads: int | None = None) -> torch.nn.Module:
    """The float model on `runtime`: `model` prepared like `qmodel` (same BN-folded graph, so the
    speed-up compares like with like) with `model`'s own weights — also when `qmodel` was loaded
    from a `.qdet`, whose weights are the int8 codes (issue 21: "float" was 93.45, the float model 93.39)."""
    return api.lower(float_twin_for(adapter, model, qmodel), runtime, quantized=False, threads=threads)


def float_twin_for(adapter: Any, model: torch.nn.Module, qmodel: QuantizedModel) -> QuantizedModel:
    """`model` prepared like `qmodel` (same regions, same BN-folded graph) with `model`'s own weights."""
    leaves = {r.path: r.leaf_modules for r in adapter.regions(model)} if adapter is not None else None
    return float_twin(qmodel, model, leaves)


def headline_metrics(result: Any) -> dict[str, float]:
    """The two numbers of an evaluation result that the side-by-side table shows, the unit in the name.

    Classification: top1, top5 (percent, as torchvision quotes them); COCO: map50_95_pts,
    map50_pts (mAP in points, 100 x pycocotools' fraction: 30.12 = 0.3012); KITTI: mean AP_R40 at
    Moderate over the classes with ground truth in points, and the seed's accuracy (score 0.5,
    IoU 0.5) in percent. The `d_` column the jobs add is in the same unit.
    """
    if hasattr(result, "top1"):
        return {"top1": result.top1, "top5": result.top5}
    if hasattr(result, "moderate_map"):
        return {"ap_r40_moderate_pts": 100 * result.moderate_map(), "seed_accuracy_pct": 100 * result.seed_accuracy}
    return {"map50_95_pts": 100 * result.map, "map50_pts": 100 * result.map50}


def _saved_size(lowered: Any, stem: Path) -> float | None:
    """Total size of the runtime files of every lowered region (one file per region)."""
    total, found = 0.0, False
    for i, mod in enumerate(m for m in lowered.modules() if callable(getattr(m, "save", None))):
        total += mod.save(stem.with_name(f"{stem.name}_{i}.onnx")).stat().st_size / 1e6
        found = True
    return total if found else None


def _state_dict_size(model: torch.nn.Module, path: Path) -> float:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size / 1e6
