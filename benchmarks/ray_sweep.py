"""Serial vs Ray: a one-at-a-time sensitivity sweep and a sharded COCO evaluation, same numbers, wall times.

The sweep measures the task metric for every quantized layer of one calibrated model (fake-quant
reference, `--metric-top 0` of `qdet analyze`): serially in this process with 1 torch thread, then
as Ray tasks on 1-thread workers (a local Ray of `--workers`, or a cluster with `--address`). It
checks that every row (metric, delta, output SQNR, rank) is identical and reports both wall times.
`--sharded-coco` evaluates YOLOv5n float and int8 on the 158 val2017 images unsharded and in
`--workers` image shards merged into one pycocotools evaluation, and checks the mAPs agree.

    python benchmarks/ray_sweep.py --model resnet56 --eval-images 1000 --workers 2 --json runs/ray_sweep.json
    python benchmarks/ray_sweep.py --sharded-coco --workers 2
    python benchmarks/ray_sweep.py --model resnet56 --address 127.0.0.1:6380 --skip-serial \\
        --compare-to runs/ray_sweep.json --checkpoint runs/ray_sweep_cluster.jsonl   # join a cluster
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qdet import api
from qdet.analysis.sensitivity import layer_sensitivity
from qdet.analysis.task_metric import sharded_metric, task_metric
from qdet.bench.machine import load_average
from qdet.config import QuantConfig
from qdet.fileio import write_text_atomically
from qdet.jobs import JobOptions, calibration_loader
from qdet.models.base import Task
from qdet.parallel import Checkpoint, SerialBackend, state_fingerprint
from qdet.parallel.ray_backend import RayBackend


def _setup(model_name: str, eval_images: int | None, calib_images: int):
    adapter = api.get_adapter(model_name)
    model = adapter.build()
    detector = adapter.task is not Task.CLASSIFICATION
    opts = JobOptions(calib_images=calib_images, calib_batch=8 if detector else 32, seed=0)
    with torch.random.fork_rng():
        qm = api.quantize(model, calibration_loader(adapter, opts), QuantConfig(fuse_silu=detector), adapter=adapter,
                          progress=False)
    metric = task_metric(adapter, eval_images=None if detector else eval_images, progress=False)
    return adapter, model, qm, metric


def sweep(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)  # the serial reference: 1 thread, like each Ray worker
    t0 = time.perf_counter()
    _, _, qm, metric = _setup(args.model, args.eval_images, args.calib_images)
    print(f"{args.model}: calibrated and metric cached in {time.perf_counter() - t0:.1f} s; "
          f"load {load_average()}", flush=True)
    out: dict = {"model": args.model, "mode": args.mode, "metric": metric.name, "eval_images": args.eval_images,
                 "load_before": load_average()}
    results = {}
    if not args.skip_serial:
        t = time.perf_counter()
        results["serial"] = layer_sensitivity(qm, metric, None, mode=args.mode, backend=SerialBackend(threads=1))
        out["serial_s"] = time.perf_counter() - t
        print(f"serial, 1 thread: {out['serial_s']:.1f} s for {len(results['serial'].rows) + 2} measurements "
              f"(load {load_average()})", flush=True)
    t = time.perf_counter()
    with RayBackend(args.address or "auto", workers=0 if args.address else args.workers) as backend:
        out["ray_start_s"] = time.perf_counter() - t
        out["ray_workers"] = backend.workers
        ck = None
        if args.checkpoint:
            ck = Checkpoint(args.checkpoint, state_fingerprint(qm, metric.name, args.mode, args.eval_images))
            print(f"checkpoint {args.checkpoint}: {ck.resumed} measurement(s) already there", flush=True)
        t = time.perf_counter()
        results["ray"] = layer_sensitivity(qm, metric, None, mode=args.mode, backend=backend, checkpoint=ck)
        out["ray_s"] = time.perf_counter() - t
    print(f"ray, {out['ray_workers']} one-thread workers: {out['ray_s']:.1f} s (+ {out['ray_start_s']:.1f} s "
          f"to start/join Ray; load {load_average()})", flush=True)
    rows = {k: r.as_rows() for k, r in results.items()}
    out["rows"] = rows["ray"]
    out["float"], out["int8"] = results["ray"].float_metric, results["ray"].int8_metric
    if "serial" in rows:
        out["identical"] = rows["serial"] == rows["ray"]
        out["speedup"] = out["serial_s"] / out["ray_s"]
        print(f"serial and Ray rows identical (metric, delta, SQNR, rank of all {len(rows['ray'])} layers): "
              f"{out['identical']}; speed-up {out['speedup']:.2f}x")
    if args.compare_to:
        ref = json.loads(Path(args.compare_to).read_text())["rows"]
        out["identical_to_reference_file"] = ref == rows["ray"]
        print(f"rows identical to {args.compare_to}: {out['identical_to_reference_file']}")
    print(results["ray"].table(10))
    return out


def sharded_coco(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    _, model, qm, metric = _setup("yolov5n", None, 160)
    out: dict = {"model": "yolov5n", "images": len(metric.items), "shards": args.workers}
    with RayBackend("auto", workers=args.workers) as backend:
        for name, m in (("float", model), ("int8 (fake-quant)", qm)):
            t = time.perf_counter()
            whole = metric(m)
            t_whole = time.perf_counter() - t
            t = time.perf_counter()
            shard = sharded_metric(metric, backend, shards=args.workers)(m)
            t_shard = time.perf_counter() - t
            out[name] = {"unsharded": whole, "sharded": shard, "abs_diff": abs(whole - shard),
                         "unsharded_s": t_whole, "sharded_s": t_shard}
            print(f"{name}: mAP50-95 unsharded {whole:.6f}, {args.workers} shards {shard:.6f}, |diff| "
                  f"{abs(whole - shard):.1e} ({t_whole:.1f} s vs {t_shard:.1f} s; load {load_average()})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--mode", choices=["only", "skip"], default="only")
    ap.add_argument("--eval-images", type=int, default=1000, help="classifiers: seeded evaluation subset")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2, help="local Ray workers (1 thread each) / COCO shards")
    ap.add_argument("--address", help="join this Ray cluster instead of starting a local Ray")
    ap.add_argument("--skip-serial", action="store_true", help="only the Ray sweep")
    ap.add_argument("--compare-to", help="a JSON written by an earlier run: check the rows are identical")
    ap.add_argument("--checkpoint", help="JSONL checkpoint of the Ray sweep (resumes what it holds)")
    ap.add_argument("--sharded-coco", action="store_true", help="the sharded COCO evaluation instead of the sweep")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    out = sharded_coco(args) if args.sharded_coco else sweep(args)
    if args.json:
        write_text_atomically(args.json, json.dumps(out, indent=2, default=str))
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
