"""AIMET's PTQ beside qdet's (benchmarks/ptq_algorithms.py): same model, same calibration images, same
bit widths. Runs in AIMET's own environment, never a qdet dependency:

    python -m venv --system-site-packages /tmp/aimet-venv && /tmp/aimet-venv/bin/pip install aimet-torch
    PYTHONPATH=src /tmp/aimet-venv/bin/python benchmarks/aimet_anchor.py --bits 4 --calib-images 1024 \\
        --adaround-iters 300 --json runs/aimet_resnet20.json

(qdet is used only to build the model and load the images.) aimet-torch 2.42.0 installs there on
top of torch 2.14.1 without changing it (checked with `pip install --dry-run`). Rows: plain QuantSim
(round-to-nearest; BN folded; weights symmetric per channel via AIMET's default_config_per_channel,
activations 8-bit, quant scheme --scheme), +CLE (`equalize_model`: BN fold, CLE, high-bias fold),
+AdaRound (`Adaround.apply_adaround`, --adaround-iters per layer, then QuantSim with the frozen
AdaRound parameter encodings). Top-1 on all 10,000 CIFAR-10 test images and on the held-out rest.

`--model efficientnet_lite1`: the pretrained Lite1 and the seeded imagenette halves of
benchmarks/efficientnet_lite_ptq.py (--calib-images of half A, top-1 on all of half B); --weights
int8_pt (AIMET's default_config.json: per-tensor) and/or int4_pc (default_config_per_channel.json).
Methods plain, cle, cle_relu6, adaround, cle_relu6+adaround: AIMET 2.4+ no longer turns ReLU6 into
ReLU before CLE (it warns and asks the user to), so `cle` equalizes nothing on this model and
`cle_relu6` replaces every nn.ReLU6 by nn.ReLU first, as AIMET recommends.

    PYTHONPATH=src /tmp/aimet-venv/bin/python benchmarks/aimet_anchor.py --model efficientnet_lite1 \
        --weights int8_pt --calib-images 300 --methods plain,cle_relu6,adaround --adaround-iters 200 \
        --adaround-images 128
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
from qdet.paths import assets_dir


def _config(name: str) -> str:
    return os.path.join(os.path.dirname(__import__("aimet_torch").__file__), "common", "quantsim_config", name)


def _relu6_to_relu(model: torch.nn.Module) -> None:
    """Every nn.ReLU6 module becomes nn.ReLU (what AIMET < 2.4 did inside equalize_model)."""
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.ReLU6):
                setattr(mod, child_name, torch.nn.ReLU())


def aimet_sim(float_model: torch.nn.Module, method: str, bits: int, dummy: torch.Tensor, images: DataLoader,
              adaround_images: DataLoader, iterations: int, scheme, config: str) -> torch.nn.Module:
    """One AIMET PTQ run: method = plain | cle | cle_relu6 | adaround | cle_relu6+adaround. Returns
    the calibrated QuantSim model (fake-quant)."""
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.cross_layer_equalization import equalize_model
    from aimet_torch.model_preparer import prepare_model
    from aimet_torch.quantsim import QuantizationSimModel

    parts = set(method.split("+"))
    base = copy.deepcopy(float_model)
    if "cle_relu6" in parts:
        _relu6_to_relu(base)
    # AIMET's model preparer (torch.fx) turns functional ops and shortcut modules into ops QuantSim knows
    model = prepare_model(base)
    encodings = None
    if parts & {"cle", "cle_relu6"}:
        equalize_model(model, dummy_input=dummy)  # folds BN, equalizes, absorbs high biases
    else:
        fold_all_batch_norms(model, input_shapes=tuple(dummy.shape), dummy_input=dummy)
    if "adaround" in parts:
        tmp = tempfile.mkdtemp()
        params = AdaroundParameters(data_loader=adaround_images, num_batches=len(adaround_images),
                                    default_num_iterations=iterations)
        model = Adaround.apply_adaround(model, dummy, params, path=tmp, filename_prefix="ada",
                                        default_param_bw=bits, default_quant_scheme=scheme,
                                        default_config_file=config)
        encodings = os.path.join(tmp, "ada.encodings")
    sim = QuantizationSimModel(model, dummy_input=dummy, quant_scheme=scheme, default_output_bw=8,
                               default_param_bw=bits, config_file=config)
    if encodings is not None:
        sim.set_and_freeze_param_encodings(encodings)

    def calibrate(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for x in images:
                m(x)

    sim.compute_encodings(calibrate)
    return sim.model


def lite1_main(args: argparse.Namespace) -> None:
    import platform

    from efficientnet_lite_ptq import imagenette_halves, pretrained_lite1
    from efficientnet_lite_ptq import top1 as loader_top1
    from torch.utils.data import Subset

    from qdet.data.folders import make_loader

    from aimet_torch.common.defs import QuantScheme

    scheme = QuantScheme.post_training_tf_enhanced if args.scheme == "tf_enhanced" else QuantScheme.post_training_tf
    model = pretrained_lite1(str(assets_dir() / "weights" / "efficientnet_lite1_imagenet.pth"))
    data, half_a, half_b = imagenette_halves(args.seed)
    calib = [data[i][0] for i in half_a[: args.calib_images]]
    images = DataLoader(calib, batch_size=32)
    adaround_images = DataLoader(calib[: args.adaround_images], batch_size=32)
    half_b = half_b[: args.eval_images] if args.eval_images else half_b
    evaluation = make_loader(Subset(data, half_b), 64)
    dummy = torch.zeros(1, 3, 240, 240)
    print(f"AIMET on EfficientNet-Lite1: calibration {len(calib)} images of half A (AdaRound: the first "
          f"{args.adaround_images}), evaluation all {len(half_b)} of half B, seed {args.seed}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}", flush=True)
    rows = [{"weights": "float", "method": "-", "top1": loader_top1(model, evaluation)}]
    print(rows[-1], flush=True)
    kinds = {"int8_pt": (8, "default_config.json", "int8 per-tensor"),
             "int4_pc": (4, "default_config_per_channel.json", "int4 per-channel")}
    for kind in args.weights:
        bits, config, label = kinds[kind]
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            sim = aimet_sim(model, method, bits, dummy, images, adaround_images, args.adaround_iters, scheme,
                            _config(config))
            seconds = time.perf_counter() - t0
            acc = loader_top1(sim, evaluation)
            rows.append({"weights": label, "method": f"AIMET {method}", "top1": acc, "d_top1": acc - rows[0]["top1"],
                         "quantize_s": seconds})
            print(rows[-1], flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


def main() -> None:
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
    ap.add_argument("--weights", nargs="+", default=["int8_pt"], choices=["int8_pt", "int4_pc"],
                    help="efficientnet_lite1 only")
    ap.add_argument("--adaround-images", type=int, default=128, help="efficientnet_lite1 only")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.model == "efficientnet_lite1":
        return lite1_main(args)
    adapter = api.get_adapter(args.model)
    float_model = adapter.build().eval()
    data = adapter.eval_dataset()
    calib = seeded_subset(data, args.calib_images, seed=args.seed)
    held = held_out_mask(len(data), calib)
    if args.eval_images:
        data, held = torch.utils.data.Subset(data, range(args.eval_images)), held[: args.eval_images]
    dummy = torch.zeros(1, 3, 32, 32)
    from aimet_torch.common.defs import QuantScheme

    scheme = QuantScheme.post_training_tf_enhanced if args.scheme == "tf_enhanced" else QuantScheme.post_training_tf
    images_only = DataLoader([calib[i][0] for i in range(len(calib))], batch_size=32)
    f_pred, labels = predict(float_model, data)
    f_all = top1(f_pred, labels)
    rows = [{"weights": "float", "method": "-", "top1": f_all, "top1_held_out": top1(f_pred, labels, held)}]
    print(rows[-1], flush=True)
    for bits in args.bits:
        plain = None
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            sim_model = aimet_sim(float_model, method, bits, dummy, images_only, images_only, args.adaround_iters,
                                  scheme, _config("default_config_per_channel.json"))
            seconds = time.perf_counter() - t0
            pred, _ = predict(sim_model, data)
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
