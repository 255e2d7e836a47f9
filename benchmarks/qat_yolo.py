"""YOLOv5n int8: float vs PTQ vs QAT-fine-tuned, COCO mAP on the bundled val2017 images.

A thin wrapper over `qdet.qat_jobs.detection_qat_job` (what `qdet qat yolov5n` runs), with this
benchmark's recipe as defaults: calibration on 128 of the 160 bundled train2017 images in batches
of 8, fine-tuning on all 160 (letterboxed at --img-size, no augmentation), evaluation on the 158
val2017 images (pycocotools, letterbox, conf 0.001). QAT: Adam on qdet's YOLOv5 detection loss
(qdet.models.yolo.loss), BN statistics frozen after --freeze-bn (batches of 8 give noisy
statistics), observers after --freeze-observers. 160 images are far fewer than YOLOv5 trains on:
QAT can overfit them; the table says what happened.

    python benchmarks/qat_yolo.py --steps 200 --runtime reference --threads 1
    (the same as: qdet qat yolov5n --steps 200 --calib-images 128 --calib-batch 8 --runtime reference)
"""
from __future__ import annotations

import argparse
import json

import qdet
from qdet.config import QATConfig, QuantConfig
from qdet.fileio import write_text_atomically
from qdet.jobs import JobOptions
from qdet.qat_jobs import DETECTION_DEFAULTS, QATOptions, detection_qat_job


def main() -> None:
    d = DETECTION_DEFAULTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--img-size", type=int, default=640)
    ap.add_argument("--freeze-bn", type=int, default=d.schedule.freeze_bn_after)
    ap.add_argument("--freeze-observers", type=int, default=d.schedule.freeze_observers_after)
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--runtime", default="reference", help="runtime for the int8 rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="training device (evaluation runs on CPU)")
    ap.add_argument("--out", help="also save the converted QAT model here")
    ap.add_argument("--json")
    args = ap.parse_args()
    adapter = qdet.get_adapter("yolov5n")
    opts = JobOptions(calib_images=args.calib_images, calib_batch=args.calib_batch, seed=args.seed,
                      runtime=args.runtime, threads=args.threads, bench=False, progress=False)
    qopts = QATOptions(
        steps=args.steps, batch_size=args.batch, lr=args.lr, img_size=args.img_size, device=args.device,
        schedule=QATConfig(freeze_bn_after=args.freeze_bn, freeze_observers_after=args.freeze_observers))
    result, qm = detection_qat_job(adapter, adapter.build(), QuantConfig(), opts, qopts)
    print(result.title)
    print(result.table())
    if args.out:
        qdet.save(qm, args.out)
    if args.json:
        write_text_atomically(args.json, json.dumps(result.as_dict(), indent=1, default=str))


if __name__ == "__main__":
    main()
