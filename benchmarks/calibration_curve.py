"""Task metric vs number of calibration images, mean/min/max over seeded calibration subsets.

Each (size, seed) re-calibrates from scratch on a seeded subset and is evaluated in the fake-quant
reference with the cached task metric (top-1 % for CIFAR, COCO mAP50-95 points for YOLO). CIFAR
models calibrate on the bundled test folder (the only CIFAR images there are) and are evaluated on
`--eval-images` of it; YOLO calibrates on the 160 train2017 images and is evaluated on the 158 val2017.
`--sweep` adds activation observer × weight granularity at the largest size (seed 003's question).
`--ray auto` runs each (size, seed) as a Ray task; with `--checkpoint FILE` finished runs are
recorded, so a stopped study resumes where it stopped.

    python benchmarks/calibration_curve.py --model resnet56 --seeds 10
    python benchmarks/calibration_curve.py --model yolov5n --seeds 3 --sizes 1 8 32 64 160
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qdet import api
from qdet.analysis.calibration_study import calibration_curve, observer_sweep
from qdet.analysis.task_metric import task_metric
from qdet.config import (
    Observer,
    PerChannel,
    PerTensor,
    QuantConfig,
    default_activation_spec,
)
from qdet.fileio import write_text_atomically
from qdet.jobs import JobOptions, calibration_loader
from qdet.models.base import Task
from qdet.parallel import Checkpoint, state_fingerprint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--seeds", type=int, default=10, help="seeded runs per size (seeds 0..N-1)")
    ap.add_argument("--sizes", type=int, nargs="+", help="calibration set sizes (default: 1 8 32 64 128 512; "
                                                         "YOLO: 1 8 32 64 128 160, all its train images)")
    ap.add_argument("--eval-images", type=int, help="classifiers: evaluate on a seeded subset (default: all)")
    ap.add_argument("--observer", default="histogram")
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--sweep", action="store_true", help="also observer × weight granularity at the largest size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/calibration_curve", help="folder for the PNG and JSON")
    ap.add_argument("--ray", metavar="auto|ADDRESS", help="run each (size, seed) as a Ray task on 1-thread workers "
                    "(a local Ray, or join a cluster); the same values as serial with --threads 1")
    ap.add_argument("--ray-workers", type=int, default=0, help="with --ray auto: workers (default: the cores)")
    ap.add_argument("--checkpoint", metavar="FILE.jsonl", help="record each finished run here; a rerun with the "
                    "same file, model and options resumes instead of measuring again")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    adapter = api.get_adapter(args.model)
    model = adapter.build()
    detector = adapter.task is not Task.CLASSIFICATION
    sizes = args.sizes or ([1, 8, 32, 64, 128, 160] if detector else [1, 8, 32, 64, 128, 512])
    base = QuantConfig(activations=default_activation_spec(Observer(args.observer)), fuse_silu=detector)
    metric = task_metric(adapter, eval_images=args.eval_images, progress=False)

    current: list[tuple[int, int]] = []

    def quantize_fn(n: int, seed: int, cfg: QuantConfig):
        current[:] = [(n, seed)]
        opts = JobOptions(calib_images=n, calib_batch=min(args.calib_batch, n), seed=seed)
        return api.quantize(model, calibration_loader(adapter, opts), cfg, adapter=adapter, progress=False)

    def logged_metric(qmodel) -> float:  # one line per run, so a stopped study still leaves its numbers
        value = metric(qmodel)
        print(f"run: calib_images={current[0][0]} seed={current[0][1]} {metric.name}={value:.4f}", flush=True)
        return value

    t0 = time.perf_counter()
    float_metric = metric(model)
    print(f"{args.model}: float {metric.name} = {float_metric:.4f}", flush=True)
    from qdet.parallel.ray_backend import make_backend

    backend = make_backend(args.ray, workers=args.ray_workers, threads=args.threads)
    ckpt = None if not args.checkpoint else Checkpoint(
        args.checkpoint, state_fingerprint(model, args.observer, args.eval_images, args.calib_batch, metric.name))
    curve = calibration_curve(quantize_fn, logged_metric, n_images=sizes, seeds=range(args.seeds), cfg=base,
                              float_metric=float_metric, metric_name=metric.name, backend=backend, checkpoint=ckpt)
    print(f"\n{metric.name} vs calibration images, {args.seeds} seeded runs per size "
          f"(observer {args.observer}, fake-quant reference; {time.perf_counter() - t0:.0f} s)")
    print(curve.table(), flush=True)
    out = Path(args.out) / args.model
    out.mkdir(parents=True, exist_ok=True)
    png = curve.plot(out / "calibration_curve.png", title=f"{args.model}: {metric.name} vs calibration images "
                                                          f"({args.seeds} seeds)")
    payload = {"model": args.model, "metric": metric.name, "float": float_metric, "observer": args.observer,
               "curve": curve.rows(), "values": {p.n_images: list(p.values) for p in curve.points}}
    if args.sweep:
        sweep = observer_sweep(quantize_fn, logged_metric, observers=tuple(Observer), granularities=(PerTensor(), PerChannel(0)),
                               n_images=max(sizes), seeds=range(min(args.seeds, 3)), base_cfg=base,
                               float_metric=float_metric, metric_name=metric.name, backend=backend,
                               checkpoint=ckpt)
        print(f"\nactivation observer × weight granularity at {max(sizes)} calibration images")
        print(sweep.table())
        sweep.plot(out / "observer_sweep.png")
        payload["sweep"] = sweep.as_rows()
    backend.close()
    write_text_atomically(out / "calibration_curve.json", json.dumps(payload, indent=2))
    print(f"plot: {png}\njson: {out / 'calibration_curve.json'}")


if __name__ == "__main__":
    main()
