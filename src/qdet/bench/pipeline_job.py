"""`qdet bench --whole-graph / --mode throughput / --profile`: detectors timed end to end (with NMS).

Rows: PyTorch eager fp32, the island path fp32/int8 (regions on the runtime, float islands and NMS
in PyTorch) and, for adapters that declare one, the whole graph fp32/int8 (one runtime call).
`--mode latency` (default): median/p90 ms per batch, round-robin, and images/s = batch / median;
`--mode throughput`: images/s, a whole graph on OpenVINO through an AsyncInferQueue (streams),
everything else back to back. `--profile` adds per-stage ms (OpenVINO's profiler) as notes.

    qdet bench yolov5n --runtime openvino --whole-graph --batch 4
    qdet bench yolov5n --runtime openvino --whole-graph --mode throughput --batch 1
    qdet bench yolov5n --runtime openvino --whole-graph --profile
"""
from __future__ import annotations

import argparse
from typing import Any

from qdet import api
from qdet.bench.latency import torch_threads
from qdet.bench.pipeline import profile_islands, profile_whole, throughput
from qdet.config import QuantConfig
from qdet.errors import ConfigError
from qdet.jobs import (
    JobOptions,
    JobResult,
    build_model,
    calibration_loader,
    lower_float,
    timing_input,
)
from qdet.runtimes.base import resolve_runtime

MODES = ("latency", "throughput")


def add_pipeline_options(p: argparse.ArgumentParser) -> None:
    """The bench options of this module (registered by `qdet.cli` in one line)."""
    p.add_argument("--mode", choices=MODES, default="latency",
                   help="latency: ms per batch, round-robin (default); throughput: images/s (OpenVINO: async "
                        "infer requests on its streams for the whole graph)")
    p.add_argument("--whole-graph", action="store_true",
                   help="detectors: also time the whole graph (network + decode + NMS in one runtime call); "
                        "every row then runs end to end, NMS included")
    p.add_argument("--profile", action="store_true",
                   help="per-stage ms (each region, the PyTorch islands, NMS; whole graph: OpenVINO's profiler)")
    p.add_argument("--throughput-images", type=int, default=64, help="images per throughput measurement (default: 64)")


def wants_pipeline(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "whole_graph", False) or getattr(args, "profile", False)
                or getattr(args, "mode", "latency") != "latency")


def pipeline_bench_job(args: argparse.Namespace, cfg: QuantConfig, *, adapter: Any = None) -> JobResult:
    adapter = adapter if adapter is not None else api.get_adapter(args.model)
    if getattr(adapter, "detection_graph", None) is None:
        raise ConfigError(f"--whole-graph/--mode throughput/--profile: model {adapter.name!r} declares no whole graph "
                          "(YOLOv5, Darknet and SSD300-ResNet50 do)")
    if args.runtime not in ("openvino", "onnxruntime", "auto"):
        raise ConfigError(f"--whole-graph needs --runtime openvino or onnxruntime, got {args.runtime!r}")
    opts = JobOptions(calib_images=args.calib_images, calib_batch=args.calib_batch, seed=args.seed,
                      runtime=args.runtime, threads=args.threads, repeats=args.repeats, data=args.data,
                      progress=not args.no_progress)
    model = build_model(adapter, args.weights, args.num_classes)
    calib = calibration_loader(adapter, opts)
    with torch_threads(opts.threads):
        qm = api.load(args.qmodel, build_model(adapter, args.weights, args.num_classes)) if args.qmodel else api.quantize(
            model, calib, cfg, adapter=adapter, progress=opts.progress)
    runtime = resolve_runtime(opts.runtime)
    x = timing_input(next(iter(calib)), args.batch_size)  # (B, 3, H, W), or a list of images (Faster R-CNN)
    select = getattr(adapter.detection_graph(model), "island_select", lambda out: out)
    island_f = lower_float(adapter, model, qm, runtime, threads=opts.threads)
    island_q = api.lower(qm, runtime, threads=opts.threads)
    calls: dict[str, Any] = {"float (PyTorch eager)": lambda t: select(model(t)),
                             f"float island ({runtime})": lambda t: select(island_f(t)),
                             f"int8 island ({runtime})": lambda t: select(island_q(t))}
    whole = {}
    if args.whole_graph or args.profile:
        whole["fp32"] = api.lower(qm, runtime, quantized=False, threads=opts.threads, whole_graph=True, adapter=adapter)
        whole["int8"] = api.lower(qm, runtime, threads=opts.threads, whole_graph=True, adapter=adapter)
        calls[f"float whole graph ({runtime})"] = whole["fp32"]
        calls[f"int8 whole graph ({runtime})"] = whole["int8"]
    batch = len(x) if isinstance(x, list) else int(x.shape[0])
    rows: list[dict[str, Any]] = []
    if args.mode == "latency":
        timed = api.benchmark({k: (runtime, f, None) for k, f in calls.items()}, (x,), threads=opts.threads,
                              repeats=opts.repeats, progress=opts.progress)
        eager = timed[0].latency.median_ms
        for t in timed:
            rows.append({"model": t.name, "latency_ms": t.latency.median_ms, "p90_ms": t.latency.p90_ms,
                         "images_per_s": 1e3 * batch / t.latency.median_ms, "speedup_vs_eager": eager / t.latency.median_ms})
        cols = ["model", "latency_ms", "p90_ms", "images_per_s", "speedup_vs_eager"]
        what = f"median of {opts.repeats}, round-robin"
    else:
        for k, f in calls.items():
            r = throughput(f, x, threads=opts.threads, images=args.throughput_images)
            rows.append({"model": k, "images_per_s": r.images_per_s, "mode": r.mode, "requests": r.requests,
                         "streams": r.streams})
        cols = ["model", "images_per_s", "mode", "requests", "streams"]
        what = f"{args.throughput_images} images"
    notes = ["end to end: network, decode and NMS (the adapter's evaluation thresholds) in every row"]
    if args.profile:
        notes += _profile_notes(qm, runtime, island_f, island_q, whole, select, x, opts)
    shape = tuple(x[0].shape) if isinstance(x, list) else tuple(x.shape[1:])
    title = f"{adapter.name}: {args.mode}, batch {batch}, input {shape}, {opts.threads} threads, {what}"
    meta = {"model": adapter.name, "threads": opts.threads, "batch": batch, "mode": args.mode}
    return JobResult(title, rows, cols, meta, notes)


def _profile_notes(qm: Any, runtime: str, island_f: Any, island_q: Any, whole: dict[str, Any], select: Any,
                   x: Any, opts: JobOptions) -> list[str]:
    if runtime != "openvino":
        raise ConfigError("--profile reads OpenVINO's profiler: use --runtime openvino")
    notes = [f"profile, median ms of {opts.repeats} (whole graph: OpenVINO PERF_COUNT per node, summed by stage):"]
    for tag, island in (("fp32", island_f), ("int8", island_q)):
        isl = profile_islands(island, x, select, threads=opts.threads, repeats=opts.repeats)
        who = profile_whole(whole[tag], x, list(qm.regions), threads=opts.threads, repeats=opts.repeats)
        notes.append(f"  {tag} island path: " + ", ".join(f"{k} {v:.2f}" for k, v in isl.items()))
        notes.append(f"  {tag} whole graph: " + ", ".join(f"{k} {v:.2f}" for k, v in who.items()))
    return notes
