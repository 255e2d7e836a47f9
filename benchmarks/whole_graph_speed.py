"""YOLOv5n end to end (network + decode + NMS): island path vs whole graph, fp32 vs int8, on OpenVINO (issue 18).

Real bundled weights, quantized like `qdet quantize yolov5n --runtime openvino` (default config
for OpenVINO: SiLU fused; calibration on the bundled COCO train images, seeded). Then:

1. latency, batch `--batch`, `--threads` threads, every variant timed round-robin in ONE run:
   PyTorch eager fp32 (+ NMS), island path fp32/int8 (regions on OpenVINO, decode + NMS in
   PyTorch), whole graph fp32/int8 (one OpenVINO call: network + decode + NMS); each call goes
   from the letterboxed (B, 3, 640, 640) batch to per-image detections (evaluation NMS settings:
   conf 0.001, IoU 0.6, max 300, every class above conf);
2. throughput, images/s: whole graph on OpenVINO's AsyncInferQueue (THROUGHPUT hint, its streams),
   island path back to back;
3. `--profile`: per-stage ms (OpenVINO's PERF_COUNT profiler for the whole graph; region calls and
   PyTorch islands for the island path);
4. `--map`: COCO mAP (pycocotools) of int8 whole graph vs int8 island path on the bundled 158 val
   images (load-independent: `nice -n 10` is fine).

Latency and throughput need a quiet machine (the load average is printed next to them).

    PYTHONPATH=src python benchmarks/whole_graph_speed.py --threads 2 --repeats 30 --profile --map [--compare-decode]
    PYTHONPATH=src python benchmarks/whole_graph_speed.py --img-size 128 --calib-images 8 --repeats 2 \
        --throughput-images 4 --map-images 4 --map --profile   # a quick check of the script
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import qdet
from qdet.bench.latency import measure_latencies, torch_threads
from qdet.bench.machine import cpu_info, isa_summary, load_average
from qdet.bench.pipeline import profile_islands, profile_whole, throughput
from qdet.config import QuantConfig
from qdet.eval.detection_agreement import agreement
from qdet.jobs import JobOptions, calibration_loader
from qdet.models.yolo.graph import YOLO_EVAL_NMS
from qdet.models.yolo.postprocess import non_max_suppression

NMS = YOLO_EVAL_NMS


def machine() -> dict[str, str]:
    cpu = cpu_info()
    return {"model": cpu.model, "flags": isa_summary(cpu), "load": load_average()}


@contextlib.contextmanager
def token_major_decode() -> Iterator[None]:
    """Inside: YOLOv5's whole graph is exported through its decoded rows (`DecodedToScores`'s
    generic form), as before the channel-major `boxes_and_scores` existed."""
    from qdet.models.yolo.adapter import YoloDetector

    saved = YoloDetector.boxes_and_scores
    del YoloDetector.boxes_and_scores
    try:
        yield
    finally:
        YoloDetector.boxes_and_scores = saved


def island_call(lowered: Any) -> Any:
    """x → per-image detections: the lowered model (decode in PyTorch) then PyTorch NMS."""
    def call(x: torch.Tensor) -> list[torch.Tensor]:
        return non_max_suppression(lowered(x), NMS.conf, NMS.iou, multi_label=NMS.multi_label, max_det=NMS.max_det)
    return call


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--img-size", type=int, default=640)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--calib-images", type=int, default=512, help="as `qdet quantize` (the bundled set has 160)")
    ap.add_argument("--throughput-images", type=int, default=64)
    ap.add_argument("--streams", type=int, default=None, help="OpenVINO streams for throughput (default: its own)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--compare-decode", action="store_true",
                    help="also time whole graphs with the token-major decode (the detector's decoded (B, N, 85) "
                         "rows, then scores transposed back), the decode before the channel-major one")
    ap.add_argument("--map", action="store_true", help="int8 mAP: whole graph vs island path on the COCO subset")
    ap.add_argument("--no-speed", action="store_true", help="skip latency/throughput (e.g. an mAP-only run on a busy machine)")
    ap.add_argument("--map-images", type=int, default=None, help="evaluate on the first N val images only (a check)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    m = machine()
    print(f"cpu: {m['model']}\nflags: {m['flags']}\nload average at start: {m['load']}")
    out: dict[str, Any] = {"machine": m, "threads": args.threads, "batch": args.batch, "img_size": args.img_size}

    adapter = qdet.get_adapter("yolov5n")
    model = adapter.build()  # bundled COCO weights
    opts = JobOptions(calib_images=args.calib_images, calib_batch=32, seed=args.seed, runtime="openvino", progress=False)
    calib = calibration_loader(adapter, opts)
    if args.img_size != adapter.img_size:  # a quick check at a small size: resize the calibration images
        calib = [(torch.nn.functional.interpolate(x, size=(args.img_size,) * 2, mode="bilinear"), ids) for x, ids in calib]
    t = time.perf_counter()
    with torch_threads(args.threads):
        qm = qdet.quantize(model, calib, QuantConfig(fuse_silu=True), adapter=adapter, progress=False)
        lowered = {
            "island fp32": qdet.lower(qm, "openvino", quantized=False, threads=args.threads),
            "island int8": qdet.lower(qm, "openvino", threads=args.threads),
            "whole fp32": qdet.lower(qm, "openvino", quantized=False, threads=args.threads, whole_graph=True),
            "whole int8": qdet.lower(qm, "openvino", threads=args.threads, whole_graph=True),
        }
        if args.compare_decode:
            with token_major_decode():
                for tag, quantized in (("fp32", False), ("int8", True)):
                    lowered[f"whole {tag} (token-major decode)"] = qdet.lower(
                        qm, "openvino", quantized=quantized, threads=args.threads, whole_graph=True)
    print(f"quantized and lowered in {time.perf_counter() - t:.0f} s")
    g = torch.Generator().manual_seed(args.seed)
    x = next(iter(calib))[0][: args.batch]
    if len(x) < args.batch:
        x = torch.cat([x, torch.rand(args.batch - len(x), *x.shape[1:], generator=g)])
    calls = {"PyTorch eager fp32 (+ NMS)": island_call(model),
             "island fp32": island_call(lowered["island fp32"]), "island int8": island_call(lowered["island int8"]),
             **{k: v for k, v in lowered.items() if k.startswith("whole")}}
    with torch.inference_mode():
        for tag in ("fp32", "int8"):
            a = agreement(calls[f"island {tag}"](x), calls[f"whole {tag}"](x))
            print(f"  {tag}: island vs whole graph on the timing batch: {a}")
            out[f"agreement_{tag}"] = a.__dict__

    if not args.no_speed:
        speed(args, calls, lowered, x, out)

    # 3. profile
    if args.profile:
        regions = list(qm.regions)
        for tag, quantized in (("fp32", False), ("int8", True)):
            isl = profile_islands(lowered[f"island {tag}"], x, lambda o: non_max_suppression(
                o, NMS.conf, NMS.iou, max_det=NMS.max_det), threads=args.threads, repeats=args.repeats)
            whole = profile_whole(lowered[f"whole {tag}"], x, regions, threads=args.threads, repeats=args.repeats)
            print(f"\nprofile {tag} (median ms of {args.repeats}; whole graph: OpenVINO PERF_COUNT per node, summed by stage)")
            print("  island path:")
            for k, v in isl.items():
                print(f"    {k:<44} {v:8.2f}")
            print("  whole graph:")
            for k, v in whole.items():
                print(f"    {k:<44} {v:8.2f}")
            out[f"profile_{tag}"] = {"island": isl, "whole": whole}

    # 4. mAP
    if args.map:
        data = _first(adapter.eval_dataset(), args.map_images)
        maps = {}
        for k in ("island int8", "whole int8"):
            r = adapter.evaluate(lowered[k], data, progress=False)
            maps[k] = {"map50_95": 100 * r.map, "map50": 100 * r.map50}
            print(f"  mAP {k}: {100 * r.map:.2f} (mAP50 {100 * r.map50:.2f}) on {args.map_images or len(data)} images")
        d = maps["whole int8"]["map50_95"] - maps["island int8"]["map50_95"]
        print(f"  whole − island: {d:+.2f} points (target |Δ| <= 0.1)")
        out["map"] = maps
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str))
        print(f"written {args.json}")
    return out


def speed(args: argparse.Namespace, calls: dict[str, Any], lowered: dict[str, Any], x: torch.Tensor,
          out: dict[str, Any]) -> None:
    """1. latency (round-robin) and 2. throughput."""
    # 1. latency, round-robin
    timed = {k: (lambda f=f: f(x)) for k, f in calls.items()}
    lat = measure_latencies(timed, threads=args.threads, warmup=args.warmup, repeats=args.repeats)
    load = load_average()
    print(f"\nlatency: YOLOv5n {args.img_size}², batch {args.batch}, {args.threads} threads, end to end "
          f"(network + decode + NMS), median of {args.repeats}, round-robin (load average now {load})")
    eager = lat["PyTorch eager fp32 (+ NMS)"].median_ms
    rows = []
    for k, v in lat.items():
        same = lat[k.replace("int8", "fp32")].median_ms if "int8" in k else None
        row = {"variant": k, "median_ms": v.median_ms, "p90_ms": v.p90_ms, "images_per_s": 1e3 * args.batch / v.median_ms,
               "vs_eager": eager / v.median_ms, "int8_vs_same_path_fp32": same / v.median_ms if same else None}
        rows.append(row)
        extra = f"  int8/fp32 same path {row['int8_vs_same_path_fp32']:.2f}×" if same else ""
        print(f"  {k:<28} {v.median_ms:8.1f} ms  p90 {v.p90_ms:7.1f}  {row['images_per_s']:7.1f} img/s  "
              f"{row['vs_eager']:5.2f}× eager{extra}")
    w8, i8 = lat["whole int8"].median_ms, lat["island int8"].median_ms
    print(f"  whole graph int8 vs island int8: {i8 / w8:.2f}×")
    out["latency"] = rows
    out["load_after_latency"] = load

    # 2. throughput
    print(f"\nthroughput: {args.throughput_images} images, batch {args.batch}, {args.threads} threads")
    tp = {}
    for k in ("island fp32", "island int8", "whole fp32", "whole int8"):
        f = lowered[k] if k.startswith("whole") else calls[k]
        r = throughput(f, x, threads=args.threads, images=args.throughput_images, streams=args.streams)
        tp[k] = r.__dict__
        print(f"  {k:<12} {r.images_per_s:7.1f} img/s  ({r.mode}, {r.requests} requests, streams {r.streams})")
    out["throughput"] = tp
    out["load_after_throughput"] = load_average()


def _first(data: Any, n: int | None) -> Any:
    """The first `n` images of a CocoDetection (mAP over them: a quick check, not the number)."""
    if not n:
        return data
    sub = copy.copy(data)
    sub.images = data.images[:n]
    return sub


if __name__ == "__main__":
    main()
