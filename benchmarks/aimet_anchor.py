"""AIMET's PTQ on CIFAR ResNet20 beside qdet's (benchmarks/ptq_algorithms.py): same model, same
calibration images, same bit widths. Runs in AIMET's own environment, never a qdet dependency:

    python -m venv --system-site-packages /tmp/aimet-venv && /tmp/aimet-venv/bin/pip install aimet-torch
    PYTHONPATH=src /tmp/aimet-venv/bin/python benchmarks/aimet_anchor.py --bits 4 --calib-images 1024 \\
        --adaround-iters 300 --json runs/aimet_resnet20.json

(qdet is used only to build the model and load the images.) aimet-torch 2.42.0 installs there on
top of torch 2.14.1 without changing it (checked with `pip install --dry-run`). Rows: plain QuantSim
(round-to-nearest; BN folded; weights symmetric per channel via AIMET's default_config_per_channel,
activations 8-bit, quant scheme --scheme), +CLE (`equalize_model`: BN fold, CLE, high-bias fold),
+AdaRound (`Adaround.apply_adaround`, --adaround-iters per layer, then QuantSim with the frozen
AdaRound parameter encodings). Top-1 on all 10,000 CIFAR-10 test images and on the held-out rest.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch
from cifar_observers import held_out_mask, predict, top1
from torch.utils.data import DataLoader

from qdet import api
from qdet.data.folders import seeded_subset


def main() -> None:
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.cross_layer_equalization import equalize_model
    from aimet_torch.model_preparer import prepare_model
    from aimet_torch.quantsim import QuantizationSimModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--calib-images", type=int, default=1024)
    ap.add_argument("--adaround-iters", type=int, default=300)
    ap.add_argument("--scheme", default="tf_enhanced", choices=["tf", "tf_enhanced"])
    ap.add_argument("--methods", default="plain,cle,adaround")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-images", type=int, help="evaluate on the first N test images only (a smoke run)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    adapter = api.get_adapter(args.model)
    float_model = adapter.build().eval()
    data = adapter.eval_dataset()
    calib = seeded_subset(data, args.calib_images, seed=args.seed)
    held = held_out_mask(len(data), calib)
    if args.eval_images:
        data, held = torch.utils.data.Subset(data, range(args.eval_images)), held[: args.eval_images]
    dummy = torch.zeros(1, 3, 32, 32)
    config = os.path.join(os.path.dirname(__import__("aimet_torch").__file__), "common", "quantsim_config",
                          "default_config_per_channel.json")
    scheme = QuantScheme.post_training_tf_enhanced if args.scheme == "tf_enhanced" else QuantScheme.post_training_tf
    images_only = DataLoader([calib[i][0] for i in range(len(calib))], batch_size=32)

    def calibrate(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for x in images_only:
                model(x)

    f_pred, labels = predict(float_model, data)
    f_all = top1(f_pred, labels)
    rows = [{"weights": "float", "method": "-", "top1": f_all, "top1_held_out": top1(f_pred, labels, held)}]
    print(rows[-1], flush=True)
    for bits in args.bits:
        plain = None
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            # AIMET's model preparer (torch.fx) turns the option-A shortcut module into ops QuantSim knows
            model = prepare_model(copy.deepcopy(float_model))
            encodings = None
            if method == "cle":
                equalize_model(model, dummy_input=dummy)  # folds BN, equalizes, absorbs high biases
            else:
                fold_all_batch_norms(model, input_shapes=(1, 3, 32, 32), dummy_input=dummy)
            if method == "adaround":
                tmp = tempfile.mkdtemp()
                params = AdaroundParameters(data_loader=images_only, num_batches=len(images_only),
                                            default_num_iterations=args.adaround_iters)
                model = Adaround.apply_adaround(model, dummy, params, path=tmp, filename_prefix="ada",
                                                default_param_bw=bits, default_quant_scheme=scheme,
                                                default_config_file=config)
                encodings = os.path.join(tmp, "ada.encodings")
            sim = QuantizationSimModel(model, dummy_input=dummy, quant_scheme=scheme, default_output_bw=8,
                                       default_param_bw=bits, config_file=config)
            if encodings is not None:
                sim.set_and_freeze_param_encodings(encodings)
            sim.compute_encodings(calibrate)
            seconds = time.perf_counter() - t0
            pred, _ = predict(sim.model, data)
            acc = top1(pred, labels)
            if method == "plain":
                plain = acc
            drop = f_all - plain if plain is not None else None
            rows.append({"weights": f"int{bits} per-channel", "method": f"AIMET {method}", "top1": acc,
                         "top1_held_out": top1(pred, labels, held), "drop": f_all - acc,
                         "recovered_pct": 100.0 * (acc - plain) / drop if drop and method != "plain" else None,
                         "quantize_s": seconds})
            print(rows[-1], flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
