"""Size and latency, float vs int8, per runtime, in one run (seed 003 / issue targets for ResNet50).

Random weights are fine for speed; calibration uses real Imagenette images through the model's
preprocessing. Everything is timed on the same input, batch 1, with the same thread count.

    python benchmarks/classifier_speed.py --model resnet50 --threads 2 --repeats 30
"""
from __future__ import annotations

import argparse
import warnings

from qdet.bench.compare import bench_job
from qdet.cli import build_parser, config_from_args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--runtimes", nargs="+", default=["onnxruntime", "torch"])
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*random initialisation.*")
    for runtime in args.runtimes:
        cli_args = build_parser().parse_args([
            "bench", args.model, "--weights", "random", "--calib-images", "32", "--threads", str(args.threads),
            "--repeats", str(args.repeats), "--runtime", runtime, "--no-progress",
        ])
        result = bench_job(cli_args, config_from_args(cli_args))
        print(result.title)
        print(result.table())
        print()


if __name__ == "__main__":
    main()
