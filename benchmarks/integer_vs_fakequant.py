"""Integer-only runtime vs the fake-quant simulation on CIFAR-10 (all 10,000 test images).

Quantizes a CIFAR ResNet (default config, calibration on a seeded subset of the test folder as in
cifar_observers.py), runs the fake-quant model and the integer runtime on every test image, and
prints, per activation quantizer, the share of output codes equal / within 1 step (1 LSB of that
layer's output scale), the worst layers, the overall share, and top-1 both ways.

The fake-quant reference runs in float32 (the simulation as used for PTQ/QAT) and, by default, also
in float64 (`--reference`): the same model without float32 round-off, compared with the same
integer run. Teacher forcing reads the first reference's codes. `--all-layers` prints every layer
in graph order with the share equal / off by 1 / off by 2 or more.

    python benchmarks/integer_vs_fakequant.py --model resnet56
    python benchmarks/integer_vs_fakequant.py --model resnet20 --images 1000   # quicker look
    python benchmarks/integer_vs_fakequant.py --start 0 --images 5000 --json a.json   # split ...
    python benchmarks/integer_vs_fakequant.py --merge a.json b.json                   # ... and merge
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qdet import api
from qdet.config import QuantConfig
from qdet.data.folders import make_loader, seeded_subset
from qdet.fileio import write_text_atomically
from qdet.runtimes.integer_export import (
    LayerAgreement,
    float64_reference,
    layer_agreement,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--images", type=int, default=None, help="evaluate N test images from --start (default: all)")
    ap.add_argument("--start", type=int, default=0, help="first test image (split a run over processes, then --merge)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge the --json files of split runs and print the tables")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--reference", nargs="+", choices=("float32", "float64"), default=["float32", "float64"],
                    help="fake-quant reference precision(s); teacher forcing uses the first")
    ap.add_argument("--all-layers", action="store_true", help="print every layer in graph order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worst", type=int, default=10, help="how many worst layers to print")
    ap.add_argument("--forced-images", type=int, default=None,
                    help="run the teacher-forced comparison on the first N images only (default: all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (TF32 is switched off so fake-quant stays fp32)")
    ap.add_argument("--json", help="write per-layer rows and totals to this JSON file")
    args = ap.parse_args()
    if args.merge:
        _merge(args.merge, args.worst, args.all_layers)
        return
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)

    adapter = api.get_adapter(args.model)
    model = adapter.build()
    data = adapter.eval_dataset()
    if args.images is not None or args.start:
        stop = len(data) if args.images is None else min(args.start + args.images, len(data))
        data = torch.utils.data.Subset(data, range(args.start, stop))
    calib = seeded_subset(adapter.eval_dataset(), args.calib_images, seed=args.seed)
    qm = api.quantize(model, make_loader(calib, 32), QuantConfig(), adapter=adapter, progress=False)
    qm = qm.to(device)
    lowered = api.lower(qm, "integer").to(device)

    refs = {name: (qm if name == "float32" else float64_reference(qm)) for name in args.reference}
    stats: dict[str, dict[str, LayerAgreement]] = {name: {} for name in refs}
    forced: dict[str, LayerAgreement] = {}
    hits = {name: 0 for name in ["integer", *refs]}
    same_pred = {name: 0 for name in refs}
    n = 0
    first, *rest = refs
    t0 = time.time()
    for images, labels in tqdm(make_loader(data, args.batch), desc="fake-quant vs integer", unit="batch"):
        images = images.to(device)
        _, outs = layer_agreement(refs[first], lowered, [images], stats[first],
                                  also=[(refs[r], stats[r]) for r in rest])
        if args.forced_images is None or n < args.forced_images:
            layer_agreement(refs[first], lowered, [images], forced, teacher_forced=True)
        fake_outs, int_out = [outs[0][0], *outs[0][2:]], outs[0][1]
        ip = int_out.argmax(1).cpu()
        hits["integer"] += int((ip == labels).sum())
        for name, out in zip(refs, fake_outs):
            fp = out.argmax(1).cpu()
            hits[name] += int((fp == labels).sum())
            same_pred[name] += int((fp == ip).sum())
        n += len(labels)
        if args.json:  # after every batch: a stopped run still leaves its counts
            _write(args, device, n, hits, same_pred, stats, forced, {}, time.time() - t0)

    wall = time.time() - t0
    print(f"\n{args.model}: {n} CIFAR-10 test images on {device}, {len(stats[first])} activation quantizers, "
          f"references {', '.join(refs)}; {wall:.0f} s, peak RSS {_rss_gib():.1f} GiB")
    totals = {}
    n_forced = n if args.forced_images is None else min(n, -(-args.forced_images // args.batch) * args.batch)
    for name in refs:
        title = f"end to end vs {name} fake-quant (both run the whole network), {n} images"
        totals[title] = _print_table(title, stats[name], args.worst, args.all_layers)
    title = (f"teacher-forced (each integer layer reads the {first} fake-quant codes of its inputs), "
             f"{n_forced} images")
    totals[title] = _print_table(title, forced, args.worst, args.all_layers)
    _print_top1(hits, same_pred, n)
    if args.json:
        _write(args, device, n, hits, same_pred, stats, forced, totals, wall)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _print_top1(hits: dict[str, int], same_pred: dict[str, int], n: int) -> None:
    for name, same in same_pred.items():
        print(f"top-1 fake-quant ({name}) {100 * hits[name] / n:.2f} %, integer {100 * hits['integer'] / n:.2f} %, "
              f"difference {100 * (hits['integer'] - hits[name]) / n:+.2f} points; same prediction on {same}/{n} images")


def _write(args: argparse.Namespace, device: torch.device, n: int, hits: dict[str, int], same_pred: dict[str, int],
           stats: dict[str, dict[str, LayerAgreement]], forced: dict[str, LayerAgreement], totals: dict[str, Any],
           wall_s: float) -> None:
    out = {"model": args.model, "start": args.start, "images": n, "device": str(device), "references": args.reference,
           "hits": hits, "same_prediction": same_pred, "totals": totals, "wall_s": wall_s, "peak_rss_gib": _rss_gib(),
           "layers_end_to_end": {name: [vars(s) for s in st.values()] for name, st in stats.items()},
           "layers_teacher_forced": [vars(s) for s in forced.values()]}
    write_text_atomically(args.json, json.dumps(out, indent=1))


def _merge(paths: list[str], worst: int, all_layers: bool = False) -> None:
    """Sum the counts of split runs (same model, same calibration, same references) and print the tables."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    n = sum(r["images"] for r in runs)
    refs = runs[0]["references"]
    if any(r["references"] != refs for r in runs):
        raise SystemExit("the runs compared against different references; merge like with like")
    tables = [(f"end to end vs {name} fake-quant", [r["layers_end_to_end"][name] for r in runs]) for name in refs]
    tables.append((f"teacher-forced ({refs[0]} codes)", [r["layers_teacher_forced"] for r in runs]))
    for title, per_run in tables:
        merged: dict[str, LayerAgreement] = {}
        for rows in per_run:
            for row in rows:
                s = merged.setdefault(row["name"], LayerAgreement(row["name"]))
                s.elements += row["elements"]
                s.equal += row["equal"]
                s.within_1 += row["within_1"]
                s.max_diff = max(s.max_diff, row["max_diff"])
        _print_table(f"{title}, {n} images (merged from {len(runs)} runs)", merged, worst, all_layers)
    hits = {k: sum(r["hits"][k] for r in runs) for k in runs[0]["hits"]}
    same = {k: sum(r["same_prediction"][k] for r in runs) for k in refs}
    _print_top1(hits, same, n)
    walls = " + ".join(f"{r['wall_s']:.0f}" for r in runs)
    print(f"wall time: {walls} s; peak RSS "
          f"{max(r['peak_rss_gib'] for r in runs):.1f} GiB")


