"""Whole-detector int8 Faster R-CNN (ResNet50-FPN): artefact size, end-to-end latency, per-layer SQNR.

One run, one KITTI frame (1242×375 → resized to 1333×402, padded to 1344×416), same thread count for
every variant:
  * PyTorch fp32 eager (torchvision's model);
  * qdet int8 regions on onnxruntime and on OpenVINO (float islands in PyTorch between them);
  * qdet's fp32 regions on the same two runtimes (what the runtime alone buys);
  * the strongest automatic baseline: the whole detector exported to ONNX (legacy exporter) and
    quantized by onnxruntime's own `quantize_static` (QDQ, per-channel int8 weights, uint8 MinMax
    activations, same six calibration frames), run by onnxruntime and by OpenVINO — once with every
    op type ORT supports (its default; this also quantizes anchor-generation arithmetic, which
    OpenVINO 2026.4 refuses to compile) and once with Conv/Gemm/MatMul only.
Variants are timed in interleaved rounds (each round times every variant once, in a shuffled order)
so that the load of a shared machine hits all of them alike; the load average is printed.

Weights are random (no pretrained detector weights can be downloaded here): speed and size do not
depend on them. The backbone's BatchNorm statistics are re-estimated on the six frames first, so that
activations have the scale of a trained network (the per-layer SQNR would otherwise describe exploding
random activations). Calibration: the six KITTI frames through the model's own transform.

    python benchmarks/faster_rcnn_speed.py --threads 2 --repeats 7
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import qdet
from qdet.analysis.errors import layer_errors
from qdet.bench.latency import interleaved_times, torch_threads
from qdet.bench.machine import load_average
from qdet.data.kitti import KittiDataset
from qdet.fileio import write_text_atomically
from qdet.models import REGISTRY
from qdet.models.random_init import recalibrate_bn
from qdet.models.rcnn.onnx_baseline import (
    CONV_GEMM,
    OnnxDetector,
    export_detector,
    ort_quantize_static,
)
from qdet.models.rcnn.proposals import shared_proposals
from qdet.paths import assets_dir


def mb(n_bytes: int) -> float:
    return n_bytes / 1e6


def noise_control(model: torch.nn.Module, image: torch.Tensor, snr_db: float) -> str:
    import math

    with torch.no_grad():
        x = model.transform([image])[0].tensors
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        noise *= x.norm() / noise.norm() / 10 ** (snr_db / 20)
        ref, noisy = model.backbone.body(x), model.backbone.body(x + noise)
    parts = []
    for k in ref:
        err = float(((ref[k] - noisy[k]) ** 2).sum())
        parts.append(f"body output {k}: {10 * math.log10(float((ref[k] ** 2).sum()) / max(err, 1e-30)):.1f} dB")
    return f"input noise {snr_db:.1f} dB → " + ", ".join(parts)


def stage_breakdown(lowered: torch.nn.Module, regions: list[str], frame: torch.Tensor, *, threads: int,
                    repeats: int = 3) -> tuple[dict[str, float], float]:
    """Median ms per region call and for the whole call; the difference is the float islands (PyTorch)."""
    spent: dict[str, list[float]] = {r: [] for r in regions}
    starts: dict[str, float] = {}
    handles = []
    for r in regions:
        mod = lowered.get_submodule(r)
        handles.append(mod.register_forward_pre_hook(lambda m, a, r=r: starts.__setitem__(r, time.perf_counter())))
        handles.append(mod.register_forward_hook(lambda m, a, o, r=r: spent[r].append(time.perf_counter() - starts[r])))
    totals = []
    try:
        with torch_threads(threads), torch.no_grad():
            for _ in range(repeats):  # every region is called once per image
                t0 = time.perf_counter()
                lowered([frame])
                totals.append(time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()
    per_region = {r: statistics.median(v) * 1000 for r, v in spent.items()}
    return per_region, statistics.median(totals) * 1000


def region_files_size(lowered: torch.nn.Module, regions: list[str], folder: Path) -> dict[str, int]:
    sizes = {}
    for path in regions:
        f = lowered.get_submodule(path).save(folder / f"{path}.onnx")
        sizes[path] = f.stat().st_size
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--frame", type=int, default=1, help="index of the KITTI frame to time")
    ap.add_argument("--skip-baseline", action="store_true", help="skip onnxruntime quantize_static of the whole model")
    ap.add_argument("--skip-sqnr", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("runs/faster_rcnn_speed"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*random initialisation.*")
    warnings.filterwarnings("ignore", category=UserWarning)
    args.out.mkdir(parents=True, exist_ok=True)

    import onnxruntime
    import openvino

    print(f"torch {torch.__version__} · onnxruntime {onnxruntime.__version__} · openvino {openvino.__version__} · "
          f"{platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · threads {args.threads}")
    print(f"load average at start: {load_average()}")

    ds = KittiDataset(assets_dir() / "kitti")
    images = [ds.image(i) for i in range(len(ds))]
    frame = images[args.frame]
    adapter = REGISTRY.get("fasterrcnn_resnet50_fpn")
    torch.manual_seed(0)
    model = adapter.build(weights="random")
    recalibrate_bn(model.backbone, lambda: model.backbone(model.transform(images)[0].tensors))
    model.eval()

    t = time.perf_counter()
    with torch_threads(args.threads):
        qm = qdet.quantize(model, [[img] for img in images], qdet.QuantConfig(), adapter=adapter, progress=False)
    print(f"qdet quantize (6 frames, histogram observer): {time.perf_counter() - t:.1f} s, "
          f"{len(qm.layers)} quantized points in {len(qm.regions)} regions")

    # ------------------------------------------------------------ lowering + sizes
    regions = list(qm.regions)
    t = time.perf_counter()
    with torch_threads(args.threads):
        int8_ort = qdet.lower(qm, "onnxruntime", threads=args.threads)
        int8_ov = qdet.lower(qm, "openvino", threads=args.threads)
        fp32_ort = qdet.lower(qm, "onnxruntime", quantized=False, threads=args.threads)
        fp32_ov = qdet.lower(qm, "openvino", quantized=False, threads=args.threads)
    print(f"lowering to onnxruntime + openvino (int8 and fp32): {time.perf_counter() - t:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        int8_sizes = region_files_size(int8_ort, regions, tmp / "int8")
        fp32_sizes = region_files_size(fp32_ort, regions, tmp / "fp32")
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        pth = len(buf.getvalue())
        qdet_file = qdet.save(qm, tmp / "frcnn.qdet").stat().st_size
        whole_fp32 = tmp / "whole_fp32.onnx"
        whole_int8 = tmp / "whole_ortq.onnx"
        baseline: dict[str, Callable[[], Any]] = {}
        sizes_extra = {}
        if not args.skip_baseline:
            t = time.perf_counter()
            export_detector(model, frame, whole_fp32)
            print(f"whole-model ONNX export (legacy exporter): {time.perf_counter() - t:.1f} s")
            secs = ort_quantize_static(whole_fp32, whole_int8, images)
            print(f"onnxruntime quantize_static of the whole detector (every supported op): {secs:.1f} s")
            whole_conv = tmp / "whole_ortq_conv.onnx"
            secs = ort_quantize_static(whole_fp32, whole_conv, images, op_types=CONV_GEMM)
            print(f"onnxruntime quantize_static, Conv/Gemm/MatMul only: {secs:.1f} s")
            sizes_extra = {"whole fp32 ONNX": whole_fp32.stat().st_size,
                           "ORT quantize_static ONNX (all ops)": whole_int8.stat().st_size,
                           "ORT quantize_static ONNX (conv/gemm)": whole_conv.stat().st_size}
            candidates = [("whole fp32 ONNX · onnxruntime", whole_fp32, "onnxruntime"),
                          ("ORT quantize_static (all) · ORT", whole_int8, "onnxruntime"),
                          ("ORT quantize_static (conv) · ORT", whole_conv, "onnxruntime"),
                          ("ORT quantize_static (all) · OV", whole_int8, "openvino"),
                          ("ORT quantize_static (conv) · OV", whole_conv, "openvino")]
            for label, path, runtime in candidates:
                try:
                    det = OnnxDetector(path, runtime=runtime, threads=args.threads)
                except RuntimeError as exc:  # OpenVINO cannot compile every QDQ placement ORT chooses
                    print(f"{label}: OpenVINO failed to compile it ({str(exc).strip().splitlines()[-1][:160]})")
                    continue
                baseline[label] = lambda det=det: det.raw(frame)

    print("\nSize on disk")
    rows = [("PyTorch fp32 state_dict (.pth)", pth), ("qdet fp32 regions (ONNX, sum)", sum(fp32_sizes.values())),
            ("qdet int8 regions (QDQ ONNX, sum)", sum(int8_sizes.values())), ("qdet int8 artefact (.qdet)", qdet_file),
            *sizes_extra.items()]
    for name, size in rows:
        print(f"  {name:<36} {mb(size):8.1f} MB {size / 2**20:8.1f} MiB   {size / pth:6.3f}× of fp32 .pth")
    print("  int8 regions: " + ", ".join(f"{k} {mb(v):.1f} MB" for k, v in int8_sizes.items()))

    # ------------------------------------------------------------ latency
    fns: dict[str, Callable[[], Any]] = {
        "PyTorch fp32 eager": lambda: model([frame]),
        "qdet int8 · onnxruntime": lambda: int8_ort([frame]),
        "qdet int8 · openvino": lambda: int8_ov([frame]),
        "qdet fp32 regions · onnxruntime": lambda: fp32_ort([frame]),
        "qdet fp32 regions · openvino": lambda: fp32_ov([frame]),
        **baseline,
    }
    print(f"\nLatency, frame {ds.frame_ids[args.frame]} ({frame.shape[2]}×{frame.shape[1]}), batch 1, "
          f"{args.threads} threads, {args.warmup} warm-up + {args.repeats} interleaved rounds")
    start_load = load_average()
    times = interleaved_times(fns, threads=args.threads, warmup=args.warmup, repeats=args.repeats, shuffle_seed=0)
    end_load = load_average()
    base = statistics.median(times["PyTorch fp32 eager"])
    print(f"\n  {'variant':<36} {'median ms':>10} {'p90 ms':>9} {'min ms':>9} {'vs PyTorch fp32':>16}")
    results = {}
    for name, ts in times.items():
        s = sorted(ts)
        med, p90 = statistics.median(s), s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]
        results[name] = {"median_ms": med, "p90_ms": p90, "min_ms": s[0], "speedup": base / med}
        print(f"  {name:<36} {med:10.0f} {p90:9.0f} {s[0]:9.0f} {base / med:15.2f}×")
    print(f"  load average: {start_load} (start of timing) → {end_load} (end)")
    for label, low in (("onnxruntime", int8_ort), ("openvino", int8_ov)):
        per_region, total = stage_breakdown(low, regions, frame, threads=args.threads)
        islands = total - sum(per_region.values())
        print(f"  qdet int8 · {label}: {total:.0f} ms = " + " + ".join(f"{r} {v:.0f}" for r, v in per_region.items())
              + f" + float islands in PyTorch {islands:.0f} ms (median of 3)")
    for label, low in (("onnxruntime", int8_ort), ("openvino", int8_ov)):
        counts = {}
        for path in regions:
            mod = low.get_submodule(path)
            ops = mod.fused_ops() if label == "onnxruntime" else mod.executed_ops()
            if label == "onnxruntime":
                counts[path] = f"QLinearConv {ops.get('QLinearConv', 0)}, QGemm {ops.get('QGemm', 0)}, " \
                               f"float Conv {ops.get('Conv', 0)}, float Gemm/MatMul {ops.get('Gemm', 0) + ops.get('MatMul', 0)}"
            else:
                int8 = sum(n for k, n in ops.items() if k.split('/')[0] in ('Convolution', 'FullyConnected') and k.endswith(('u8', 'i8')))
                flt = sum(n for k, n in ops.items() if k.split('/')[0] in ('Convolution', 'FullyConnected') and k.endswith('f32'))
                counts[path] = f"int8 conv/fc {int8}, fp32 conv/fc {flt}"
        print(f"  {label} kernels: " + "; ".join(f"{k}: {v}" for k, v in counts.items()))

    # ------------------------------------------------------------ per-layer SQNR
    # The paired SQNR pass holds two sets of full-resolution activations: release the runtime sessions
    # first (the run was OOM-killed here on a 24 GB machine shared with other jobs).
    import gc

    del int8_ort, int8_ov, fp32_ort, fp32_ov, fns, baseline
    gc.collect()
    sqnr_rows = []
    if not args.skip_sqnr:
        print("\nPer-layer SQNR on the six KITTI frames (float vs int8 simulation; the int8 pass reuses the "
              "float pass's proposals, so box-head layers compare the same RoIs)")
        kinds = {rec.name: rec.kind for rec in qm.layers}
        with torch_threads(args.threads), shared_proposals(qm):
            errors = layer_errors(qm, [[img] for img in images], adapter.transform_fn(qm))
        print(f"  {'layer':<48} {'kind':<7} {'SQNR dB':>8} {'cosine':>8}")
        for e in errors:
            region = next((r for r in regions if e.name.startswith(r + ".")), "?")
            sqnr_rows.append({"region": region, "layer": e.name, "kind": kinds.get(e.name, "?"),
                              "sqnr_db": e.sqnr_db, "cosine": e.cosine})
            print(f"  {e.name:<48} {kinds.get(e.name, '?'):<7} {e.sqnr_db:8.1f} {e.cosine:8.4f}")
        print("\n  control: the FLOAT network with only Gaussian noise added to its input, at the input quantizer's "
              "SQNR → SQNR of the body's outputs (random weights amplify any perturbation layer by layer):")
        print("  " + noise_control(model, frame, errors[0].sqnr_db))
        print(f"\n  {'region':<26} {'points':>6} {'min dB':>7} {'median dB':>10} {'worst layer'}")
        for region in regions:
            rs = [r for r in sqnr_rows if r["region"] == region]
            worst = min(rs, key=lambda r: r["sqnr_db"])
            print(f"  {region:<26} {len(rs):>6} {worst['sqnr_db']:7.1f} "
                  f"{statistics.median(r['sqnr_db'] for r in rs):10.1f} {worst['layer']}")

    summary = {"sizes_bytes": dict(rows), "int8_region_bytes": int8_sizes, "latency": results,
               "load_average": {"start": start_load, "end": end_load}, "threads": args.threads, "sqnr": sqnr_rows}
    write_text_atomically(args.out / "results.json", json.dumps(summary, indent=2, default=str))
    print(f"\nwritten {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
