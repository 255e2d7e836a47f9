"""SYNTHETIC DATA: float vs int8 COCO mAP of a small Faster R-CNN trained from scratch on generated shapes.

No pretrained detector weights and no labelled training set are available on these machines, so this
trains a small torchvision `FasterRCNN` (a residual BN backbone + FPN + RPN + TwoMLPHead, or ResNet18-FPN
with --arch resnet18) from scratch on procedurally generated images — coloured boxes, discs and
triangles on textured backgrounds (`qdet.models.rcnn.synthetic`, seeded) — for a few CPU minutes,
caches the checkpoint outside git (~/.cache/qdet/benchmarks, QDET_CACHE overrides), then quantizes
the whole detector with qdet (64 generated calibration images through the model's transform) and
compares COCO mAP on held-out generated images: PyTorch fp32, the int8 simulation, int8 on
onnxruntime and int8 on OpenVINO. The numbers say how much int8 changes a trained detector's output;
they say nothing about accuracy on real images.

    python benchmarks/faster_rcnn_synthetic.py --minutes 12
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_iou

import qdet
from qdet.bench.latency import torch_threads
from qdet.bench.machine import load_average
from qdet.eval.coco import evaluate_coco
from qdet.models.faster_rcnn import FasterRCNNAdapter
from qdet.models.rcnn import make_quantizable
from qdet.models.rcnn.onnx_baseline import (
    CONV_GEMM,
    OnnxDetector,
    export_detector,
    ort_quantize_static,
)
from qdet.models.rcnn.proposals import shared_proposals
from qdet.models.rcnn.synthetic import (
    SHAPE_CLASSES,
    SyntheticShapes,
    resnet18_faster_rcnn,
    tiny_faster_rcnn,
    train_detector,
)


def build(arch: str, size: int) -> torch.nn.Module:
    if arch == "small":
        return tiny_faster_rcnn(image_size=size, widths=(24, 48, 96, 160), fpn_channels=64)
    if arch == "resnet18":
        return resnet18_faster_rcnn(image_size=size)
    raise SystemExit(f"unknown --arch {arch!r}: small or resnet18")


def trained_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    cache = Path(os.environ.get("QDET_CACHE", Path.home() / ".cache" / "qdet")) / "benchmarks"
    stem = f"synthetic_frcnn_{args.arch}_{args.size}px_{args.steps}steps_b{args.batch}_seed{args.seed}"
    ckpt, info_path = cache / f"{stem}.pt", cache / f"{stem}.json"
    model = build(args.arch, args.size)
    if ckpt.is_file() and info_path.is_file() and not args.retrain:
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        info = json.loads(info_path.read_text())
        print(f"loaded cached checkpoint {ckpt} (trained {info['steps']:.0f} steps in {info['seconds'] / 60:.1f} min)")
        return model.eval(), info
    print(f"training {args.arch} from scratch: {args.steps} steps × {args.batch} images at {args.size} px, "
          f"at most {args.minutes} min, 1 thread (load {load_average()})")
    torch.manual_seed(args.seed)
    with torch_threads(1):  # one thread: no spin-waiting against other jobs on a shared machine
        info = train_detector(model, SyntheticShapes(args.steps * args.batch, seed=args.seed, size=args.size),
                              steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                              time_limit_s=args.minutes * 60, log=lambda s: print("  " + s, flush=True))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, ckpt)
    info_path.write_text(json.dumps(info))
    print(f"cached {ckpt}")
    return model.eval(), info


def detect(fn: Callable[[list[torch.Tensor]], Any], data: SyntheticShapes) -> tuple[list[dict], list[dict], float]:
    outputs, dets, times = [], [], []
    with torch.no_grad():
        for i in range(len(data)):
            image = data[i][0]
            t0 = time.perf_counter()
            out = {k: v.detach().cpu() for k, v in fn([image])[0].items()}
            times.append(time.perf_counter() - t0)
            outputs.append(out)
            for b, lab, s in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist()):
                dets.append({"image_id": i, "category_id": int(lab), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                             "score": float(s)})
    return outputs, dets, statistics.median(times) * 1000


def agreement(ref: list[dict], test: list[dict], score: float = 0.5, iou: float = 0.9) -> tuple[int, int]:
    matched = total = 0
    for r, t in zip(ref, test):
        keep = r["scores"] > score
        boxes, labels = r["boxes"][keep], r["labels"][keep]
        total += len(boxes)
        if len(boxes) and len(t["boxes"]):
            o = box_iou(boxes, t["boxes"]) * (labels[:, None] == t["labels"][None, :])
            matched += int((o.max(1).values >= iou).sum())
    return matched, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="small", help="small (residual BN backbone + FPN, 1.4 M params) or resnet18")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--minutes", type=float, default=12.0, help="training time cap (CPU minutes, 1 thread)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for evaluation (1: PyTorch's spinning threads crawl on a shared machine)")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--skip-baseline", action="store_true", help="skip onnxruntime quantize_static of the whole model")
    ap.add_argument("--out", type=Path, default=Path("runs/faster_rcnn_synthetic"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    print("SYNTHETIC DATA — generated shapes, not a real-image benchmark")
    print(f"load average at start: {load_average()}")

    model, info = trained_model(args)
    make_quantizable(model)
    adapter = FasterRCNNAdapter(f"synthetic_{args.arch}", num_classes=len(SHAPE_CLASSES) + 1)
    calib_set = SyntheticShapes(args.calib_images, seed=args.seed + 2, size=args.size)
    calib = [[calib_set[i][0] for i in range(j, min(j + 8, len(calib_set)))] for j in range(0, len(calib_set), 8)]
    t = time.perf_counter()
    with torch_threads(args.threads):
        qm = qdet.quantize(model, calib, qdet.QuantConfig(), adapter=adapter, progress=False)
        int8_ort = qdet.lower(qm, "onnxruntime", threads=args.threads)
        int8_ov = qdet.lower(qm, "openvino", threads=args.threads)
    print(f"quantized ({args.calib_images} calibration images, histogram observer) and lowered in "
          f"{time.perf_counter() - t:.1f} s: {len(qm.layers)} quantized points in regions {list(qm.regions)}")

    val = SyntheticShapes(args.val_images, seed=args.seed + 1, size=args.size)
    gt = val.coco_annotations()
    variants: dict[str, Callable[[list[torch.Tensor]], Any]] = {
        "PyTorch fp32": model, "qdet int8 (simulation)": qm, "qdet int8 · onnxruntime": int8_ort,
        "qdet int8 · openvino": int8_ov,
    }
    if not args.skip_baseline:  # onnxruntime's own quantize_static of the whole exported detector
        calib_images = [calib_set[i][0] for i in range(len(calib_set))]
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_detector(model, calib_images[0], f"{tmp}/fp32.onnx")
            for tag, ops in (("all", None), ("conv", CONV_GEMM)):
                path = f"{tmp}/int8_{tag}.onnx"
                ort_quantize_static(fp32, path, calib_images, op_types=ops)
                for runtime, short in (("onnxruntime", "ORT"), ("openvino", "OV")):
                    try:
                        variants[f"ORT quantize_static ({tag}) · {short}"] = OnnxDetector(path, runtime=runtime,
                                                                                         threads=args.threads)
                    except RuntimeError as exc:
                        print(f"ORT quantize_static ({tag}) · {short}: OpenVINO failed to compile it "
                              f"({str(exc).strip().splitlines()[-1][:120]})")
    results: dict[str, Any] = {}
    outputs: dict[str, list[dict]] = {}
    print(f"\nCOCO bbox mAP on {len(val)} held-out generated images ({len(gt['annotations'])} objects), "
          f"{args.threads} threads (load {load_average()})")
    print(f"  {'variant':<34} {'mAP':>6} {'mAP50':>6} {'mAP75':>6} {'Δ mAP':>7} {'agree@0.9':>10} {'ms/img':>7}")
    with torch_threads(args.threads):
        for name, fn in variants.items():
            outs, dets, ms = detect(fn, val)
            outputs[name] = outs
            r = evaluate_coco(dets, gt)
            m, n = agreement(outputs["PyTorch fp32"], outs)
            results[name] = {**r.as_dict(), "ms_per_image": ms, "agreement": [m, n]}
            delta = r.map - results["PyTorch fp32"]["map"]
            print(f"  {name:<34} {r.map:6.3f} {r.map50:6.3f} {r.map75:6.3f} {delta:+7.3f} {m / max(n, 1):10.1%} {ms:7.1f}")
    print("  agree@0.9: share of float detections (score > 0.5) matched by a same-class int8 detection with IoU >= 0.9")
    from qdet.analysis.errors import layer_errors

    with torch_threads(args.threads), shared_proposals(qm):
        errors = layer_errors(qm, [[val[i][0]] for i in range(8)], adapter.transform_fn(qm))
    print("\n  per-layer SQNR of the trained detector (8 held-out images, float vs int8 simulation, shared proposals):")
    sqnr = {}
    for region in qm.regions:
        vals = [e.sqnr_db for e in errors if e.name.startswith(region + ".")]
        worst = min((e for e in errors if e.name.startswith(region + ".")), key=lambda e: e.sqnr_db)
        sqnr[region] = {"points": len(vals), "min_db": worst.sqnr_db, "median_db": statistics.median(vals)}
        print(f"  {region:<26} {len(vals):>3} points  min {worst.sqnr_db:5.1f} dB ({worst.name})  "
              f"median {statistics.median(vals):5.1f} dB")
    results["sqnr"] = sqnr
    print(f"  training: {info['steps']:.0f} steps, {info['seconds'] / 60:.1f} min, final loss {info['final_loss']:.3f}; "
          f"load average now {load_average()}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"training": info, "results": results, "args": vars(args)},
                                                      indent=2, default=str))
    print(f"written {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
