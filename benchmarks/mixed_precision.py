"""Mixed precision for YOLOv5n: keep the fewest layers float that bring int8 COCO mAP within
`--max-drop` points of float, then check the chosen config on a real runtime (mAP and speed).

1. Search (fake-quant reference, cached 158-image COCO eval): rank layers one at a time by what keeping
   each float wins back (task metric for the `--metric-top` layers output SQNR ranks highest), then
   keep layers float in that order until the budget is met (`qdet analyze --max-drop` does the same).
   `--kept A B ...` or `--from-json` (the JSON of `qdet analyze --json`) skip the search.
2. Re-quantize with those layers in `skip`, run float / int8 / mixed on `--runtime` (default OpenVINO):
   mAP of each, and latency of each in one run with the same input and threads; prints the share of
   the int8 mAP gap closed and of the int8 speed-up kept.

    python benchmarks/mixed_precision.py --max-drop 0.25 --threads 2
    python benchmarks/mixed_precision.py --from-json runs/yolov5n/analysis/result.json --threads 2
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from qdet import api
from qdet.analysis.costs import kept_float_rows, layer_costs
from qdet.analysis.sensitivity import (
    layer_sensitivity,
    mixed_precision_search,
    to_config,
)
from qdet.analysis.task_metric import task_metric
from qdet.config import QuantConfig
from qdet.fileio import write_text_atomically
from qdet.jobs import JobOptions, calibration_loader
from qdet.report.table import format_table
from qdet.runtimes.base import get_runtime, resolve_runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolov5n")
    ap.add_argument("--runtime", default="openvino")
    ap.add_argument("--max-drop", type=float, default=0.25, help="budget in mAP points (default: 0.25)")
    ap.add_argument("--metric-top", type=int, default=12)
    ap.add_argument("--kept", nargs="*", help="layers to keep float (skips the search)")
    ap.add_argument("--from-json", help="`qdet analyze --json` output whose mixed_precision.skip to use")
    ap.add_argument("--qmodel", help="an int8 .qdet to search on (default: quantize now)")
    ap.add_argument("--calib-images", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2, help="threads for timing (default: 2)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    runtime = resolve_runtime(args.runtime)
    adapter = api.get_adapter(args.model)
    model = adapter.build()
    cfg = QuantConfig(fuse_silu=get_runtime(runtime).fuses_silu)
    opts = JobOptions(calib_images=args.calib_images, calib_batch=8, runtime=runtime, threads=args.threads,
                      progress=False)
    calib = calibration_loader(adapter, opts)
    qm = api.load(args.qmodel, adapter.build()) if args.qmodel else api.quantize(model, calib, cfg, adapter=adapter,
                                                                                  progress=False)
    metric = task_metric(adapter, progress=False)
    torch.set_num_threads(1)  # accuracy runs: one thread (the machine may be shared)

    search: dict = {}
    if args.from_json:
        kept = list(json.loads(Path(args.from_json).read_text())["mixed_precision"]["skip"])
    elif args.kept is not None:
        kept = list(args.kept)
    else:
        batches = [next(iter(calib))]  # one batch of 8 calibration images for output SQNR
        sens = layer_sensitivity(qm, metric, batches, transform_fn=adapter.transform_fn(model), mode="skip",
                                 metric_top=args.metric_top)
        print(f"sensitivity (keep only layer i float), {metric.name}: float {sens.float_metric:.4f}, "
              f"int8 {sens.int8_metric:.4f}")
        print(sens.table(args.metric_top), flush=True)
        ranked = [r.name for r in sens.rows if r.metric is not None]
        mp = mixed_precision_search(qm, metric, sens.float_metric, args.max_drop, ranked)
        x = batches[0][0] if isinstance(batches[0], (tuple, list)) else batches[0]
        rows = kept_float_rows(mp, layer_costs(model, x[:1]))
        print(f"\nsearch (fake-quant reference): {'met' if mp.met else 'NOT met'}, {mp.metric:.4f} with "
              f"{len(mp.kept_float)} layer(s) float")
        print(format_table(rows), flush=True)
        kept = list(to_config(mp, QuantConfig()).skip)
        search = {"sensitivity": sens.as_rows(), "kept": rows, "reference_metric": mp.metric, "met": mp.met}
    mixed_cfg = replace(cfg, skip=tuple(kept))
    mixed = api.quantize(model, calib, mixed_cfg, adapter=adapter, progress=False)
    print(f"\nkept float: {' '.join(kept)}; re-quantized reference {metric.name} = {metric(mixed):.4f}", flush=True)

    lowered = {
        f"float ({runtime})": api.lower(qm, runtime, quantized=False, threads=args.threads),
        f"int8 ({runtime})": api.lower(qm, runtime, threads=args.threads),
        f"mixed ({runtime}, {len(kept)} float)": api.lower(mixed, runtime, threads=args.threads),
    }
    rows = [{"model": "float (PyTorch eager)", "map": metric(model)}]
    metric.batch_size = 1  # runtimes compile static shapes; `qdet eval` runs them one image at a time too
    rows += [{"model": k, "map": metric(fn)} for k, fn in lowered.items()]
    first = next(iter(calib))
    x = (first[0] if isinstance(first, (tuple, list)) else first)[:1]
    timed = api.benchmark({k: (runtime, fn, None) for k, fn in lowered.items()}, (x,), threads=args.threads,
                          repeats=args.repeats, progress=False)
    lat = [t.latency.median_ms for t in timed]
    for r, ms in zip(rows[1:], lat):
        r["latency_ms"] = ms
        r["speedup_vs_float"] = lat[0] / ms
    f_map, q_map, m_map = rows[0]["map"], rows[2]["map"], rows[3]["map"]
    gap_closed = (m_map - q_map) / (f_map - q_map) if f_map > q_map else float("nan")
    speedup_kept = (lat[0] / lat[2]) / (lat[0] / lat[1])
    saving_kept = (lat[0] - lat[2]) / (lat[0] - lat[1]) if lat[0] > lat[1] else float("nan")
    print(f"\n{args.model} on {runtime}, mAP50-95 in points on 158 val2017 images; latency at batch 1, "
          f"{args.threads} threads (valid only on a quiet machine)")
    print(format_table(rows))
    print(f"int8 mAP gap closed by mixed precision: {100 * gap_closed:.1f} %")
    print(f"speed-up kept: {100 * speedup_kept:.1f} % of the int8 speed-up ratio; "
          f"{100 * saving_kept:.1f} % of the int8 latency saving")
    if args.json:
        write_text_atomically(args.json, json.dumps({"rows": rows, "kept": kept, "gap_closed": gap_closed,
                                               "speedup_kept": speedup_kept, "saving_kept": saving_kept,
                                               **search}, indent=2, default=str))


if __name__ == "__main__":
    main()
