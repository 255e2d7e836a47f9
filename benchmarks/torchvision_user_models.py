"""torchvision classifiers as "user models": no adapter, qdet's generic path, OpenVINO int8 vs fp32.

Issue 13: mobilenet_v3_large, efficientnet_b0, regnet_y_400mf, resnext50_32x4d and convnext_tiny are
quantized as a user would, `qdet.quantize(model, batches, cfg)` with no adapter. For each model it
prints qdet's coverage report (conv/linear layers and share of their MACs in int8, BatchNorms
folded, what stayed float and why), what OpenVINO's compiled model really executes in int8 (its
runtime precision per conv/matmul node), the int8-vs-fp32 SQNR of the logits on held-out images,
and then fp32 vs int8 latency on OpenVINO: batch 1, `--threads` threads, every model's fp32 and int8
timed round-robin in one run (each round calls each of them once, in a shuffled order), with the
ratios, the CPU (lscpu model name, VNNI/AMX flags) and the load average at start and end.

Weights are RANDOM (torchvision's architectures, `weights=None`, seeded); no pretrained weights are
downloaded. Calibration uses REAL images: a seeded subset of `../shared/assets/imagenette/val`
(ImageNet preprocessing, 224x224); the BatchNorm statistics of the random models are first set from
those calibration images (cumulative average, train-mode forward), so activations have realistic
ranges instead of the untrained 0/1 defaults. The SQNR images are a disjoint seeded subset.
Accuracy is not measured (random weights); speed and coverage do not depend on the weights' values.
The int8 SQNR of a random-weight network is low (random deep nets amplify any perturbation with
depth), so a control is printed next to it: the float model's logits SQNR when only its input gets
Gaussian noise at 40 dB.

    python benchmarks/torchvision_user_models.py --repeats 30 --threads 2
    python benchmarks/torchvision_user_models.py --models convnext_tiny --repeats 2   # correctness only
    python benchmarks/torchvision_user_models.py --silu decomposed --onnxruntime --repeats 2  # + onnxruntime counts
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from typing import Any, Callable

import torch
import torchvision

import qdet
from qdet.bench.latency import interleaved_times, torch_threads
from qdet.bench.machine import cpu_info, isa_summary, load_average
from qdet.data.folders import imagenette_folder, make_loader, seeded_split

MODELS = ("mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "resnext50_32x4d", "convnext_tiny")
NOISE_DB = 40.0  # input-noise control: about one int8 quantization step's worth of noise


def cpu_line() -> str:
    """lscpu's model name and the int8/bf16 instruction-set flags the CPU reports."""
    cpu = cpu_info()
    return f"{cpu.model}; flags: {isa_summary(cpu)}"


