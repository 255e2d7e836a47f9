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
from qdet.fileio import write_text_atomically
from qdet.report.table import format_table

OBSERVERS = [Observer.MINMAX, Observer.HISTOGRAM, Observer.PERCENTILE, Observer.ENTROPY]


def predict(fn, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: predicted and true labels for every image (so all/held-out top-1 share it)."""
    preds, labels = [], []
    with torch.no_grad():
        for x, y in make_loader(dataset, 500):
            preds.append(torch.as_tensor(fn(x)).argmax(1))
            labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def held_out_mask(n: int, calib: torch.utils.data.Subset) -> torch.Tensor:
    """True for the images of an n-image set that `calib` (a Subset of it) did not take for calibration."""
    held = torch.ones(n, dtype=torch.bool)
    held[calib.indices] = False
    return held


def top1(pred: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    hit = pred == label
    return 100.0 * float(hit[mask].float().mean() if mask is not None else hit.float().mean())


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
        held = held_out_mask(len(data), calib)
        f_pred, labels = predict(model, data)
        f_all = top1(f_pred, labels)
        all_rows.append({"model": name, "observer": "float", "residual": "-", "top1": f_all, "d_top1": 0.0,
                         "top1_held_out": top1(f_pred, labels, held), "mean_l1": None})
        print(all_rows[-1], flush=True)
        for residual in ResidualPolicy:
            for obs in OBSERVERS:
                t0 = time.perf_counter()
                cfg = QuantConfig(activations=obs, residual=residual)
                qm = api.quantize(model, make_loader(calib, 32), cfg, adapter=adapter, progress=False)
                errs = layer_errors(qm, [next(iter(make_loader(calib, 64)))])
                pred, _ = predict(api.lower(qm, args.runtime, threads=2), data)
                q_all = top1(pred, labels)
                row = {"model": name, "observer": obs.value, "residual": residual.value, "top1": q_all,
                       "d_top1": q_all - f_all, "top1_held_out": top1(pred, labels, held),
                       "mean_l1": sum(e.l1 for e in errs) / len(errs), "seconds": time.perf_counter() - t0}
                all_rows.append(row)
                print(row, flush=True)
    cols = ["model", "observer", "residual", "top1", "d_top1", "top1_held_out", "mean_l1"]
    print(f"\nCIFAR-10 test (10,000 images), int8 on {args.runtime}; calibration: {args.calib_images} seeded "
          f"test images; top1_held_out: the {10000 - args.calib_images} images not used for calibration; "
          "mean_l1: mean over quantized layers of mean |float − int8| on 64 calibration images")
    print(format_table(all_rows, cols))
    if args.json:
        write_text_atomically(args.json, json.dumps(all_rows, indent=2))


if __name__ == "__main__":
    main()
