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
from qdet.qmodel import QuantizedModel
from qdet.report.table import format_table


@dataclass
class JobResult:
    title: str
    rows: list[dict[str, Any]]
    columns: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        return format_table(self.rows, self.columns)

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


def calibration_loader(adapter: Any, opts: JobOptions) -> Any:
    """A seeded calibration subset of the adapter's data, through the inference preprocessing."""
    dataset = adapter.eval_dataset(opts.data) if hasattr(adapter, "eval_dataset") else None
    subset = seeded_subset(dataset, min(opts.calib_images, len(dataset)), seed=opts.seed)
    return make_loader(subset, opts.calib_batch)


def _eval_dataset(adapter: Any, opts: JobOptions) -> Any:
    dataset = adapter.eval_dataset(opts.data)
    if opts.eval_images is not None and opts.eval_images < len(dataset):
        dataset = seeded_subset(dataset, opts.eval_images, seed=opts.seed + 1)
    return dataset


def classification_job(adapter: Any, model: torch.nn.Module, cfg: QuantConfig, opts: JobOptions,
                       qmodel: QuantizedModel | None = None) -> tuple[JobResult, QuantizedModel]:
    """Quantize (unless `qmodel` is given) and compare float vs int8: top-1/5, size, latency."""
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    if qmodel is None:
        qmodel = api.quantize(model, calibration_loader(adapter, opts), cfg, adapter=adapter, progress=opts.progress)
    quant_s = time.perf_counter() - t0
    eval_set = _eval_dataset(adapter, opts)
    lowered_q = api.lower(qmodel, opts.runtime, threads=opts.threads)
    lowered_f = api.lower(qmodel, opts.runtime, quantized=False, threads=opts.threads)
    candidates = {
        "float (PyTorch eager)": ("torch", model),
        f"float ({opts.runtime})": (opts.runtime, lowered_f),
        "int8 (reference simulation)": ("reference", qmodel),
        f"int8 ({opts.runtime})": (opts.runtime, lowered_q),
    }
    rows: list[dict[str, Any]] = []
    for label, (runtime, fn) in candidates.items():
        res = api.evaluate(fn, adapter, eval_set, progress=opts.progress)
        rows.append({"model": label, "runtime": runtime, "top1": res.top1, "top5": res.top5})
    base = rows[0]["top1"]
    for r in rows:
        r["d_top1"] = r["top1"] - base

    with tempfile.TemporaryDirectory() as tmp:
        sizes = {
            f"float ({opts.runtime})": _saved_size(lowered_f, Path(tmp) / "f.onnx"),
            f"int8 ({opts.runtime})": _saved_size(lowered_q, Path(tmp) / "q.onnx"),
            "float (PyTorch eager)": _state_dict_size(model, Path(tmp) / "f.pt"),
            "int8 (reference simulation)": api.save(qmodel, Path(tmp) / "q.qdet").stat().st_size / 1e6,
        }
    for r in rows:
        r["size_mb"] = sizes.get(r["model"])
    if opts.bench:
        x = eval_set[0][0].unsqueeze(0)
        timed = api.benchmark({k: (rt, fn, None) for k, (rt, fn) in candidates.items()}, (x,),
                              threads=opts.threads, repeats=opts.repeats, progress=opts.progress)
        eager = timed[0].latency.median_ms
        same_rt_float = timed[1].latency.median_ms
        for r, t in zip(rows, timed):
            r["latency_ms"] = t.latency.median_ms
            r["speedup_vs_eager"] = eager / t.latency.median_ms
        rows[3]["speedup_vs_same_runtime_fp32"] = same_rt_float / timed[3].latency.median_ms
    meta = {
        "model": adapter.name,
        "config": cfg.to_dict(),
        "calibration_images": opts.calib_images,
        "calibration_batches": qmodel.calibration_batches,
        "eval_images": len(eval_set),
        "threads": opts.threads,
        "seed": opts.seed,
        "quantize_seconds": quant_s,
    }
    qmodel.metrics = {"rows": rows, **meta}
    cols = ["model", "top1", "top5", "d_top1", "size_mb", "latency_ms", "speedup_vs_eager"]
    return JobResult(f"{adapter.name}: float vs int8 ({len(eval_set)} images, {opts.threads} threads)", rows, cols, meta), qmodel


def _saved_size(lowered: Any, path: Path) -> float | None:
    save = getattr(lowered, "save", None)
    return save(path).stat().st_size / 1e6 if save is not None else None


def _state_dict_size(model: torch.nn.Module, path: Path) -> float:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size / 1e6
