"""SYNTHETIC DATA: float vs int8 COCO mAP of a toy Darknet cfg trained from scratch on generated shapes.

Issue 15's accuracy check. No Darknet .weights can be fetched here, so a small yolov3-tiny-like cfg
(`TOY_CFG` below: leaky convs, max-pools, a route + upsample, two [yolo] heads at strides 32 and 16,
3 classes, `scale_x_y=2.0`) is built by qdet's Darknet reader, trained from scratch for `--steps`
steps on the generated images the Faster R-CNN benchmark uses (`qdet.models.rcnn.synthetic.
SyntheticShapes`: boxes, discs, triangles on textured backgrounds; train stream seed, calibration
seed+2, held-out validation seed+1) with `DarknetYoloLoss` (YOLOv5's loss, Darknet's box decode),
written to a real-format `.weights` file (cached outside git: ~/.cache/qdet/benchmarks, QDET_CACHE
overrides; --retrain ignores it) and read back from it, quantized with the default
`QuantConfig` (64 calibration images) and evaluated with pycocotools: PyTorch fp32 vs int8 on
OpenVINO (and the int8 simulation and onnxruntime). The numbers say how much int8 changes a trained
Darknet detector's output; they say nothing about accuracy on real images.

    PYTHONPATH=src python benchmarks/darknet_synthetic.py --steps 300 --size 128
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

import qdet
from qdet.bench.latency import torch_threads
from qdet.bench.machine import load_average
from qdet.eval.coco import evaluate_coco
from qdet.models.darknet import DarknetAdapter, load_darknet, save_darknet_weights
from qdet.models.darknet.loss import DarknetYoloLoss
from qdet.models.rcnn.synthetic import SHAPE_CLASSES, SyntheticShapes
from qdet.models.yolo.postprocess import non_max_suppression

# A yolov3-tiny-like cfg, narrower (3 classes). {size} is filled in. Layer numbers in comments.
TOY_CFG = """[net]
width={size}
height={size}
channels=3

