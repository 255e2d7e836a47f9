"""YOLOv5n int8 on OpenVINO: plain PTQ vs bias correction vs AdaRound over several calibration seeds.

The gap between these variants is near the noise of the 158 bundled val2017 images, so each method
is measured for every seed (each seed draws another seeded subset of the train2017 calibration
images) and the table gives mean ± standard error of the int8 mAP and of its difference to plain
PTQ with the same seed (paired). SiLU is fused into the int8 conv (OpenVINO's setting). The
layer-by-layer pass keeps the activations of --layerwise-images calibration images (three
streams at 640×640: keep it small).

    python benchmarks/yolo_ptq_seeds.py --seeds 0 1 2 3 4 --methods plain,bc,adaround,adaround+bc \\
        --calib-images 160 --layerwise-images 32 --adaround-iters 300 --threads 2 --json runs/yolo_seeds.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

from ptq_algorithms import algorithms

from qdet import api
from qdet.config import QuantConfig
from qdet.fileio import write_text_atomically
from qdet.jobs import JobOptions, compare_job
from qdet.report.table import format_table


def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", default="plain,bc,adaround,adaround+bc")
    ap.add_argument("--calib-images", type=int, default=160)
    ap.add_argument("--layerwise-images", type=int, default=32)
    ap.add_argument("--adaround-iters", type=int, default=300)
    ap.add_argument("--runtime", default="openvino")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    adapter = api.get_adapter("yolov5n")
    model = adapter.build()
    methods = args.methods.split(",")
    runs: list[dict] = []
    for seed in args.seeds:
        for method in methods:
            cfg = QuantConfig(fuse_silu=True, ptq=algorithms(method, args.adaround_iters, seed, args.layerwise_images))
            opts = JobOptions(calib_images=args.calib_images, calib_batch=8, runtime=args.runtime,
                              threads=args.threads, bench=False, seed=seed, progress=False)
            t0 = time.perf_counter()
            result, _ = compare_job(adapter, model, cfg, opts)
            key = next(k for k in result.rows[0] if k not in ("model", "runtime"))
            by_model = {r["model"]: r for r in result.rows}
            runs.append({"seed": seed, "method": method, "metric": key,
                         "float": by_model["float (PyTorch eager)"][key], "int8": by_model[f"int8 ({args.runtime})"][key],
                         "seconds": time.perf_counter() - t0})
            print(runs[-1], flush=True)
    rows = []
    for method in methods:
        mine = {r["seed"]: r for r in runs if r["method"] == method}
        plain = {r["seed"]: r for r in runs if r["method"] == "plain"}
        m, se = mean_se([r["int8"] for r in mine.values()])
        row = {"method": method, "seeds": len(mine), "int8_mean": m, "int8_se": se,
               "float": next(iter(mine.values()))["float"]}
        if plain and method != "plain":
            dm, dse = mean_se([mine[s]["int8"] - plain[s]["int8"] for s in mine if s in plain])
            row |= {"vs_plain_mean": dm, "vs_plain_se": dse}
        rows.append(row)
    print(f"\nYOLOv5n, {runs[0]['metric']} on the bundled val2017 images, int8 on {args.runtime}; calibration "
          f"{args.calib_images} train2017 images per seed (seeds {args.seeds}); mean ± s.e. over seeds; "
          f"vs_plain: paired difference to plain PTQ with the same seed")
    print(format_table(rows, ["method", "seeds", "float", "int8_mean", "int8_se", "vs_plain_mean", "vs_plain_se"]))
    if args.json:
        write_text_atomically(args.json, json.dumps({"runs": runs, "summary": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