def set_bn_statistics(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """BatchNorm running mean/var of a randomly initialised model from real images (cumulative average)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    err = float((ref - out).double().pow(2).mean())
    return 10 * math.log10(float(ref.double().pow(2).mean()) / max(err, 1e-30))


def input_noise_control(model: torch.nn.Module, x: torch.Tensor, snr_db: float) -> float:
    """Logits SQNR of the FLOAT model when its input alone gets Gaussian noise at `snr_db`: how much a
    random-weight network amplifies a small perturbation (the yardstick for the int8 SQNR)."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    noise *= x.norm() / noise.norm() / 10 ** (snr_db / 20)
    with torch.no_grad():
        return sqnr_db(model(x), model(x + noise))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--repeats", type=int, default=30, help="timing rounds (each calls every model once)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--sqnr-images", type=int, default=16)
    ap.add_argument("--silu", choices=("fused", "decomposed"), default="fused",
                    help="QuantConfig.fuse_silu (fused: what `qdet quantize --runtime openvino` uses)")
    ap.add_argument("--onnxruntime", action="store_true",
                    help="also lower to onnxruntime and print its int8 conv/matmul count (untimed; with --silu "
                         "fused the convs before SiLU run float there: onnxruntime has no int8 conv+SiLU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")

    print(f"CPU: {cpu_line()}")
    print(f"load average at start: {load_average()}; {args.threads} threads, batch 1; weights RANDOM (seed {args.seed}), "
          f"calibration: {args.calib_images} real imagenette/val images, SQNR: {args.sqnr_images} disjoint ones")
    data = imagenette_folder(resize=None)  # the bundled images are 224x224 already
    calib_set, rest = seeded_split(data, args.calib_images, seed=args.seed)
    calib = [x for x, _ in make_loader(calib_set, 16)]
    held_out = torch.stack([rest[i][0] for i in range(min(args.sqnr_images, len(rest)))])
    cfg = qdet.QuantConfig(fuse_silu=args.silu == "fused")

    rows: list[dict[str, Any]] = []
    fns: dict[str, Callable[[], Any]] = {}
    x1 = held_out[:1]
    for name in args.models:
        torch.manual_seed(args.seed)
        model = getattr(torchvision.models, name)(weights=None).eval()
        set_bn_statistics(model, calib)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            qm = qdet.quantize(model, calib, cfg, progress=False)
        quant_s = time.perf_counter() - t0
        int8 = qdet.lower(qm, "openvino", threads=args.threads)
        fp32 = qdet.lower(qm, "openvino", quantized=False, threads=args.threads)
        with torch.no_grad(), torch_threads(args.threads):
            ref, out, out_f = model(held_out), int8(held_out), fp32(held_out)
        cov = qdet.coverage(qm, lowered=int8)
        rc = cov.runtime["openvino"]
        if args.onnxruntime:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the fused-SiLU warning; the count below says it
                cov.add_runtime(qdet.lower(qm, "onnxruntime", threads=args.threads))
        print(f"\n== {name} (random weights): quantized in {quant_s:.0f} s")
        print(cov.table())
        for w in caught:
            if "MACs are int8" in str(w.message):
                print(f"  warning: {w.message}")
        with torch_threads(args.threads):
            control = input_noise_control(model, held_out, NOISE_DB)
        print(f"  logits SQNR vs float eager: int8 OpenVINO {sqnr_db(ref, out):.1f} dB, fp32 OpenVINO "
              f"{sqnr_db(ref, out_f):.1f} dB ({len(held_out)} held-out images); control: float model with "
              f"{NOISE_DB:.0f} dB noise on its input only: {control:.1f} dB")
        rows.append({"model": name, "conv_linear_layers": cov.int8_layers + cov.float_layers,
                     "int8_layers": cov.int8_layers, "int8_mac_share": round(cov.int8_mac_share, 4),
                     "total_gmacs": round(cov.total_macs / 1e9, 3), "folded_bn": cov.folded_batchnorms,
                     "unfolded_bn": len(cov.unfolded_batchnorms), "openvino": rc.as_dict(),
                     "onnxruntime": cov.runtime["onnxruntime"].as_dict() if "onnxruntime" in cov.runtime else None,
                     "sqnr_int8_db": round(sqnr_db(ref, out), 2), "sqnr_fp32_ov_db": round(sqnr_db(ref, out_f), 2),
                     "sqnr_input_noise_control_db": round(control, 2),
                     "kept_float": [f.__dict__ for f in cov.kept_float]})
        fns[f"{name} fp32"] = lambda f=fp32: f(x1)
        fns[f"{name} int8"] = lambda f=int8: f(x1)

    print(f"\ntiming: batch 1, {args.threads} threads, {args.repeats} round-robin rounds over {len(fns)} "
          f"models (load average {load_average()})")
    start_load = load_average()
    times = interleaved_times(fns, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                              shuffle_seed=args.seed, progress=True, desc="timing (rounds)")
    end_load = load_average()
    print(f"load average: {start_load} (start of timing) -> {end_load} (end)")
    print(f"\n{'model':20s} {'int8 MACs':>9s} {'OV int8 conv':>12s} {'OV int8 mm':>10s} {'SQNR dB':>7s} "
          f"{'fp32 ms':>8s} {'int8 ms':>8s} {'speed-up':>8s}")
    for row in rows:
        f_ms, q_ms = statistics.median(times[f"{row['model']} fp32"]), statistics.median(times[f"{row['model']} int8"])
        row.update(fp32_ms=round(f_ms, 2), int8_ms=round(q_ms, 2), speedup=round(f_ms / q_ms, 3))
        ov = row["openvino"]
        print(f"{row['model']:20s} {100 * row['int8_mac_share']:8.1f}% "
              f"{ov['int8_convs']:>5d}/{ov['int8_convs'] + ov['float_convs']:<6d} "
              f"{ov['int8_matmuls']:>4d}/{ov['int8_matmuls'] + ov['float_matmuls']:<5d} {row['sqnr_int8_db']:7.1f} "
              f"{f_ms:8.2f} {q_ms:8.2f} {f_ms / q_ms:7.2f}x")
    if args.repeats < 10:
        print(f"(only {args.repeats} timing rounds: a correctness run, the latencies mean nothing)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu": cpu_line(), "threads": args.threads, "repeats": args.repeats, "seed": args.seed,
                       "load_average": {"start": start_load, "end": end_load}, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
