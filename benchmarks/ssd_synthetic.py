"""SYNTHETIC DATA: a small SSD trained here, float vs int8 COCO mAP for both scopes, seed 003's observer
table, and the mis-normalised calibration run beside the correct one.

No pretrained SSD weights and no labelled training set are available on these machines, so this trains
an SSD from scratch on the generated shapes of the Faster R-CNN benchmark (`qdet.models.rcnn.synthetic`:
boxes, discs, triangles on textured backgrounds; train on stream `seed`, calibrate on `seed+2`,
evaluate on `seed+1`), caches the checkpoint (~/.cache/qdet/benchmarks, QDET_CACHE overrides), then:

  1. float vs int8 mAP, scope `detector` (backbone + extra blocks + heads) and `backbone` (seed 003's
     "half-quantized"), with per-layer-group L1 and SQNR for both scopes;
     when qdet flags calibration samples that dwarf the others (`qm.metrics["calibration_outliers"]`),
     the detector scope again calibrated without them;
  2. the observer table: per-layer-group L1 and mAP for MinMax, Histogram and Percentile
     97.5 / 99 / 99.5 / 99.7 (whole detector);
  3. calibration on [0, 1] images while inference normalises (ssd300_resnet50 only): the warning
     qdet prints, the collapsed mAP, and the correct run.

--arch r50: NVIDIA's SSD300-ResNet50 (4 classes with background) at --size px (>= 264), trained with
qdet.models.ssd.loss; --arch ssdlite: torchvision's SSDLite320-MobileNetV3 at --size px, trained with
torchvision's own loss. The numbers say how much int8 changes a trained SSD's output on synthetic
images; they say nothing about COCO accuracy.

    python benchmarks/ssd_synthetic.py --arch ssdlite --size 192 --steps 400 --minutes 15
    python benchmarks/ssd_synthetic.py --arch r50 --size 264 --steps 300 --minutes 30
    python benchmarks/ssd_synthetic.py --arch ssdlite --steps 2 --val-images 4 --calib-images 2 --observers minmax  # smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import qdet
from qdet.analysis.errors import layer_errors
from qdet.bench.latency import torch_threads
from qdet.bench.machine import load_average
from qdet.config import Observer, QuantConfig, default_activation_spec
from qdet.models.rcnn.synthetic import (
    SHAPE_CLASSES,
    SyntheticShapes,
    collate,
    train_detector,
)
from qdet.models.ssd import SSDResNet50Adapter, TorchvisionSSDAdapter
from qdet.models.ssd.data import SSDInputs
from qdet.models.ssd.loss import match, ssd_loss

NUM_CLASSES = len(SHAPE_CLASSES) + 1
OBSERVERS = {"minmax": (Observer.MINMAX, None), "histogram": (Observer.HISTOGRAM, None),
             **{f"percentile{p}": (Observer.PERCENTILE, p) for p in (97.5, 99.0, 99.5, 99.7)}}


def adapter_for(args: argparse.Namespace) -> Any:
    if args.arch == "r50":
        return SSDResNet50Adapter(num_classes=NUM_CLASSES, img_size=args.size)
    return TorchvisionSSDAdapter("ssdlite320_mobilenet_v3_large", num_classes=NUM_CLASSES)


def build(adapter: Any, args: argparse.Namespace) -> torch.nn.Module:
    model = adapter.build("random")
    if args.arch == "ssdlite":
        model.transform.fixed_size = (args.size, args.size)
    return model


def train_r50(det: torch.nn.Module, data: SyntheticShapes, args: argparse.Namespace) -> dict[str, float]:
    """AdamW + warm-up/cosine on the SSD loss; the detector ends in eval mode."""
    g = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True, collate_fn=collate, generator=g,
                                         drop_last=True)
    net, dboxes = det.net, det.dboxes
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    from qdet.models.ssd.data import preprocess

    net.train()
    step, start, last = 0, time.perf_counter(), float("nan")
    torch.set_flush_denormal(True)
    while step < args.steps:
        for images, targets in loader:
            x = torch.stack([preprocess(img, args.size) for img in images])
            enc = [match(t["boxes"] / data.size, t["labels"], dboxes) for t in targets]
            gloc, glabel = torch.stack([e[0] for e in enc]), torch.stack([e[1] for e in enc])
            loc, conf = net(x)
            loss = ssd_loss(loc, conf, gloc, glabel)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            opt.step()
            sched.step()
            step, last = step + 1, float(loss.detach())
            if step % 25 == 0 or step == 1:
                print(f"  step {step}/{args.steps} loss {last:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
            if step >= args.steps or time.perf_counter() - start > args.minutes * 60:
                args.steps = step
                break
    torch.set_flush_denormal(False)
    det.eval()
    return {"steps": float(step), "seconds": time.perf_counter() - start, "final_loss": last}


def trained(adapter: Any, args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    cache = Path(os.environ.get("QDET_CACHE", Path.home() / ".cache" / "qdet")) / "benchmarks"
    stem = f"synthetic_ssd_{args.arch}_{args.size}px_{args.steps}steps_b{args.batch}_seed{args.seed}"
    ckpt, info_path = cache / f"{stem}.pt", cache / f"{stem}.json"
    model = build(adapter, args)
    if ckpt.is_file() and info_path.is_file() and not args.retrain:
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        info = json.loads(info_path.read_text())
        print(f"loaded cached checkpoint {ckpt} ({info['steps']:.0f} steps, {info['seconds'] / 60:.1f} min)")
        return model.eval(), info
    print(f"training {args.arch} from scratch: {args.steps} steps × {args.batch} images at {args.size} px, at most "
          f"{args.minutes} min, {args.train_threads} thread(s) (load {load_average()})")
    torch.manual_seed(args.seed)
    data = SyntheticShapes(args.steps * args.batch, seed=args.seed, size=args.size)
    with torch_threads(args.train_threads):
        if args.arch == "r50":
            info = train_r50(model, data, args)
        else:
            info = train_detector(model, data, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                                  time_limit_s=args.minutes * 60, log=lambda s: print("  " + s, flush=True))
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), ckpt)
    info_path.write_text(json.dumps(info))
    return model.eval(), info


def calibration(args: argparse.Namespace, *, normalize: bool = True) -> list[Any]:
    shapes = SyntheticShapes(args.calib_images, seed=args.seed + 2, size=args.size)
    if args.arch == "r50":
        loader = torch.utils.data.DataLoader(SSDInputs(shapes, img_size=args.size, normalize=normalize), batch_size=8)
        return list(loader)
    return [[shapes[i][0] for i in range(j, min(j + 8, len(shapes)))] for j in range(0, len(shapes), 8)]


def _without(batches: list[Any], drop: set[int]) -> list[Any]:
    """The calibration batches minus the samples at the given positions (calibration order): r50
    batches are [images (B, 3, S, S), ids (B,)], ssdlite batches lists of (3, H, W) images."""
    out, i = [], 0
    for b in batches:
        stacked = isinstance(b[0], torch.Tensor) and b[0].dim() == 4
        n = len(b[0]) if stacked else len(b)
        keep = [j for j in range(n) if i + j not in drop]
        i += n
        if keep:
            out.append([b[0][keep], b[1][keep]] if stacked else [b[j] for j in keep])
    return out


def group(name: str) -> str:
    """Layer name → seed 003's granularity: stem / layer1..3 / extra block i / loc / conf (or 3 parts)."""
    m = re.search(r"feature_extractor\.feature_extractor\.(\d+)", name)
    if m:
        return {4: "layer1", 5: "layer2", 6: "layer3"}.get(int(m.group(1)), "stem")
    m = re.search(r"additional_blocks\.(\d+)", name)
    if m:
        return f"extra{m.group(1)}"
    for head in ("loc", "conf"):
        if re.search(rf"(^|\.){head}\.\d", name):
            return head
    parts = name.split(".")
    if parts[0] == "head":
        return ".".join(parts[:2])  # regression_head / classification_head, every level
    return ".".join(parts[:4] if parts[:2] == ["backbone", "features"] else parts[:3])


