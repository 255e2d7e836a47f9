"""Seed 003's YOLO row for YOLOv5n, with ours beside it (float vs int8 PTQ mAP, size, speed).

The seed measured full COCO val2017 (5,000 images); the bundled subset has 158 val2017 images
(one per category). Compare the *gap* between float and int8, not the absolute mAP. Each runtime
gets the SiLU handling it runs fastest (fused into the int8 conv on OpenVINO, x·sigmoid(x) with
both halves int8 on onnxruntime); float and int8 are timed in the same run on the same input.

After the table, a latency breakdown per runtime (float and int8 timed round-robin on one letterboxed
train2017 image): the network on the runtime alone, + the Detect decode (a float island in PyTorch),
+ NMS with the evaluation settings (conf 0.001, IoU 0.6, multi-label) — where the end-to-end
speed-up goes.

    python benchmarks/yolo_ptq.py --runtimes openvino onnxruntime --threads 2
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from qdet import api
from qdet.config import QuantConfig
from qdet.fileio import write_text_atomically
from qdet.jobs import JobOptions, calibration_loader, compare_job, timing_input
from qdet.models.yolo.detect import predictions
from qdet.models.yolo.postprocess import non_max_suppression
from qdet.qmodel import QuantizedModel
from qdet.report.table import format_table
from qdet.runtimes.base import get_runtime

SEED_ROW = {"model": "YOLOv5n (seed 003)", "float": 28.1, "int8": 27.3, "gap": 0.8}


def latency_breakdown(qmodel: QuantizedModel, runtime: str, x: torch.Tensor, *, threads: int,
                      repeats: int) -> list[dict[str, Any]]:
    """fp32 vs int8 on `runtime`: network alone, + decode, + decode + NMS; one round-robin run."""
    lowered = {"fp32": api.lower(qmodel, runtime, quantized=False, threads=threads),
               "int8": api.lower(qmodel, runtime, threads=threads)}

    def with_nms(det: Any) -> Any:
        return lambda inp: non_max_suppression(predictions(det(inp), None), 0.001, 0.6, multi_label=True)

    stages = {"network": lambda det: det.body, "+ decode": lambda det: det, "+ decode + NMS": with_nms}
    models = {f"{prec} {stage}": (runtime, make(det), None)
              for stage, make in stages.items() for prec, det in lowered.items()}
    timed = {t.name: t.latency.median_ms for t in api.benchmark(models, (x,), threads=threads, repeats=repeats,
                                                                 progress=False)}
    return [{"stage": stage, "fp32_ms": timed[f"fp32 {stage}"], "int8_ms": timed[f"int8 {stage}"],
             "speedup": timed[f"fp32 {stage}"] / timed[f"int8 {stage}"]} for stage in stages]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtimes", nargs="+", default=["openvino", "onnxruntime"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-images", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    adapter = api.get_adapter("yolov5n")
    model = adapter.build()
    rows, ours = [], []
    breakdowns: dict[str, list[dict[str, Any]]] = {}
    for runtime in args.runtimes:
        cfg = QuantConfig(fuse_silu=get_runtime(runtime).fuses_silu)
        opts = JobOptions(calib_images=args.calib_images, calib_batch=8, runtime=runtime, threads=args.threads,
                          repeats=args.repeats, progress=False)
        result, qmodel = compare_job(adapter, model, cfg, opts)
        print(result.title)
        print(result.table(), flush=True)
        x = timing_input(next(iter(calibration_loader(adapter, opts))))
        breakdown = latency_breakdown(qmodel, runtime, x, threads=args.threads, repeats=args.repeats)
        print(f"\nlatency breakdown on {runtime} (batch 1, 640x640, {args.threads} threads, median ms, round-robin)")
        print(format_table(breakdown, ["stage", "fp32_ms", "int8_ms", "speedup"]), flush=True)
        breakdowns[runtime] = breakdown
        rows.extend(r | {"fuse_silu": cfg.fuse_silu} for r in result.rows)
        by_model = {r["model"]: r for r in result.rows}
        f, q = by_model["float (PyTorch eager)"], by_model[f"int8 ({runtime})"]
        ours.append({"model": f"YOLOv5n, qdet int8 on {runtime}", "float": f["map50_95_pts"], "int8": q["map50_95_pts"],
                     "gap": f["map50_95_pts"] - q["map50_95_pts"]})
    print("\nmAP50-95 in points (seed: full val2017; ours: the 158-image subset)")
    print(format_table([SEED_ROW, *ours], ["model", "float", "int8", "gap"]))
    if args.json:
        write_text_atomically(args.json, json.dumps({"rows": rows, "seed": SEED_ROW, "ours": ours,
                                                     "latency_breakdown": breakdowns}, indent=2))


if __name__ == "__main__":
    main()
