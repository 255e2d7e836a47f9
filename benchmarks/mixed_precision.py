"""Mixed precision for YOLOv5n: keep the fewest layers float that bring int8 COCO mAP within
`--max-drop` points of float, chosen on one set of images and checked on another, on a real runtime.

1. Search. Rank layers one at a time by what keeping each float wins back, then keep layers float in
   that order until the budget is met (`qdet analyze --max-drop` does the same). The metric is COCO
   mAP50-95 on `--search-on` images (default: the labeled calibration images, train2017, so the
   val2017 images stay held out) measured on `--search-runtime` (default: `--runtime`; each step
   exports and compiles the model with those layers float). `--metric-top K` measures the metric for
   the K layers that fake-quant output SQNR ranks first (0 = every layer).
   `--kept A B ...` or `--from-json` (the JSON of `qdet analyze --json`) skip the search.
2. Check, on the val2017 images and `--runtime`: for `--seeds` calibration subsets (`--calib-images`
   drawn from the 160 train2017 images), the int8 model and the model re-quantized on the same
   images with the kept layers in `skip` (what `qdet quantize --skip` deploys). One 158-image mAP
   moves by ±0.3 points between numerically equivalent models, so the gap closed is reported from
   the means over seeds, with each seed's paired difference.
3. Speed: float, int8, and the model after each kept layer (first seed), timed round-robin in one run
   (same input, threads): the measured latency cost of every layer kept float.

    # all 81 layers on OpenVINO (~65 min on 2 cores), then the check on seeds 0-4
    python benchmarks/mixed_precision.py --metric-top 0 --max-drop 0.3 --seeds 5 --calib-images 128 --json runs/mp.json
    python benchmarks/mixed_precision.py --ranking-from runs/mp.json --max-drop 0.1 --seeds 5 --calib-images 128
    python benchmarks/mixed_precision.py --kept body.model.24.m.0 body.model.24.m.1 body.model.24.m.2 \
        --seeds 5 --first-seed 5 --calib-images 128
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from qdet import api
from qdet.analysis.costs import kept_float_rows, layer_costs
from qdet.analysis.points import toggled
from qdet.analysis.sensitivity import (
    layer_sensitivity,
    mixed_precision_search,
    to_config,
)
from qdet.analysis.task_metric import runtime_metric, task_metric
from qdet.config import QuantConfig
from qdet.fileio import write_text_atomically
from qdet.jobs import JobOptions, calibration_loader, timing_input
from qdet.report.table import format_table
from qdet.runtimes.base import get_runtime, resolve_runtime


def search(args: argparse.Namespace, adapter: Any, model: torch.nn.Module, qm: Any, calib: Any) -> tuple[list[str], dict]:
    """Sensitivity (skip mode) + greedy search; returns the kept layers and what to record."""
    metric = task_metric(adapter, on=args.search_on, progress=False)
    if args.search_runtime != "reference":
        metric = runtime_metric(metric, args.search_runtime, threads=args.threads)
    batches = [next(iter(calib))]  # one batch of 8 calibration images for the output-SQNR pre-ranking
    if args.ranking_from:  # a sweep this script saved: same model, calibration and search metric
        saved = json.loads(Path(args.ranking_from).read_text())
        sens_rows, float_metric, int8_metric = saved["sensitivity"], saved["float"], saved["int8"]
    else:
        sens = layer_sensitivity(qm, metric, batches, transform_fn=adapter.transform_fn(model), mode="skip",
                                 metric_top=args.metric_top or None)
        sens_rows, float_metric, int8_metric = sens.as_rows(), sens.float_metric, sens.int8_metric
        print(sens.table(15), flush=True)
    print(f"sensitivity (keep only layer i float), {metric.name} on {args.search_on} images: "
          f"float {float_metric:.2f}, int8 {int8_metric:.2f}")
    ranked = [r["name"] for r in sens_rows if r["metric"] is not None]
    mp = mixed_precision_search(qm, metric, float_metric, args.max_drop, ranked)
    rows = kept_float_rows(mp, layer_costs(model, timing_input(batches[0])))
    print(f"\nsearch: {'met' if mp.met else 'NOT met'}, {mp.metric:.2f} with {len(mp.kept_float)} layer(s) float "
          f"(target {mp.target:.2f})")
    print(format_table(rows), flush=True)
    record = {"search_metric": metric.name, "search_on": args.search_on, "sensitivity": sens_rows,
              "float": float_metric, "int8": int8_metric, "kept_rows": rows, "search_result": mp.metric, "met": mp.met}
    return list(to_config(mp, QuantConfig()).skip), record


def seeded_check(args: argparse.Namespace, adapter: Any, model: torch.nn.Module, cfg: QuantConfig, opts: JobOptions,
                 kept: list[str]) -> tuple[float, list[dict], tuple[Any, Any]]:
    """Float mAP, then int8 vs mixed mAP for each calibration seed, on the evaluation images; the first
    seed's int8 and mixed models. Mixed = re-quantized with the kept layers in `skip`, as deployed."""
    metric = runtime_metric(task_metric(adapter, progress=False), args.runtime, threads=args.threads)
    rows, first, float_map = [], (), float("nan")
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        calib = calibration_loader(adapter, replace(opts, seed=seed))
        qm = api.quantize(model, calib, cfg, adapter=adapter, progress=False)
        mixed_qm = api.quantize(model, calib, replace(cfg, skip=tuple(kept)), adapter=adapter, progress=False)
        if not first:
            first = (qm, mixed_qm)
            with toggled(qm, [], default=False):  # every quantizer off: the float graph on the runtime
                float_map = metric(qm)
        int8, mixed = metric(qm), metric(mixed_qm)
        rows.append({"seed": seed, "int8": int8, "mixed": mixed, "mixed_minus_int8": mixed - int8})
        print(format_table(rows[-1:]), flush=True)
    return float_map, rows, first