def grouped(errors: list[Any]) -> dict[str, dict[str, float]]:
    acc: dict[str, list[Any]] = defaultdict(list)
    for e in errors:
        acc[group(e.name)].append(e)
    out = {}
    for g, es in acc.items():
        n = sum(e.numel for e in es)
        finite = [e.sqnr_db for e in es if math.isfinite(e.sqnr_db)]
        out[g] = {"l1": sum(e.l1 * e.numel for e in es) / n, "sqnr_db": min(finite) if finite else math.inf,
                  "layers": len(es)}
    return out


def quantize(model: torch.nn.Module, adapter: Any, batches: list[Any], cfg: QuantConfig) -> Any:
    return qdet.quantize(model, batches, cfg, adapter=adapter, progress=False)


def int8_runner(qm: Any, args: argparse.Namespace) -> Any:
    return qm if args.runtime == "reference" else qdet.lower(qm, args.runtime, threads=args.threads)


def scored(adapter: Any, runner: Any, val: Any) -> tuple[float, dict[str, float]]:
    """mAP and what the detections look like (a collapse to 0 mAP shows whether boxes vanished or moved):
    detections per image above the adapter's score threshold and their mean score."""
    preds = adapter.predict(runner, val, progress=False)
    stats = {"detections_per_image": len(preds) / max(1, len(val)),
             "mean_score": sum(p["score"] for p in preds) / len(preds) if preds else 0.0}
    return adapter.score(preds, val).map, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("r50", "ssdlite"), default="ssdlite")
    ap.add_argument("--size", type=int, default=None, help="input px (default: 264 for r50, 192 for ssdlite)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--minutes", type=float, default=20.0, help="training time limit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--error-images", type=int, default=16, help="images for the per-layer error tables")
    ap.add_argument("--observers", default=",".join(OBSERVERS))
    ap.add_argument("--runtime", default="reference", help="where int8 is evaluated (reference, openvino, ...)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-threads", type=int, default=1)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.size = args.size or (264 if args.arch == "r50" else 192)
    warnings.filterwarnings("ignore", message=".*random initialisation.*")
    print(f"SYNTHETIC DATA · {args.arch} at {args.size} px · torch {torch.__version__} · load {load_average()}")

    adapter = adapter_for(args)
    model, info = trained(adapter, args)
    val = SyntheticShapes(args.val_images, seed=args.seed + 1, size=args.size)
    err_batches = calibration(argparse.Namespace(**{**vars(args), "calib_images": args.error_images, "seed": args.seed + 10}))
    calib = calibration(args)
    report: dict[str, Any] = {"arch": args.arch, "size": args.size, "train": info, "runtime": args.runtime}

    with torch_threads(args.threads):
        float_map, stats = scored(adapter, model, val)
        print(f"float (PyTorch) mAP {float_map:.4f} on {len(val)} synthetic images; {stats['detections_per_image']:.1f} "
              f"detections per image, mean score {stats['mean_score']:.3f}")
        report["float_map"], report["float_detections"] = float_map, stats

        # 1. both scopes (Histogram observer, qdet's default)
        report["scopes"] = {}
        for scope in ("detector", "backbone"):
            ad = adapter.with_scope(scope)
            qm = quantize(model, ad, calib, QuantConfig())
            m, stats = scored(adapter, int8_runner(qm, args), val)
            errs = grouped(layer_errors(qm, err_batches, ad.transform_fn(model)))
            report["scopes"][scope] = {"map": m, "drop_points": 100 * (float_map - m), "detections": stats,
                                       "layers": errs, "calibration_outliers": qm.metrics.get("calibration_outliers")}
            print(f"int8 scope {scope:8s} ({args.runtime}): mAP {m:.4f}, drop {100 * (float_map - m):+.2f} points; "
                  f"{stats['detections_per_image']:.1f} detections per image, mean score {stats['mean_score']:.3f}")
            for g, e in errs.items():
                print(f"    {g:28s} L1 {e['l1']:.3e}  min SQNR {e['sqnr_db']:6.1f} dB  ({e['layers']} points)")

        # 1b. calibration samples that dwarf the others (qdet warns and lists them): the detector scope
        # again without them, so the cost of those few samples is measured, not guessed
        flagged = report["scopes"]["detector"].get("calibration_outliers")
        if flagged:
            keep = _without(calib, set(flagged["samples"]))
            qm = quantize(model, adapter, keep, QuantConfig())
            m, stats = scored(adapter, int8_runner(qm, args), val)
            n_keep = args.calib_images - len(flagged["samples"])
            report["scopes"]["detector_without_flagged"] = {"map": m, "calibration_images": n_keep,
                                                            "flagged": flagged["samples"]}
            print(f"int8 scope detector, calibrated without the {len(flagged['samples'])} samples qdet flagged "
                  f"({n_keep} images): mAP {m:.4f}, drop {100 * (float_map - m):+.2f} points")

        # 2. observers (whole detector)
        report["observers"] = {}
        for name in args.observers.split(","):
            observer, pct = OBSERVERS[name]
            spec = default_activation_spec(observer)
            if pct is not None:
                spec = dataclasses.replace(spec, percentile=pct)
            qm = quantize(model, adapter, calib, QuantConfig(activations=spec))
            m = adapter.evaluate(int8_runner(qm, args), val, progress=False).map
            report["observers"][name] = {"map": m, "layers": grouped(layer_errors(qm, err_batches, adapter.transform_fn(model)))}
        groups = list(next(iter(report["observers"].values()))["layers"])
        names = list(report["observers"])
        print("\nper-layer-group L1 (float vs int8), whole detector:")
        print(f"{'group':28s}" + "".join(f"{n:>16s}" for n in names))
        for g in groups:
            print(f"{g:28s}" + "".join(f"{report['observers'][n]['layers'][g]['l1']:16.3e}" for n in names))
        print(f"{'mAP':28s}" + "".join(f"{report['observers'][n]['map']:16.4f}" for n in names))

        # 3. the mis-normalised calibration set (seed 003's collapse)
        if args.arch == "r50":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                bad = quantize(model, adapter.with_scope("backbone"), calibration(args, normalize=False), QuantConfig())
            said = [str(w.message) for w in caught if "calibration" in str(w.message)]
            m_bad = adapter.evaluate(int8_runner(bad, args), val, progress=False).map
            good = report["scopes"]["backbone"]["map"]
            print(f"\ncalibrated on [0, 1] images, inference normalised (backbone scope): mAP {m_bad:.4f} vs {good:.4f} "
                  f"calibrated through the inference preprocessing; qdet warned: {said[0] if said else 'NO WARNING'}")
            report["mis_normalised"] = {"map": m_bad, "correct_map": good, "warning": said[0] if said else None}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
