"""Seed 003's YOLO row for YOLOv5n, with ours beside it (float vs int8 PTQ mAP, size, speed).

The seed measured full COCO val2017 (5,000 images); the bundled subset has 158 val2017 images
(one per category, harder: expect ~0.9× official mAP, though YOLOv5n scores 0.30 here). Compare
the *gap* between float and int8, not the absolute mAP.

    python benchmarks/yolo_ptq.py --runtime onnxruntime --threads 2
"""
from __future__ import annotations

import argparse
import json

from qdet import api
from qdet.config import QuantConfig
from qdet.jobs import JobOptions, compare_job
from qdet.report.table import format_table

SEED_ROW = {"model": "YOLOv5n", "official": 28.0, "seed float": 28.1, "seed int8": 27.3, "seed gap": 0.8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", default="onnxruntime")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-images", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    adapter = api.get_adapter("yolov5n")
    model = adapter.build()
    opts = JobOptions(calib_images=args.calib_images, calib_batch=8, runtime=args.runtime, threads=args.threads,
                      repeats=args.repeats, progress=False)
    result, _ = compare_job(adapter, model, QuantConfig(), opts)
    rows = {r["model"]: r for r in result.rows}
    f = rows["float (PyTorch eager)"]
    q = rows[f"int8 ({args.runtime})"]
    ours = {"model": "YOLOv5n (qdet)", "official": None, "seed float": None, "seed int8": None, "seed gap": None,
            "our float": 100 * f["map"], "our int8": 100 * q["map"], "our gap": 100 * (f["map"] - q["map"])}
    print(result.title)
    print(result.table())
    print()
    print("mAP50-95 in points (seed: full val2017; ours: the 158-image subset)")
    print(format_table([SEED_ROW, ours], ["model", "official", "seed float", "seed int8", "seed gap", "our float", "our int8", "our gap"]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": result.rows, "seed": SEED_ROW, "ours": ours}, fh, indent=2)


if __name__ == "__main__":
    main()