# 0..7: backbone (two stride-2 convs, then max-pools), strides 2..32
[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=32
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=32
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=64
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=128
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

# 8..12: stride-32 head
[convolutional]
batch_normalize=1
filters=192
size=3
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=96
size=1
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=192
size=3
stride=1
pad=1
activation=leaky

[convolutional]
size=1
stride=1
pad=1
filters=24
activation=linear

[yolo]
mask = 3,4,5
anchors = 14,14, 20,28, 28,20, 32,32, 42,42, 54,54
classes=3
num=6
scale_x_y = 2.0

# 13..19: stride-16 head
[route]
layers = -4

[convolutional]
batch_normalize=1
filters=64
size=1
stride=1
pad=1
activation=leaky

[upsample]
stride=2

[route]
layers = -1, 6

[convolutional]
batch_normalize=1
filters=128
size=3
stride=1
pad=1
activation=leaky

[convolutional]
size=1
stride=1
pad=1
filters=24
activation=linear

[yolo]
mask = 0,1,2
anchors = 14,14, 20,28, 28,20, 32,32, 42,42, 54,54
classes=3
num=6
scale_x_y = 2.0
"""


def targets_of(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) images and (n, 6) [image, class 0..2, cx, cy, w, h] targets in pixels."""
    images = torch.stack([b[0] for b in batch])
    rows = []
    for k, (_, t) in enumerate(batch):
        b = t["boxes"]
        cxcywh = torch.cat(((b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]), 1)
        rows.append(torch.cat((torch.full((len(b), 1), float(k)), (t["labels"] - 1).float()[:, None], cxcywh), 1))
    return images, torch.cat(rows) if rows else torch.zeros(0, 6)


def train(det: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Adam, linear warm-up then cosine; a fresh stream of generated images (no image seen twice)."""
    torch.manual_seed(args.seed)
    data = SyntheticShapes(args.steps * args.batch, seed=args.seed, size=args.size)
    loss_fn = DarknetYoloLoss(det, img_size=args.size)
    opt = torch.optim.Adam(det.body.parameters(), lr=args.lr)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm))))
    det.train()
    t0, losses = time.perf_counter(), []
    for step in range(args.steps):
        images, targets = targets_of([data[step * args.batch + k] for k in range(args.batch)])
        total, parts = loss_fn(det.body(images), targets)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(det.body.parameters(), 10.0)
        opt.step()
        sched.step()
        losses.append(float(total) / args.batch)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            box, obj, cls = parts.tolist()
            print(f"  step {step:4d}  loss {losses[-1]:.4f} (box {box:.4f} obj {obj:.4f} cls {cls:.4f})  "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    det.eval()
    return {"steps": args.steps, "seconds": time.perf_counter() - t0, "final_loss": sum(losses[-20:]) / len(losses[-20:])}


def detections(fn: Callable[[torch.Tensor], torch.Tensor], data: SyntheticShapes) -> list[dict[str, Any]]:
    """COCO detections at Darknet's `detector map` thresholds (conf 0.005, NMS IoU 0.45, multi-label)."""
    out: list[dict[str, Any]] = []
    with torch.no_grad():
        for i in range(len(data)):
            pred = torch.as_tensor(fn(data[i][0][None])).float()
            det = non_max_suppression(pred, 0.005, 0.45, multi_label=True, max_det=100)[0]
            for (x1, y1, x2, y2, s, c) in det.tolist():
                out.append({"image_id": i, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    print("SYNTHETIC DATA — generated shapes, not a real-image benchmark")
    print(f"load average at start: {load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "toy-tiny.cfg"
        cfg.write_text(TOY_CFG.format(size=args.size))
        det = load_darknet(cfg, "random", seed=args.seed, names=SHAPE_CLASSES)
        n_params = sum(p.numel() for p in det.body.parameters())
        print(f"toy cfg: {len(det.body.layers)} layers, {n_params:,} parameters, heads at strides {det.body.strides}; "
              f"training {args.steps} steps × {args.batch} images at {args.size} px, {args.threads} threads")
        cache = Path(os.environ.get("QDET_CACHE", Path.home() / ".cache" / "qdet")) / "benchmarks"
        stem = f"darknet_toy_{args.size}px_{args.steps}steps_b{args.batch}_lr{args.lr:g}_seed{args.seed}"
        weights, info_path = cache / f"{stem}.weights", cache / f"{stem}.json"
        with torch_threads(args.threads):
            if weights.is_file() and info_path.is_file() and not args.retrain:
                info = json.loads(info_path.read_text())
                print(f"loaded cached {weights} (trained {info['steps']} steps in {info['seconds'] / 60:.1f} min)")
            else:
                info = train(det, args)
                # a real-format .weights file, as a user's trained model would arrive (cached outside git)
                cache.mkdir(parents=True, exist_ok=True)
                save_darknet_weights(det.body, weights.with_suffix(".tmp"))
                os.replace(weights.with_suffix(".tmp"), weights)
                info_path.write_text(json.dumps(info))
            det = load_darknet(cfg, weights, names=SHAPE_CLASSES)
            adapter = DarknetAdapter("darknet", str(cfg))
            calib_set = SyntheticShapes(args.calib_images, seed=args.seed + 2, size=args.size)
            calib = [torch.stack([calib_set[i][0] for i in range(j, min(j + 8, len(calib_set)))])
                     for j in range(0, len(calib_set), 8)]
            t = time.perf_counter()
            qm = qdet.quantize(det, calib, qdet.QuantConfig(), adapter=adapter, progress=False)
            variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"PyTorch fp32": det}
            if not args.skip_simulation:
                variants["qdet int8 (simulation)"] = qm
            for runtime in args.runtimes:
                variants[f"qdet int8 · {runtime}"] = qdet.lower(qm, runtime, threads=args.threads)
            if "openvino" in args.runtimes:  # what `--leaky-mish auto` picks for OpenVINO: leaky inside the int8 conv
                qm_fused = qdet.quantize(det, calib, qdet.QuantConfig(fuse_leaky_mish=True), adapter=adapter,
                                         progress=False)
                variants["qdet int8 · openvino, leaky fused"] = qdet.lower(qm_fused, "openvino", threads=args.threads)
            cov = qdet.coverage(qm)
            print(f"quantized ({args.calib_images} calibration images) and lowered in {time.perf_counter() - t:.1f} s: "
                  f"{cov.int8_layers} of {cov.int8_layers + cov.float_layers} convs int8")
            val = SyntheticShapes(args.val_images, seed=args.seed + 1, size=args.size)
            gt = val.coco_annotations()
            print(f"\nCOCO bbox mAP on {len(val)} held-out generated images ({len(gt['annotations'])} objects)")
            print(f"  {'variant':<34} {'mAP':>6} {'mAP50':>6} {'mAP75':>6} {'Δ mAP (pts)':>12}")
            results: dict[str, Any] = {}
            for name, fn in variants.items():
                r = evaluate_coco(detections(fn, val), gt)
                results[name] = r.as_dict()
                delta = 100 * (r.map - results["PyTorch fp32"]["map"])
                print(f"  {name:<34} {r.map:6.3f} {r.map50:6.3f} {r.map75:6.3f} {delta:+12.2f}")
    ov = results.get("qdet int8 · openvino")
    if ov is not None:
        drop = 100 * (results["PyTorch fp32"]["map"] - ov["map"])
        print(f"\nint8 OpenVINO vs fp32: drop {drop:+.2f} mAP points (issue 15 asks for <= 0.5)")
        results["drop_points_openvino"] = drop
    fused = results.get("qdet int8 · openvino, leaky fused")
    if fused is not None:
        drop = 100 * (results["PyTorch fp32"]["map"] - fused["map"])
        print(f"int8 OpenVINO (leaky fused) vs fp32: drop {drop:+.2f} mAP points")
        results["drop_points_openvino_fused"] = drop
    print(f"training: {info['steps']} steps in {info['seconds'] / 60:.1f} min, final loss {info['final_loss']:.4f}; "
          f"load average now {load_average()}")
    return {"training": info, "results": results, "args": {k: str(v) for k, v in vars(args).items()}}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--size", type=int, default=128, help="image and [net] size, a multiple of 32 (default: 128)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtimes", nargs="*", default=["openvino", "onnxruntime"])
    ap.add_argument("--retrain", action="store_true", help="train even when a cached checkpoint exists")
    ap.add_argument("--skip-simulation", action="store_true", help="skip the (slow) fake-quant simulation row")
    ap.add_argument("--json", type=Path, help="also write the results here")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.size % 32:
        raise SystemExit("--size must be a multiple of 32")
    warnings.filterwarnings("ignore", category=UserWarning)
    out = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str))
        print(f"written {args.json}")
    return out


if __name__ == "__main__":
    main()
