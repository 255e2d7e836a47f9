"""Integer-only runtime vs the fake-quant simulation on CIFAR-10 (all 10,000 test images).

Quantizes a CIFAR ResNet (default config, calibration on a seeded subset of the test folder as in
cifar_observers.py), runs the fake-quant model and the integer runtime on every test image, and
prints, per activation quantizer, the share of output codes equal / within 1 step (1 LSB of that
layer's output scale), the worst layers, the overall share, and top-1 both ways.

    python benchmarks/integer_vs_fakequant.py --model resnet56
    python benchmarks/integer_vs_fakequant.py --model resnet20 --images 1000   # quicker look
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qdet import api
from qdet.config import QuantConfig
from qdet.data.folders import make_loader, seeded_subset
from qdet.runtimes.integer_export import LayerAgreement, layer_agreement


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--images", type=int, default=None, help="evaluate N test images from --start (default: all)")
    ap.add_argument("--start", type=int, default=0, help="first test image (split a run over processes, then --merge)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge the --json files of split runs and print the tables")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worst", type=int, default=10, help="how many worst layers to print")
    ap.add_argument("--forced-images", type=int, default=None,
                    help="run the teacher-forced comparison on the first N images only (default: all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (TF32 is switched off so fake-quant stays fp32)")
    ap.add_argument("--json", help="write per-layer rows and totals to this JSON file")
    args = ap.parse_args()
    if args.merge:
        _merge(args.merge, args.worst)
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

    stats: dict[str, LayerAgreement] = {}
    forced: dict[str, LayerAgreement] = {}
    fake_hits = int_hits = same_pred = n = 0
    for images, labels in tqdm(make_loader(data, args.batch), desc="fake-quant vs integer", unit="batch"):
        images = images.to(device)
        _, outs = layer_agreement(qm, lowered, [images], stats)
        if args.forced_images is None or n < args.forced_images:
            layer_agreement(qm, lowered, [images], forced, teacher_forced=True)
        fake_out, int_out = outs[0]
        fp, ip = fake_out.argmax(1).cpu(), int_out.argmax(1).cpu()
        fake_hits += int((fp == labels).sum())
        int_hits += int((ip == labels).sum())
        same_pred += int((fp == ip).sum())
        n += len(labels)
        if args.json:  # after every batch: a stopped run still leaves its counts
            _write(args, device, n, fake_hits, int_hits, same_pred, stats, forced, {})

    print(f"\n{args.model}: {n} CIFAR-10 test images on {device}, {len(stats)} activation quantizers")
    totals = {}
    n_forced = n if args.forced_images is None else min(n, -(-args.forced_images // args.batch) * args.batch)
    for title, table in ((f"end to end (both run the whole network), {n} images", stats),
                         (f"teacher-forced (each integer layer reads the fake-quant codes of its inputs), "
                          f"{n_forced} images", forced)):
        totals[title] = _print_table(title, table, args.worst)
    fake_top1, int_top1 = 100 * fake_hits / n, 100 * int_hits / n
    print(f"top-1 fake-quant {fake_top1:.2f} %, integer {int_top1:.2f} %, difference {int_top1 - fake_top1:+.2f} points; "
          f"same prediction on {same_pred}/{n} images")
    if args.json:
        _write(args, device, n, fake_hits, int_hits, same_pred, stats, forced, totals)


def _write(args: argparse.Namespace, device: torch.device, n: int, fake_hits: int, int_hits: int, same_pred: int,
           stats: dict[str, LayerAgreement], forced: dict[str, LayerAgreement], totals: dict[str, Any]) -> None:
    out = {"model": args.model, "start": args.start, "images": n, "device": str(device), "fake_hits": fake_hits,
           "int_hits": int_hits, "same_prediction": same_pred, "totals": totals,
           "layers_end_to_end": [vars(s) for s in stats.values()],
           "layers_teacher_forced": [vars(s) for s in forced.values()]}
    tmp = Path(args.json + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.json)


def _merge(paths: list[str], worst: int) -> None:
    """Sum the counts of split runs (same model, same calibration) and print the tables."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    n = sum(r["images"] for r in runs)
    for key, title in (("layers_end_to_end", "end to end"), ("layers_teacher_forced", "teacher-forced")):
        merged: dict[str, LayerAgreement] = {}
        for r in runs:
            for row in r[key]:
                s = merged.setdefault(row["name"], LayerAgreement(row["name"]))
                s.elements += row["elements"]
                s.equal += row["equal"]
                s.within_1 += row["within_1"]
                s.max_diff = max(s.max_diff, row["max_diff"])
        _print_table(f"{title}, {n} images (merged from {len(runs)} runs)", merged, worst)
    fake, integer, same = (sum(r[k] for r in runs) for k in ("fake_hits", "int_hits", "same_prediction"))
    print(f"top-1 fake-quant {100 * fake / n:.2f} %, integer {100 * integer / n:.2f} %, difference "
          f"{100 * (integer - fake) / n:+.2f} points; same prediction on {same}/{n} images")


def _print_table(title: str, stats: dict[str, LayerAgreement], worst: int) -> dict[str, float]:
    if not stats:
        print(f"\n{title}: not run")
        return {}
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