def _print_table(title: str, stats: dict[str, LayerAgreement], worst: int, all_layers: bool = False) -> dict[str, float]:
    if not stats:
        print(f"\n{title}: not run")
        return {}
    if all_layers:
        print(f"\n{title}: every layer in graph order")
        print(f"{'layer':28s} {'elements':>12s} {'equal %':>9s} {'off 1 %':>9s} {'off >=2 %':>9s} {'max diff':>8s}")
        for s in stats.values():
            print(f"{s.name:28s} {s.elements:12,d} {s.pct_equal:9.4f} {s.pct_within_1 - s.pct_equal:9.4f} "
                  f"{100 - s.pct_within_1:9.4f} {s.max_diff:8d}")
    rows = sorted(stats.values(), key=lambda s: (s.pct_within_1, s.pct_equal))
    total = sum(s.elements for s in rows)
    equal = sum(s.equal for s in rows)
    within = sum(s.within_1 for s in rows)
    print(f"\n{title}: {total:,} output codes; worst {worst} layers by share within 1 LSB")
    print(f"{'layer':28s} {'elements':>12s} {'equal %':>9s} {'<=1 LSB %':>10s} {'max diff':>8s}")
    for s in rows[:worst]:
        print(f"{s.name:28s} {s.elements:12,d} {s.pct_equal:9.4f} {s.pct_within_1:10.4f} {s.max_diff:8d}")
    print(f"overall: equal {100 * equal / total:.4f} %, within 1 LSB {100 * within / total:.4f} %, "
          f"max diff {max(s.max_diff for s in rows)}, layers with every code within 1 LSB: "
          f"{sum(s.within_1 == s.elements for s in rows)}/{len(rows)}")
    return {"elements": total, "pct_equal": 100 * equal / total, "pct_within_1": 100 * within / total}


if __name__ == "__main__":
    main()
