"""Faster R-CNN int8: whole graph vs island path, COCO mAP on SYNTHETIC shapes (issue 18).

The tiny Faster R-CNN the tests train (`tiny_faster_rcnn`, 128 px, 400 AdamW steps on SyntheticShapes,
seed 0; cached under $QDET_CACHE/tests like tests/test_faster_rcnn.py, trained here when missing),
quantized with the default config on 32 generated images, lowered to OpenVINO (or onnxruntime) as
the island path and as one whole graph; pycocotools mAP of both on held-out generated images, and
the agreement of their detections. SYNTHETIC data: says nothing about real-image accuracy.

    PYTHONPATH=src nice -n 10 python benchmarks/whole_graph_rcnn.py --val-images 200
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import qdet
from qdet.bench.latency import torch_threads
from qdet.eval.coco import evaluate_coco
from qdet.eval.detection_agreement import agreement
from qdet.models.faster_rcnn import FasterRCNNAdapter
from qdet.models.rcnn.synthetic import SyntheticShapes, tiny_faster_rcnn, train_detector
from qdet.models.rcnn.views import make_quantizable

SIZE, STEPS, SEED = 128, 400, 0


def trained_tiny() -> torch.nn.Module:
    model = tiny_faster_rcnn(image_size=SIZE)
    path = Path(os.environ.get("QDET_CACHE", Path.home() / ".cache" / "qdet")) / "tests" / \
        f"tiny_frcnn_v1_{SIZE}px_{STEPS}steps_seed{SEED}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    torch.manual_seed(SEED)
    train_detector(model, SyntheticShapes(4000, seed=SEED, size=SIZE, max_objects=3), steps=STEPS, batch_size=8,
                   lr=3e-3, seed=SEED)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--runtime", default="openvino")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    adapter = FasterRCNNAdapter("tiny_faster_rcnn", num_classes=4)
    model = make_quantizable(trained_tiny())
    ds = SyntheticShapes(32, seed=2, size=SIZE, max_objects=3)
    calib = [[ds[i][0] for i in range(j, j + 4)] for j in range(0, 32, 4)]
    with torch_threads(args.threads):
        qm = qdet.quantize(model, calib, qdet.QuantConfig(), adapter=adapter, progress=False)
        variants = {"island int8": qdet.lower(qm, args.runtime, threads=args.threads),
                    "whole int8": qdet.lower(qm, args.runtime, threads=args.threads, whole_graph=True, adapter=adapter)}
    val = SyntheticShapes(args.val_images, seed=SEED + 1, size=SIZE, max_objects=3)
    gt = val.coco_annotations()
    ids = [img["id"] for img in gt["images"]]
    outs = {}
    print(f"SYNTHETIC shapes, {len(val)} held-out images, {args.runtime}, {args.threads} thread(s)")
    with torch_threads(args.threads), torch.inference_mode():
        for name, fn in variants.items():
            outs[name] = [fn([val[i][0]])[0] for i in range(len(val))]
            dets = [{"image_id": int(i), "category_id": int(lab), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                     "score": float(s)}
                    for i, o in zip(ids, outs[name])
                    for b, lab, s in zip(o["boxes"].tolist(), o["labels"].tolist(), o["scores"].tolist())]
            r = evaluate_coco(dets, gt)
            print(f"  {name:<12} mAP {100 * r.map:6.2f}  mAP50 {100 * r.map50:6.2f}")

    def rows(dets):
        return [torch.cat([d["boxes"], d["scores"][:, None], d["labels"][:, None].float()], 1) for d in dets]

    print(f"  agreement: {agreement(rows(outs['island int8']), rows(outs['whole int8']))}")


if __name__ == "__main__":
    main()
