"""Speed of Darknet YOLOv3/v4 int8 vs fp32 on OpenVINO and onnxruntime (issue 15's speed table).

RANDOM WEIGHTS (seeded `random_init_`, activations shaped like a trained network's): latency and size
do not depend on the weight values. Each model is built from its bundled cfg, quantized with the
default QuantConfig on `--calib-images` seeded uniform images at its input size, and lowered five
ways (fp32 and int8 on OpenVINO and onnxruntime, plus int8 with LeakyReLU/Mish fused into the conv,
`QuantConfig(fuse_leaky_mish=True)`, on OpenVINO: what `--leaky-mish auto` picks there). Every variant of every model is then timed
round-robin in ONE run (each round calls each of them once, batch 1, `--threads` threads), so load
changes on a shared machine hit all of them alike. A call is the lowered detector's forward: the
network on the runtime plus the float [yolo] decode (no NMS). Size is the runtime's file on disk.

    PYTHONPATH=src python benchmarks/darknet_speed.py --threads 2 --repeats 20
    PYTHONPATH=src python benchmarks/darknet_speed.py --repeats 2 --models yolov3-tiny   # a quick check
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import qdet
from qdet.bench.latency import measure_latencies, torch_threads
from qdet.bench.machine import cpu_info, isa_summary, load_average
from qdet.jobs import _saved_size

SIZES = {"yolov3-tiny": 416, "yolov4-tiny": 416, "yolov3": 608, "yolov4": 608}
RUNTIMES = ("openvino", "onnxruntime")


def machine() -> dict[str, str]:
    """lscpu's model name and flags (the ISA extensions that decide int8 speed) and the load average."""
    cpu = cpu_info()
    return {"model": cpu.model, "flags": isa_summary(cpu), "load": load_average()}


def prepare(name: str, size: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    adapter = qdet.get_adapter(f"darknet-{name}")
    det = adapter.build("random")  # seeded (seed 0)
    g = torch.Generator().manual_seed(args.seed)
    calib = [torch.rand(1, 3, size, size, generator=g) for _ in range(args.calib_images)]
    with torch_threads(args.threads):
        qm = qdet.quantize(det, calib, qdet.QuantConfig(), adapter=adapter, progress=False)
        variants: dict[str, Any] = {}
        for rt in RUNTIMES:
            for tag, quantized in (("fp32", False), ("int8", True)):
                lowered = qdet.lower(qm, rt, quantized=quantized, threads=args.threads)
                variants[f"{tag} {rt}"] = (lowered, _saved_size(lowered, tmp / f"{name}_{rt}_{tag}"))
        # what `--leaky-mish auto` picks on OpenVINO: leaky/mish inside the int8 conv (one requantization fewer)
        qm_fused = qdet.quantize(det, calib, qdet.QuantConfig(fuse_leaky_mish=True), adapter=adapter, progress=False)
        lowered = qdet.lower(qm_fused, "openvino", threads=args.threads)
        variants["int8 openvino fused"] = (lowered, _saved_size(lowered, tmp / f"{name}_openvino_fused"))
    x = torch.rand(1, 3, size, size, generator=g)
    return {"variants": variants, "input": x, "params": sum(p.numel() for p in det.parameters())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--calib-images", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    m = machine()
    print("RANDOM WEIGHTS — speed and size only (accuracy: benchmarks/darknet_synthetic.py)")
    print(f"cpu: {m['model']}\nflags: {m['flags']}\nload average at start: {m['load']}")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = {}
        for name in args.models:
            t = time.perf_counter()
            prepared[name] = prepare(name, SIZES[name], args, Path(tmp))
            print(f"  {name} {SIZES[name]} px: {prepared[name]['params']:,} parameters, quantized and lowered "
                  f"in {time.perf_counter() - t:.0f} s", flush=True)
        calls = {f"{name} | {label}": (lambda fn=fn, x=p["input"]: fn(x))
                 for name, p in prepared.items() for label, (fn, _) in p["variants"].items()}
        lat = measure_latencies(calls, threads=args.threads, warmup=args.warmup, repeats=args.repeats)
    load_end = load_average()
    print(f"\nbatch 1, {args.threads} threads, {len(calls)} variants timed round-robin in one run, median of "
          f"{args.repeats} (load average now {load_end})")
    print(f"  {'model':<12} {'px':>4} {'runtime':<27} {'fp32 ms':>8} {'int8 ms':>8} {'speed-up':>8} "
          f"{'fp32 MB':>8} {'int8 MB':>8} {'size ×':>7}")
    rows = []
    for name, p in prepared.items():
        for rt, int8 in (("openvino", "int8 openvino"), ("openvino, leaky/mish fused", "int8 openvino fused"),
                         ("onnxruntime", "int8 onnxruntime")):
            fp32 = "fp32 " + rt.split(",")[0]
            f, q = lat[f"{name} | {fp32}"], lat[f"{name} | {int8}"]
            sf, sq = p["variants"][fp32][1], p["variants"][int8][1]
            row = {"model": name, "size_px": SIZES[name], "runtime": rt, "fp32_ms": f.median_ms, "int8_ms": q.median_ms,
                   "fp32_p90_ms": f.p90_ms, "int8_p90_ms": q.p90_ms, "speedup": f.median_ms / q.median_ms,
                   "fp32_mb": sf, "int8_mb": sq, "size_ratio": (sf / sq) if sf and sq else None}
            rows.append(row)
            ratio = f"{row['size_ratio']:.2f}" if row["size_ratio"] else "-"
            print(f"  {name:<12} {SIZES[name]:>4} {rt:<27} {f.median_ms:8.1f} {q.median_ms:8.1f} "
                  f"{row['speedup']:7.2f}× {sf or 0:8.2f} {sq or 0:8.2f} {ratio:>6}×")
    out = {"machine": {**m, "load_end": load_end}, "threads": args.threads, "repeats": args.repeats, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"written {args.json}")
    return out


if __name__ == "__main__":
    main()
