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
from pathlib import Path

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
    ap.add_argument("--images", type=int, default=None, help="evaluate the first N test images (default: all)")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worst", type=int, default=10, help="how many worst layers to print")
    ap.add_argument("--json", help="write per-layer rows and totals to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    adapter = api.get_adapter(args.model)
    model = adapter.build()
    data = adapter.eval_dataset()
    if args.images is not None:
        data = torch.utils.data.Subset(data, range(min(args.images, len(data))))
    calib = seeded_subset(adapter.eval_dataset(), args.calib_images, seed=args.seed)
    qm = api.quantize(model, make_loader(calib, 32), QuantConfig(), adapter=adapter, progress=False)
    lowered = api.lower(qm, "integer")

    stats: dict[str, LayerAgreement] = {}
    fake_hits = int_hits = same_pred = n = 0
    for images, labels in tqdm(make_loader(data, args.batch), desc="fake-quant vs integer", unit="batch"):
        _, outs = layer_agreement(qm, lowered, [images], stats)
        fake_out, int_out = outs[0]
        fp, ip = fake_out.argmax(1), int_out.argmax(1)
        fake_hits += int((fp == labels).sum())
        int_hits += int((ip == labels).sum())
        same_pred += int((fp == ip).sum())
        n += len(labels)

    rows = sorted(stats.values(), key=lambda s: s.pct_within_1)
    total = sum(s.elements for s in rows)
    equal = sum(s.equal for s in rows)
    within = sum(s.within_1 for s in rows)
    print(f"\n{args.model}: {n} CIFAR-10 test images, {len(rows)} activation quantizers, {total:,} output codes")
    print(f"worst {args.worst} layers by share within 1 LSB:")
    print(f"{'layer':28s} {'elements':>12s} {'equal %':>9s} {'<=1 LSB %':>10s} {'max diff':>8s}")
    for s in rows[: args.worst]:
        print(f"{s.name:28s} {s.elements:12,d} {s.pct_equal:9.4f} {s.pct_within_1:10.4f} {s.max_diff:8d}")
    print(f"overall: equal {100 * equal / total:.4f} %, within 1 LSB {100 * within / total:.4f} %, "
          f"layers with every code within 1 LSB: {sum(s.within_1 == s.elements for s in rows)}/{len(rows)}")
    fake_top1, int_top1 = 100 * fake_hits / n, 100 * int_hits / n
    print(f"top-1 fake-quant {fake_top1:.2f} %, integer {int_top1:.2f} %, difference {int_top1 - fake_top1:+.2f} points; "
          f"same prediction on {same_pred}/{n} images")
    if args.json:
        out = {"model": args.model, "images": n, "fake_top1": fake_top1, "integer_top1": int_top1,
               "same_prediction": same_pred, "elements": total, "equal": equal, "within_1": within,
               "layers": [vars(s) for s in stats.values()]}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
