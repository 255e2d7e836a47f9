"""Post-training algorithms side by side: plain PTQ vs +CLE vs +bias correction vs +AdaRound.

CIFAR-10 (`--model resnet20`, any registered CIFAR adapter): calibration on --calib-images seeded
images of the CIFAR-10 test folder (the only CIFAR images bundled; no labels are used), top-1 on
all 10,000 test images and on the held-out rest. Weights: --bits per-channel symmetric (narrow
range); activations uint8 per tensor (histogram observer). Top-1 is the fake-quant reference (the
runtimes would run 4/3-bit weights as int8 codes: the same numbers, no int4 speed). recovered_pct: share of the plain-PTQ drop won back.

    python benchmarks/ptq_algorithms.py --model resnet20 --bits 4 3 --calib-images 1024 --json runs/ptq_resnet20.json

EfficientNet-Lite1 (`--model efficientnet_lite1`, pretrained, depthwise, ReLU6): the halves of
`benchmarks/efficientnet_lite_ptq.py` (seeded permutation of imagenette/val: --calib-images of half
A calibrate, all of half B evaluate, 1000-way top-1). --weights-kinds: int8_pc (qdet's default,
per-channel), int8_pt (per-tensor), int4_pc; every row runs on OpenVINO's int8 kernels (4-bit weights as
int8 codes in [-7, 7]; 8-bit ones 7-bit where the CPU's int8 kernels saturate, `OverflowFix.AUTO`).

    python benchmarks/ptq_algorithms.py --model efficientnet_lite1 --calib-images 300 --threads 2 \
        --weights-kinds int8_pc int8_pt int4_pc --methods plain,bc,bc_analytic --layerwise-images 128 \
        --json runs/ptq_lite1.json

Methods (comma-separated --methods): plain, cle, cle_relu6 (CLE after ReLU6 → ReLU between convs;
Lite1 then also gets a float row of that changed model, quantizers off), bc (empirical bias
correction), bc_analytic (BN-statistics bias correction), bc_float, adaround, cle+adaround+bc, ...
any '+' combination.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from cifar_observers import held_out_mask, predict, top1

from qdet import api
from qdet.config import (
    AdaRound,
    BiasCorrection,
    BiasCorrectionMode,
    PerTensor,
    PTQAlgorithms,
    QuantConfig,
    default_weight_spec,
)
from qdet.data.folders import make_loader, seeded_subset
from qdet.fileio import write_text_atomically
from qdet.paths import assets_dir
from qdet.report.table import format_table


def algorithms(method: str, iterations: int, seed: int, images: int = 1024) -> PTQAlgorithms:
    """'cle+adaround+bc' → PTQAlgorithms(...); 'plain' → none (no bias correction either);
    bc = empirical, bc_analytic = from BN statistics, bc_float = float input means (qdet's default);
    cle_relu6 = cle with ReLU6 between convs replaced by ReLU."""
    parts = set(method.split("+")) - {"plain"}
    unknown = parts - {"cle", "cle_relu6", "bc", "bc_analytic", "bc_float", "adaround"}
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; use plain, cle, cle_relu6, bc, bc_analytic, "
                         "bc_float, adaround joined by +")
    bc = (BiasCorrection(max_images=images) if "bc" in parts else
          BiasCorrection(BiasCorrectionMode.ANALYTIC) if "bc_analytic" in parts else
          BiasCorrection(BiasCorrectionMode.FLOAT_MEANS) if "bc_float" in parts else None)
    return PTQAlgorithms(cle=bool(parts & {"cle", "cle_relu6"}), relu6_to_relu="cle_relu6" in parts,
                         bias_correction=bc,
                         adaround=AdaRound(iterations=iterations, seed=seed, max_images=images)
                         if "adaround" in parts else None)


WEIGHT_KINDS = {
    "int8_pc": ("int8 per-channel", lambda: default_weight_spec()),
    "int8_pt": ("int8 per-tensor", lambda: default_weight_spec(PerTensor())),
    "int4_pc": ("int4 per-channel", lambda: default_weight_spec(bits=4)),
}


def lite1_main(args: argparse.Namespace) -> None:
    """EfficientNet-Lite1 rows: float, then each weight kind × method (int8 on OpenVINO)."""
    import platform

    from efficientnet_lite_ptq import imagenette_halves, pretrained_lite1
    from efficientnet_lite_ptq import top1 as loader_top1
    from torch.utils.data import Subset

    model = pretrained_lite1(args.weights)
    data, half_a, half_b = imagenette_halves(args.seed)
    calib = Subset(data, half_a[: args.calib_images])
    evaluation = make_loader(Subset(data, half_b), 64)
    print(f"calibration: {len(calib)} images of half A; evaluation: all {len(half_b)} of half B; seed {args.seed}; "
          f"{args.threads} threads; {platform.processor() or platform.machine()}", flush=True)
    rows = [{"weights": "float", "method": "-", "runtime": "PyTorch", "top1": loader_top1(model, evaluation)}]
    print(rows[-1], flush=True)
    if "cle_relu6" in args.methods:  # the float model those rows start from: ReLU6 → ReLU, then exact CLE
        from qdet.quant.calibrate import quantization_disabled

        changed = api.quantize(model, make_loader(Subset(calib, range(8)), 8), QuantConfig(
            ptq=PTQAlgorithms(cle=True, relu6_to_relu=True, bias_correction=None)), progress=False)
        with quantization_disabled(changed):
            rows.append({"weights": "float", "method": "cle_relu6 (quantizers off)", "runtime": "PyTorch",
                         "top1": loader_top1(changed, evaluation)})
        rows[-1]["d_top1"] = rows[-1]["top1"] - rows[0]["top1"]
        print(rows[-1], flush=True)
    for kind in args.weights_kinds:
        label, spec = WEIGHT_KINDS[kind]
        for method in args.methods.split(","):
            cfg = QuantConfig(weights=spec(), ptq=algorithms(method, args.adaround_iters, args.seed,
                                                             args.layerwise_images))
            t0 = time.perf_counter()
            qm = api.quantize(model, make_loader(calib, 32), cfg, progress=False)
            seconds = time.perf_counter() - t0
            runner = api.lower(qm, "openvino", threads=args.threads)  # 4-bit codes run as int8 codes
            acc = loader_top1(runner, evaluation)
            rows.append({"weights": label, "method": method, "runtime": "OpenVINO",
                         "overflow_fix": qm.config.overflow_fix.value,
                         "top1": acc, "d_top1": acc - rows[0]["top1"], "quantize_s": seconds})
            print(rows[-1], flush=True)
    print(f"\nEfficientNet-Lite1, 1000-way top-1 on {len(half_b)} imagenette/val images (half B, seed {args.seed}); "
          f"calibration {len(calib)} images of half A; activations uint8 per tensor; {args.threads} threads")
    print(format_table(rows, ["weights", "method", "runtime", "overflow_fix", "top1", "d_top1", "quantize_s"]))
    if args.json:
        write_text_atomically(args.json, json.dumps(rows, indent=1, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--methods", default="plain,cle,bc,bc_analytic,adaround,adaround+bc,cle+adaround+bc")
    ap.add_argument("--calib-images", type=int, default=1024)
    ap.add_argument("--adaround-iters", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights-kinds", nargs="+", default=["int8_pc", "int8_pt", "int4_pc"],
                    choices=sorted(WEIGHT_KINDS), help="efficientnet_lite1 only")
    ap.add_argument("--weights", default=str(assets_dir() / "weights" / "efficientnet_lite1_imagenet.pth"),
                    help="efficientnet_lite1 only: the pretrained weights")
    ap.add_argument("--layerwise-images", type=int, default=1024,
                    help="calibration images the AdaRound / empirical bias-correction pass keeps activations of "
                         "(memory: three streams of every image's activations at the widest cut of the graph)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "efficientnet_lite1":
        return lite1_main(args)
    adapter = api.get_adapter(args.model)
    model = adapter.build()
    data = adapter.eval_dataset()
    calib = seeded_subset(data, args.calib_images, seed=args.seed)
    held = held_out_mask(len(data), calib)
    f_pred, labels = predict(model, data)
    f_all = top1(f_pred, labels)
    rows = [{"weights": "float", "method": "-", "top1": f_all, "top1_held_out": top1(f_pred, labels, held)}]
    print(rows[-1], flush=True)
    for bits in args.bits:
        plain_top1 = None
        for method in args.methods.split(","):
            cfg = QuantConfig(weights=default_weight_spec(bits=bits), ptq=algorithms(method, args.adaround_iters,
                                                                                      args.seed))
            t0 = time.perf_counter()
            qm = api.quantize(model, make_loader(calib, 32), cfg, adapter=adapter, progress=False)
            seconds = time.perf_counter() - t0
            pred, _ = predict(qm, data)
            q_all = top1(pred, labels)
            if method == "plain":
                plain_top1 = q_all
            drop = f_all - plain_top1 if plain_top1 is not None else None
            rows.append({"weights": f"int{bits} per-channel", "method": method, "top1": q_all,
                         "top1_held_out": top1(pred, labels, held), "drop": f_all - q_all,
                         "recovered_pct": (100.0 * (q_all - plain_top1) / drop
                                           if drop and drop > 0 and method != "plain" else None),
                         "quantize_s": seconds})
            print(rows[-1], flush=True)
    print(f"\n{args.model}, CIFAR-10 test (10,000 images); calibration: {args.calib_images} seeded test images "
          f"(seed {args.seed}, labels unused); top1_held_out: the {len(data) - args.calib_images} others; "
          f"activations uint8 per tensor; fake-quant reference; AdaRound {args.adaround_iters} iterations per layer; "
          f"{args.threads} thread(s)")
    print(format_table(rows, ["weights", "method", "top1", "top1_held_out", "drop", "recovered_pct", "quantize_s"]))
    if args.json:
        write_text_atomically(args.json, json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
