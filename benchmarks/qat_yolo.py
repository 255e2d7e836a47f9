"""YOLOv5n int8: float vs PTQ vs QAT-fine-tuned, COCO mAP on the bundled val2017 images.

Calibration and fine-tuning use only the 160 bundled train2017 images (letterboxed at --img-size,
no augmentation); evaluation uses the 158 val2017 images (pycocotools, letterbox 640, conf 0.001).
QAT: Adam on the detection loss (qdet.models.yolo.loss, YOLOv5 v6.1 weights), BN statistics frozen
from --freeze-bn (batches of 8 give noisy statistics), observers after --freeze-observers.
160 images are far fewer than YOLOv5 trains on: QAT can overfit them; the table says what happened.

    python benchmarks/qat_yolo.py --steps 200 --runtime reference
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader

import qdet
from qdet.config import QATConfig, QuantConfig
from qdet.data.folders import seeded_subset
from qdet.models.yolo.loss import YoloV5Loss
from qdet.models.yolo.train_data import CocoYoloTargets, collate_targets, yolo_loss_fn
from qdet.report.table import format_table
from qdet.train import train_qat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--img-size", type=int, default=640)
    ap.add_argument("--freeze-bn", type=int, default=1)
    ap.add_argument("--freeze-observers", type=int, default=100)
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--runtime", default="reference", help="runtime for the int8 rows")
    ap.add_argument("--skip-float", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="training device (evaluation runs on CPU)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    adapter = qdet.get_adapter("yolov5n")
    model = adapter.build()
    calib_set = seeded_subset(adapter.calibration_dataset(), args.calib_images, seed=args.seed)
    calib = DataLoader(calib_set, batch_size=8)
    cfg = QuantConfig()
    rows = []
    if not args.skip_float:
        res = adapter.evaluate(model)
        rows.append({"model": "float", "map": res.map, "map50": res.map50})
        print(rows[-1], flush=True)
    ptq = qdet.quantize(model, calib, cfg, adapter=adapter, progress=False)
    res = adapter.evaluate(qdet.lower(ptq, args.runtime, threads=args.threads))
    rows.append({"model": f"PTQ int8 ({args.runtime})", "map": res.map, "map50": res.map50})
    print(rows[-1], flush=True)

    qat = QATConfig(freeze_bn_after=args.freeze_bn, freeze_observers_after=args.freeze_observers,
                    calibration_batches=len(calib))
    qm = qdet.prepare_qat(model, calib, cfg, qat=qat, adapter=adapter, progress=False)
    train = DataLoader(CocoYoloTargets(adapter.coco("train2017"), args.img_size), batch_size=args.batch, shuffle=True,
                       collate_fn=collate_targets, generator=torch.Generator().manual_seed(args.seed), drop_last=True)
    loss = YoloV5Loss(model.anchors, model.stride, nc=80, img_size=args.img_size)
    device = torch.device(args.device)
    qm.to(device)
    t0 = time.perf_counter()
    log = train_qat(qm.model.body, train, yolo_loss_fn(loss), steps=args.steps, lr=args.lr, qat=qat,
                    transform_fn=lambda b: b[0].to(device))
    train_s = time.perf_counter() - t0
    converted = qdet.convert(qm.cpu())
    res = adapter.evaluate(qdet.lower(converted, args.runtime, threads=args.threads))
    rows.append({"model": f"QAT {args.steps} steps int8 ({args.runtime})", "map": res.map, "map50": res.map50,
                 "train_s": train_s, "first_loss": sum(log.losses[:10]) / min(10, len(log.losses)),
                 "last_loss": sum(log.losses[-10:]) / min(10, len(log.losses))})
    print(rows[-1], flush=True)
    print(f"\nYOLOv5n, COCO val2017 (158 bundled images); calibration/fine-tuning on the 160 train2017 images; "
          f"QAT {args.steps} steps of batch {args.batch} at {args.img_size}, Adam lr {args.lr}, BN frozen after "
          f"{args.freeze_bn}, observers after {args.freeze_observers}, {train_s:.0f} s on {args.device}")
    print(format_table(rows, ["model", "map", "map50"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
