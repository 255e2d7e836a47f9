"""`qdet bench`: float vs int8 size and latency on the same inputs and threads, in one run."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from qdet import api
from qdet.bench.latency import torch_threads
from qdet.config import QuantConfig
from qdet.jobs import (
    JobOptions,
    JobResult,
    _saved_size,
    _state_dict_size,
    build_model,
    calibration_loader,
    lower_float,
    timing_input,
)
from qdet.runtimes.executed import runtime_coverage


def bench_job(args: argparse.Namespace, cfg: QuantConfig, *, adapter: Any = None) -> JobResult:
    adapter = adapter if adapter is not None else api.get_adapter(args.model)
    model = build_model(adapter, args.weights, args.num_classes)
    opts = JobOptions(calib_images=args.calib_images, calib_batch=args.calib_batch, seed=args.seed,
                      runtime=args.runtime, threads=args.threads, repeats=args.repeats, data=args.data,
                      progress=not args.no_progress)
    calib = calibration_loader(adapter, opts)
    with torch_threads(opts.threads):  # calibrated like `qdet quantize`
        qm = api.load(args.qmodel, build_model(adapter, args.weights, args.num_classes)) if args.qmodel else api.quantize(
            model, calib, cfg, adapter=adapter, progress=opts.progress)
    images = timing_input(next(iter(calib)), args.batch_size)
    batch, shape = len(images), tuple(images[0].shape)
    lowered_f = lower_float(adapter, model, qm, opts.runtime, threads=opts.threads)
    lowered_q = api.lower(qm, opts.runtime, threads=opts.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [_state_dict_size(model, Path(tmp) / "f.safetensors"),
                 _saved_size(lowered_f, Path(tmp) / "f"), _saved_size(lowered_q, Path(tmp) / "q")]
    timed = api.benchmark(
        {"float (PyTorch eager)": ("torch", model, sizes[0]),
         f"float ({opts.runtime})": (opts.runtime, lowered_f, sizes[1]),
         f"int8 ({opts.runtime})": (opts.runtime, lowered_q, sizes[2])},
        (images,), threads=opts.threads, repeats=opts.repeats, progress=opts.progress,
    )
    eager, same = timed[0], timed[1]
    rows: list[dict[str, Any]] = []
    for t in timed:
        rows.append({"model": t.name, "size_mb": None if t.size_mb is None else round(t.size_mb, 2), "latency_ms": t.latency.median_ms,
                     "p90_ms": t.latency.p90_ms, "speedup_vs_eager": eager.latency.median_ms / t.latency.median_ms,
                     "speedup_vs_same_runtime_fp32": same.latency.median_ms / t.latency.median_ms
                     if t.runtime == same.runtime else None})
    cols = ["model", "size_mb", "latency_ms", "p90_ms", "speedup_vs_eager", "speedup_vs_same_runtime_fp32"]
    title = f"{adapter.name}: batch {batch}, input {shape}, {opts.threads} threads, median of {opts.repeats}"
    executed = runtime_coverage(lowered_q)  # what the runtime really executes in int8 (None: cannot tell)
    meta = {"model": adapter.name, "threads": opts.threads, "batch": batch,
            "runtime_coverage": executed.as_dict() if executed else None}
    return JobResult(title, rows, cols, meta, [executed.summary()] if executed else [])
