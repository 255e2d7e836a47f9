"""Seed 003's table on CIFAR-10: observer × residual policy → top-1, Δ, mean layer L1 error.

Calibration: a seeded subset of the CIFAR-10 test folder (the only CIFAR images bundled), then
top-1 on all 10,000 test images and on the held-out rest (images not used for calibration).

    python benchmarks/cifar_observers.py --models resnet56 resnet20 --calib-images 512
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from qdet import api
from qdet.analysis.errors import layer_errors
from qdet.config import Observer, QuantConfig, ResidualPolicy
from qdet.data.folders import make_loader, seeded_subset
from qdet.report.table import format_table

OBSERVERS = [Observer.MINMAX, Observer.HISTOGRAM, Observer.PERCENTILE, Observer.ENTROPY]


def held_out(dataset, calib_indices):
    rest = sorted(set(range(len(dataset))) - set(calib_indices))
    return torch.utils.data.Subset(dataset, rest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet56", "resnet20"])
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runtime", default="onnxruntime", help="runtime for the int8 top-1 column")
    ap.add_argument("--json", help="write rows to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    all_rows = []
    for name in args.models:
        adapter = api.get_adapter(name)
        model = adapter.build()
        data = adapter.eval_dataset()
        calib = seeded_subset(data, args.calib_images, seed=args.seed)
        rest = held_out(data, calib.indices)
        f_all = api.evaluate(model, adapter, data, progress=False).top1
        f_rest = api.evaluate(model, adapter, rest, progress=False).top1
        all_rows.append({"model": name, "observer": "float", "residual": "-", "top1": f_all, "d_top1": 0.0,
                         "top1_held_out": f_rest, "runtime_top1": None, "mean_l1": None})
        for residual in ResidualPolicy:
            for obs in OBSERVERS:
                t0 = time.perf_counter()
                cfg = QuantConfig(activations=obs, residual=residual)
                qm = api.quantize(model, make_loader(calib, 32), cfg, adapter=adapter, progress=False)
                errs = layer_errors(qm, [next(iter(make_loader(calib, 64)))])
                lowered = api.lower(qm, args.runtime, threads=2)
                q_all = api.evaluate(lowered, adapter, data, progress=False).top1
                q_rest = api.evaluate(lowered, adapter, rest, progress=False).top1
                sim = api.evaluate(qm, adapter, data, progress=False).top1
                row = {"model": name, "observer": obs.value, "residual": residual.value,
                       "top1": sim, "d_top1": sim - f_all, "top1_held_out": q_rest - 0.0,
                       "runtime_top1": q_all, "mean_l1": sum(e.l1 for e in errs) / len(errs),
                       "seconds": time.perf_counter() - t0}
                all_rows.append(row)
                print(row, flush=True)
    cols = ["model", "observer", "residual", "top1", "d_top1", "runtime_top1", "top1_held_out", "mean_l1"]
    print(f"\nCIFAR-10 test (10,000 images); calibration: {args.calib_images} seeded test images; "
          f"top1 = reference simulation, runtime_top1 = {args.runtime} int8 kernels; "
          f"top1_held_out = {args.runtime} on the {10000 - args.calib_images} images not used for calibration")
    print(format_table(all_rows, cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=2)


if __name__ == "__main__":
    main()
