"""EfficientNet-Lite1 (pretrained, a depthwise model qdet has no adapter for) through the generic path.

1000-way top-1 on the bundled Imagenette val images, split by a seeded permutation into two
disjoint halves: `--calib-images` images of half A calibrate, all of half B evaluate. Rows: float
(PyTorch), qdet's default PTQ (`qdet.quantize(model, batches)` — no adapter, default QuantConfig)
as fake-quant and on OpenVINO's int8 kernels, and — when `nncf` is importable in this environment
(it is not a qdet dependency) — NNCF's default `nncf.quantize` on the same calibration images,
converted to OpenVINO. Preprocessing of the Lite family: resize to 240, (x − 0.5) / 0.5.

    python benchmarks/efficientnet_lite_ptq.py --calib-images 300 --threads 2 --json runs/lite1.json
    /tmp/nncf-venv/bin/python benchmarks/efficientnet_lite_ptq.py --observers histogram,mean_minmax --plain \
        --no-fake-quant --json runs/lite1_all.json   # NNCF's rows too, from a venv that has nncf

Every row after the float one also gives its fidelity to the float model on the same images:
top-1 agreement, logit MSE and KL(float ‖ int8).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

import qdet
from qdet.data.folders import imagenette_folder, make_loader
from qdet.fileio import write_text_atomically
from qdet.models.efficientnet_lite import efficientnet_lite
from qdet.paths import assets_dir
from qdet.report.table import format_table


def pretrained_lite1(weights: str) -> torch.nn.Module:
    model = efficientnet_lite("lite1")
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def imagenette_halves(seed: int) -> tuple[torch.utils.data.Dataset, list[int], list[int]]:
    """Imagenette val with the Lite preprocessing, split by a seeded permutation into halves A and B."""
    data = imagenette_folder(resize=240, crop=240, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    return data, order[: len(order) // 2], order[len(order) // 2:]


def logits_and_labels(fn, loader) -> tuple[torch.Tensor, torch.Tensor]:
    outs, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            outs.append(torch.as_tensor(fn(x)).float())
            labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


def top1(fn, loader) -> float:
    return accuracy(*logits_and_labels(fn, loader))


def fidelity(logits: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """How close int8 logits are to the float model's on the same images: top-1 agreement (%),
    logit MSE and KL(float ‖ int8). On ~2,000 images a top-1 difference of 10 images is noise;
    these move far less from image to image."""
    kl = torch.nn.functional.kl_div(logits.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean")
    return {"agree_float": round(100.0 * float((logits.argmax(1) == ref.argmax(1)).float().mean()), 2),
            "logit_mse": round(float(((logits - ref) ** 2).mean()), 4), "kl": round(float(kl), 4)}


def nncf_openvino(model: torch.nn.Module, calib_loader, example: torch.Tensor, bias_correction: bool = True,
                  overflow_fix: str | None = None):
    """NNCF's default PTQ (its own defaults: mean-of-per-sample min/max ranges, fast bias correction, overflow
    fix on the first layer only) compiled by OpenVINO; `bias_correction=False` switches its fast bias
    correction off, `overflow_fix` ("enable", "first_layer_only", "disable") sets NNCF's OverflowFix."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    dataset = nncf.Dataset(calib_loader, lambda batch: batch[0])  # one image per item: subset_size counts images
    params = {} if bias_correction else {"disable_bias_correction": True}
    if overflow_fix is not None:
        params["overflow_fix"] = OverflowFix(overflow_fix)
    extra = {"advanced_parameters": AdvancedQuantizationParameters(**params)} if params else {}
    quantized = nncf.quantize(model, dataset, subset_size=len(calib_loader.dataset), **extra)
    ov_model = ov.convert_model(quantized, example_input=example)
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
    return lambda x: torch.from_numpy(compiled(x.numpy())[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(assets_dir() / "weights" / "efficientnet_lite1_imagenet.pth"))
    ap.add_argument("--calib-images", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-nncf", action="store_true", help="skip NNCF even when it is installed")
    ap.add_argument("--no-qdet", action="store_true", help="measure only the float and NNCF rows")
    ap.add_argument("--no-float", action="store_true", help="skip the float row (d_top1 is then vs the first row)")
    ap.add_argument("--observers", default=qdet.QuantConfig().activations.observer.value,
                    help="comma-separated activation observers, one qdet row each (default: qdet's default)")
    ap.add_argument("--plain", action="store_true",
                    help="also measure each observer without bias correction (PTQAlgorithms(bias_correction=None)), "
                         "and NNCF without its fast bias correction")
    ap.add_argument("--no-fake-quant", action="store_true",
                    help="skip the (slow) fake-quant row; the OpenVINO int8 row is still measured")
    ap.add_argument("--overflow-fix", default="auto",
                    help="comma-separated qdet.OverflowFix values (auto, none, first_layer, all), one qdet row set "
                         "each: 7-bit weights where int8 kernels saturate (x86 without VNNI; default: auto)")
    ap.add_argument("--nncf-overflow-fix", metavar="MODE",
                    help="also an NNCF row with its OverflowFix MODE (enable, first_layer_only, disable)")
    ap.add_argument("--json", help="write the rows to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = pretrained_lite1(args.weights)
    data, half_a, half_b = imagenette_halves(args.seed)
    calib = Subset(data, half_a[: args.calib_images])
    evaluation = make_loader(Subset(data, half_b), 64)
    print(f"calibration: {len(calib)} images of half A ({len(half_a)}); evaluation: all {len(half_b)} of half B; "
          f"seed {args.seed}; {args.threads} threads; {platform.processor() or platform.machine()}")

    rows = []
    reference: list[torch.Tensor] = []  # the float logits, once measured

    def row(name: str, fn, started: float) -> None:
        logits, labels = logits_and_labels(fn, evaluation)
        acc = accuracy(logits, labels)
        if not reference and name.startswith("float"):
            reference.append(logits)
        rows.append({"model": name, "top1": round(acc, 2), "d_top1": round(acc - rows[0]["top1"], 2) if rows else 0.0,
                     **(fidelity(logits, reference[0]) if reference else {}),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(format_table(rows[-1:]))

    if not args.no_float:
        t = time.perf_counter()
        row("float (PyTorch)", model, t)
    bc_variants = [("", qdet.PTQAlgorithms())] + ([(", no bias correction", qdet.PTQAlgorithms(bias_correction=None))]
                                                 if args.plain else [])
    fixes = args.overflow_fix.split(",")
    for observer, fix in [] if args.no_qdet else [(o, f) for o in args.observers.split(",") for f in fixes]:
        for label, ptq in bc_variants:
            t = time.perf_counter()
            cfg = qdet.QuantConfig(activations=qdet.Observer(observer), ptq=ptq, overflow_fix=fix)
            qm = qdet.quantize(model, make_loader(calib, 32), cfg)  # no adapter: the generic path
            print(qdet.coverage(qm).table())
            weights = f", overflow fix {fix}" + (f" = {qm.config.overflow_fix.value}" if fix == "auto" else "")
            name = (f"qdet int8, {observer}{label}{weights if len(fixes) > 1 or fix != 'auto' else ''}"
                    + (" (default)" if cfg == qdet.QuantConfig() else ""))
            if not args.no_fake_quant:
                row(f"{name} (fake-quant)", qm, t)
            t = time.perf_counter()
            row(f"{name} (OpenVINO)", qdet.lower(qm, "openvino", threads=args.threads), t)
    if not args.no_nncf:
        try:
            import nncf  # noqa: F401
        except ImportError:
            print("nncf is not installed here: its row is not measured")
        else:
            for bias_correction in (True, False) if args.plain else (True,):
                t = time.perf_counter()
                fn = nncf_openvino(model, make_loader(calib, 1), torch.zeros(1, 3, 240, 240), bias_correction)
                row("NNCF default int8 (OpenVINO)" if bias_correction else "NNCF, no bias correction (OpenVINO)", fn, t)
            if args.nncf_overflow_fix:
                t = time.perf_counter()
                fn = nncf_openvino(model, make_loader(calib, 1), torch.zeros(1, 3, 240, 240),
                                   overflow_fix=args.nncf_overflow_fix)
                row(f"NNCF, overflow fix {args.nncf_overflow_fix} (OpenVINO)", fn, t)
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.json, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
