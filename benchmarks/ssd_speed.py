"""SSD int8 vs fp32 on the same runtime (OpenVINO by default): file sizes and latency, network alone
and end to end (with the float decode + per-class NMS), SSD300-ResNet50 and SSDLite320-MobileNetV3.

Weights are RANDOM (no pretrained SSD can be downloaded here): size and speed do not depend on them.
BatchNorm statistics are first re-estimated on the calibration images so that activations have the
scale of a trained network. Calibration and the timed image: SYNTHETIC shapes
(`qdet.models.rcnn.synthetic`), through each model's inference preprocessing. Batch 1, the same
thread count for every variant, one run, round-robin (each round calls every variant once:
`qdet.api.benchmark`); the CPU model, its flags and the load average are printed.

Sizes: the `.qdet` int8 artefact vs the float state dict as safetensors.

    python benchmarks/ssd_speed.py --threads 2 --repeats 20
    python benchmarks/ssd_speed.py --repeats 1 --warmup 0 --calib-images 1   # correctness check only
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import qdet
from qdet.bench.latency import torch_threads
from qdet.bench.machine import cpu_info, isa_summary, load_average
from qdet.models import REGISTRY
from qdet.models.random_init import recalibrate_bn
from qdet.models.rcnn.synthetic import SyntheticShapes
from qdet.models.ssd.data import SSDInputs

MODELS = ("ssd300_resnet50", "ssdlite320_mobilenet_v3_large")


def cpu_line() -> str:
    cpu = cpu_info()
    return f"{cpu.model} · flags: {isa_summary(cpu)}"


def state_size(model: torch.nn.Module, folder: Path) -> int:
    from safetensors.torch import save_file

    path = folder / "fp32.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def setup(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, Any, list[Any], Callable, Callable]:
    """(float model, adapter, calibration batches, network-alone call, end-to-end call) of one model."""
    adapter = REGISTRY.get(name)
    n = max(2, args.calib_images)  # BatchNorm statistics of a 1×1 map need two images
    shapes = SyntheticShapes(n + 1, seed=3, size=320)
    torch.manual_seed(0)
    if name == "ssd300_resnet50":
        model = adapter.build("random")
        inputs = SSDInputs(shapes, img_size=adapter.img_size)
        xs = [inputs[i][0][None] for i in range(n)]
        recalibrate_bn(model, lambda: model.net(torch.cat(xs)))
        batches = [(x, None) for x in xs[: args.calib_images]]
        x = inputs[n][0][None]
        return model, adapter, batches, (lambda m: m.net(x)), (lambda m: m(x))
    model = adapter.build("random")
    images = [shapes[i][0] for i in range(n)]
    recalibrate_bn(model, lambda: model.backbone(model.transform(images)[0].tensors))
    image = shapes[n][0]
    tensor = model.transform([image])[0].tensors

    def network(m: torch.nn.Module) -> Any:
        return m.head(list(m.backbone(tensor).values()))

    return model, adapter, [[img] for img in images[: args.calib_images]], network, (lambda m: m([image]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runtime", default="openvino")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--calib-images", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*random initialisation.*")
    print(f"torch {torch.__version__} · {cpu_line()} · {os.cpu_count()} CPUs · threads {args.threads} · "
          f"runtime {args.runtime} · batch 1 · load at start {load_average()}")
    rows = []
    for name in args.models.split(","):
        model, adapter, batches, network, end_to_end = setup(name, args)
        t = time.perf_counter()
        with torch_threads(args.threads):
            qm = qdet.quantize(model, batches, qdet.QuantConfig(), adapter=adapter, progress=False)
            int8 = qdet.lower(qm, args.runtime, threads=args.threads)
            fp32 = qdet.lower(qm, args.runtime, quantized=False, threads=args.threads)
        print(f"{name}: quantize + lower {time.perf_counter() - t:.0f} s; {qdet.coverage(qm).table().splitlines()[0]}")
        with tempfile.TemporaryDirectory() as tmp:
            q_size = qdet.save(qm, Path(tmp) / "m.qdet").stat().st_size
            f_size = state_size(model, Path(tmp))
        calls = {"fp32 network": (lambda f=network, m=fp32: f(m)), "int8 network": (lambda f=network, m=int8: f(m)),
                 "fp32 end to end": (lambda f=end_to_end, m=fp32: f(m)),
                 "int8 end to end": (lambda f=end_to_end, m=int8: f(m))}
        timed = qdet.api.benchmark({k: (args.runtime, fn, None) for k, fn in calls.items()}, (),
                                   threads=args.threads, warmup=args.warmup, repeats=args.repeats, progress=False)
        lat = {r.name: r.latency for r in timed}
        row = {"model": name, "fp32_mb": f_size / 1e6, "int8_mb": q_size / 1e6, "size_ratio": q_size / f_size,
               **{f"{k.replace(' ', '_')}_ms": v.median_ms for k, v in lat.items()},
               "speedup_network": lat["fp32 network"].median_ms / lat["int8 network"].median_ms,
               "speedup_end_to_end": lat["fp32 end to end"].median_ms / lat["int8 end to end"].median_ms,
               "repeats": args.repeats, "load_after": load_average()}
        rows.append(row)
        print(f"  size: fp32 {row['fp32_mb']:.2f} MB, int8 {row['int8_mb']:.2f} MB ({100 * row['size_ratio']:.1f} %)")
        for k, v in lat.items():
            print(f"  {k:16s} median {v.median_ms:8.1f} ms  p90 {v.p90_ms:8.1f} ms")
        print(f"  speed-up int8/fp32: network {row['speedup_network']:.2f}×, end to end "
              f"{row['speedup_end_to_end']:.2f}× (load {load_average()})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