def timed_steps(args: argparse.Namespace, adapter: Any, model: torch.nn.Module, cfg: QuantConfig, opts: JobOptions,
                kept: list[str], qm: Any, mixed_qm: Any) -> list[dict]:
    """Float, int8, then the model with the first i kept layers float (re-quantized on the first seed's
    images) for i = 1..len(kept), timed round-robin in one run: the measured latency cost of each layer."""
    lower = lambda q, **kw: api.lower(q, args.runtime, threads=args.threads, **kw)  # noqa: E731
    calib = calibration_loader(adapter, opts)
    models = {"float": lower(qm, quantized=False), "int8": lower(qm)}
    for i, name in enumerate(kept, 1):
        prefix = mixed_qm if i == len(kept) else api.quantize(model, calib, replace(cfg, skip=tuple(kept[:i])),
                                                               adapter=adapter, progress=False)
        models[f"+ {name} float"] = lower(prefix)
    timed = api.benchmark({k: (args.runtime, fn, None) for k, fn in models.items()},
                          (timing_input(next(iter(calib))),), threads=args.threads, repeats=args.repeats,
                          progress=False)
    rows = [{"model": t.name, "latency_ms": t.latency.median_ms} for t in timed]
    for prev, row in zip(rows[1:], rows[2:]):
        row["cost_ms"] = row["latency_ms"] - prev["latency_ms"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolov5n")
    ap.add_argument("--runtime", default="openvino", help="runtime of the check and the timing (default: openvino)")
    ap.add_argument("--search-runtime", help="runtime the search measures on, or 'reference' (default: --runtime)")
    ap.add_argument("--search-on", choices=["eval", "calibration"], default="calibration",
                    help="images the search measures mAP on (default: calibration, i.e. train2017)")
    ap.add_argument("--max-drop", type=float, default=0.3, help="budget in mAP points (default: 0.3)")
    ap.add_argument("--metric-top", type=int, default=12, help="layers measured by mAP; 0 = all (default: 12)")
    ap.add_argument("--ranking-from", help="this script's --json output: reuse its sensitivity sweep, redo the search")
    ap.add_argument("--kept", nargs="*", help="layers to keep float (skips the search)")
    ap.add_argument("--from-json", help="`qdet analyze --json` output whose mixed_precision.skip to use")
    ap.add_argument("--calib-images", type=int, default=160)
    ap.add_argument("--seeds", type=int, default=1, help="calibration subsets in the check (default: 1)")
    ap.add_argument("--first-seed", type=int, default=0, help="seed of the first subset (default: 0)")
    ap.add_argument("--threads", type=int, default=2, help="threads for the runtimes (default: 2)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    args.runtime = resolve_runtime(args.runtime)
    args.search_runtime = args.search_runtime or args.runtime
    adapter = api.get_adapter(args.model)
    model = adapter.build()
    cfg = QuantConfig(fuse_silu=get_runtime(args.runtime).fuses_silu)
    opts = JobOptions(calib_images=args.calib_images, calib_batch=8, runtime=args.runtime, threads=args.threads,
                      seed=args.first_seed, progress=False)
    torch.set_num_threads(args.threads)

    record: dict = {}
    if args.from_json:
        kept = list(json.loads(Path(args.from_json).read_text())["mixed_precision"]["skip"])
    elif args.kept is not None:
        kept = list(args.kept)
    else:
        calib = calibration_loader(adapter, opts)
        kept, record = search(args, adapter, model, api.quantize(model, calib, cfg, adapter=adapter, progress=False),
                              calib)
    print(f"\nkept float: {' '.join(kept) or '(none)'}", flush=True)

    float_map, seeds, (qm, mixed_qm) = seeded_check(args, adapter, model, cfg, opts, kept)
    int8_mean = statistics.mean(r["int8"] for r in seeds)
    mixed_mean = statistics.mean(r["mixed"] for r in seeds)
    diffs = [r["mixed_minus_int8"] for r in seeds]
    gap_closed = (mixed_mean - int8_mean) / (float_map - int8_mean) if float_map > int8_mean else float("nan")

    steps = timed_steps(args, adapter, model, cfg, opts, kept, qm, mixed_qm)
    print(f"\nlatency as each layer is kept float ({args.threads} threads, batch 1, round-robin; valid only on a "
          f"quiet machine)")
    print(format_table(steps))
    lat = [steps[0]["latency_ms"], steps[1]["latency_ms"], steps[-1]["latency_ms"]]
    speedup_kept = (lat[0] / lat[2]) / (lat[0] / lat[1])
    saving_kept = (lat[0] - lat[2]) / (lat[0] - lat[1]) if lat[0] > lat[1] else float("nan")

    print(f"\n{args.model} on {args.runtime}: mAP50-95 (points) on the 158 val2017 images, {args.seeds} calibration "
          f"seed(s) of {args.calib_images} train2017 images")
    summary = [{"model": "float", "map_mean": float_map, "map_min": float_map, "map_max": float_map},
               {"model": "int8", "map_mean": int8_mean, "map_min": min(r["int8"] for r in seeds),
                "map_max": max(r["int8"] for r in seeds)},
               {"model": f"mixed ({len(kept)} float)", "map_mean": mixed_mean,
                "map_min": min(r["mixed"] for r in seeds), "map_max": max(r["mixed"] for r in seeds)}]
    for row, ms in zip(summary, lat):
        row.update(latency_ms=ms, speedup_vs_float=lat[0] / ms)
    print(format_table(summary))
    print(f"mixed − int8 per seed: {' '.join(f'{d:+.2f}' for d in diffs)} (better in {sum(d > 0 for d in diffs)} "
          f"of {len(diffs)})")
    print(f"int8 mAP gap closed by mixed precision (means): {100 * gap_closed:.1f} %")
    print(f"speed-up kept: {100 * speedup_kept:.1f} % of the int8 speed-up ratio; "
          f"{100 * saving_kept:.1f} % of the int8 latency saving ({args.threads} threads, batch 1; "
          f"valid only on a quiet machine)")
    if args.json:
        write_text_atomically(args.json, json.dumps(
            {"kept": kept, "seeds": seeds, "summary": summary, "latency_steps": steps, "gap_closed": gap_closed,
             "speedup_kept": speedup_kept, "saving_kept": saving_kept, **record}, indent=2, default=str))


if __name__ == "__main__":
    main()
