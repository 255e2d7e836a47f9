"""8-bit vs 7-bit weights on the int8 runtimes of THIS CPU: what the int16 saturation of CPUs without VNNI costs.

x86 CPUs without AVX-512 VNNI / AVX-VNNI / AMX run int8 convolutions with vpmaddubsw, which adds
each pair of uint8×int8 products in int16 with saturation: with 8-bit weights the runtime's result
can differ from qdet's simulation. `QuantConfig(overflow_fix=...)` narrows weights to 7 bits (all
layers, or the first layer only, as NNCF's default does). This benchmark quantizes each model once
per overflow fix (same calibration images), then evaluates on the same images:

  * the simulation (`reference` runtime: fake-quant in float, no saturation: what qdet predicts),
  * each int8 runtime (onnxruntime, OpenVINO, torch/fbgemm),

and prints the task metric, its difference to float and to the simulation of the same model, and
for classifiers the share of images whose top-1 answer equals the simulation's. On a CPU with VNNI
the runtimes should match the simulation for every fix; on one without, 8-bit weights show how much
saturation costs there. Accuracy only: 7-bit weights run on the same int8 kernels (no speed change).

    python benchmarks/overflow_fix.py --models resnet20 resnet56 --runtimes onnxruntime openvino torch
    python benchmarks/overflow_fix.py --models yolov5n --runtimes openvino onnxruntime --calib-images 160
"""
from __future__ import annotations

import argparse
import json

import torch
from cifar_observers import predict

from qdet import api
from qdet.bench.latency import torch_threads
from qdet.bench.machine import cpu_info, int8_dot_saturates, isa_summary, load_average
from qdet.config import OverflowFix, QuantConfig
from qdet.fileio import write_text_atomically
from qdet.jobs import JobOptions, calibration_loader, headline_metrics
from qdet.models.base import Task
from qdet.report.table import format_table

FIXES = [OverflowFix.NONE, OverflowFix.FIRST_LAYER, OverflowFix.ALL]


def measure(adapter, fn, data, desc: str) -> tuple[float, torch.Tensor | None]:
    """(headline metric, top-1 answers or None for detectors)."""
    if adapter.task is Task.CLASSIFICATION:
        pred, labels = predict(fn, data)
        return 100.0 * float((pred == labels).float().mean()), pred
    res = api.evaluate(fn, adapter, data, progress=False, desc=desc)
    return next(iter(headline_metrics(res).values())), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet20"])
    ap.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino", "torch"])
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    cpu = cpu_info()
    print(f"CPU: {cpu.model}; flags: {isa_summary(cpu)}; int8 kernels saturate: {int8_dot_saturates()}; "
          f"threads {args.threads}; load {load_average()}", flush=True)
    rows: list[dict] = []
    for name in args.models:
        adapter = api.get_adapter(name)
        model = adapter.build()
        data = adapter.eval_dataset(None)
        opts = JobOptions(calib_images=args.calib_images, calib_batch=8, seed=args.seed, threads=args.threads)
        with torch_threads(args.threads):
            float_metric, _ = measure(adapter, model, data, "float")
        rows.append({"model": name, "weights": "float", "runs_on": "PyTorch", "metric": float_metric})
        print(rows[-1], flush=True)
        for fix in FIXES:
            cfg = QuantConfig(overflow_fix=fix, fuse_silu=False)
            with torch_threads(args.threads):
                qm = api.quantize(model, calibration_loader(adapter, opts), cfg, adapter=adapter, progress=False)
                sim_metric, sim_pred = measure(adapter, qm, data, "simulation")
            label = {OverflowFix.NONE: "8-bit", OverflowFix.FIRST_LAYER: "7-bit first layer",
                     OverflowFix.ALL: "7-bit all"}[fix]
            rows.append({"model": name, "weights": label, "runs_on": "simulation", "metric": sim_metric,
                         "d_float": sim_metric - float_metric})
            print(rows[-1], flush=True)
            for runtime in args.runtimes:
                lowered = api.lower(qm, runtime, threads=args.threads)
                with torch_threads(args.threads):
                    metric, pred = measure(adapter, lowered, data, runtime)
                row = {"model": name, "weights": label, "runs_on": runtime, "metric": metric,
                       "d_float": metric - float_metric, "d_simulation": metric - sim_metric}
                if pred is not None and sim_pred is not None:
                    row["agree_simulation"] = 100.0 * float((pred == sim_pred).float().mean())
                rows.append(row)
                print(rows[-1], flush=True)
    print(f"\nmetric: top-1 % (classifiers, whole evaluation set) or mAP50-95 points (detectors); calibration "
          f"{args.calib_images} seeded images (seed {args.seed}); agree_simulation: % of top-1 answers equal to "
          "the simulation's of the same model")
    print(format_table(rows, ["model", "weights", "runs_on", "metric", "d_float", "d_simulation", "agree_simulation"]))
    if args.json:
        write_text_atomically(args.json, json.dumps({"cpu": cpu.model, "saturates": int8_dot_saturates(),
                                                     "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
