"""EfficientNet-Lite1 (pretrained, a depthwise model qdet has no adapter for) through the generic path.

1000-way top-1 on the bundled Imagenette val images, split by a seeded permutation into two
disjoint halves: `--calib-images` images of half A calibrate, all of half B evaluate. Rows: float
(PyTorch), qdet's default PTQ (`qdet.quantize(model, batches)` — no adapter, default QuantConfig)
as fake-quant and on OpenVINO's int8 kernels, and — when `nncf` is importable in this environment
(it is not a qdet dependency) — NNCF's default `nncf.quantize` on the same calibration images,
converted to OpenVINO. Preprocessing of the Lite family: resize to 240, (x − 0.5) / 0.5.

    python benchmarks/efficientnet_lite_ptq.py --calib-images 300 --threads 2 --json runs/lite1.json
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


def top1(fn, loader) -> float:
    hit = n = 0
    with torch.no_grad():
        for x, y in loader:
            hit += int((torch.as_tensor(fn(x)).argmax(1) == y).sum())
            n += len(y)
    return 100.0 * hit / n


def nncf_openvino(model: torch.nn.Module, calib_loader, example: torch.Tensor):
    """NNCF's default PTQ (its own defaults: MinMax, fast bias correction) compiled by OpenVINO."""
    import nncf
    import openvino as ov

    dataset = nncf.Dataset(calib_loader, lambda batch: batch[0])  # one image per item: subset_size counts images
    quantized = nncf.quantize(model, dataset, subset_size=len(calib_loader.dataset))
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
    ap.add_argument("--bias-correction", action="store_true",
                    help="also measure qdet with QuantConfig(bias_correction=True) on OpenVINO")
    ap.add_argument("--no-fake-quant", action="store_true",
                    help="skip the (slow) fake-quant row; the OpenVINO int8 row is still measured")
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

    def row(name: str, fn, started: float) -> None:
        acc = top1(fn, evaluation)
        rows.append({"model": name, "top1": round(acc, 2), "d_top1": round(acc - rows[0]["top1"], 2) if rows else 0.0,
                     "seconds": round(time.perf_counter() - started, 1)})
        print(format_table(rows[-1:]))

    if not args.no_float:
        t = time.perf_counter()
        row("float (PyTorch)", model, t)
    for observer in [] if args.no_qdet else args.observers.split(","):
        t = time.perf_counter()
        cfg = qdet.QuantConfig(activations=qdet.Observer(observer))
        qm = qdet.quantize(model, make_loader(calib, 32), cfg)  # no adapter: the generic path
        print(qdet.coverage(qm).table())
        default = " (default)" if cfg.activations == qdet.QuantConfig().activations else ""
        if not args.no_fake_quant:
            row(f"qdet int8, {observer} activations{default} (fake-quant)", qm, t)
        t = time.perf_counter()
        row(f"qdet int8, {observer} activations{default} (OpenVINO)", qdet.lower(qm, "openvino", threads=args.threads), t)
    if args.bias_correction:
        t = time.perf_counter()
        qm = qdet.quantize(model, make_loader(calib, 32), qdet.QuantConfig(bias_correction=True))
        row("qdet int8, bias_correction=True (OpenVINO)", qdet.lower(qm, "openvino", threads=args.threads), t)
    if not args.no_nncf:
        try:
            import nncf  # noqa: F401
        except ImportError:
            print("nncf is not installed here: its row is not measured")
        else:
            t = time.perf_counter()
            row("NNCF default int8 (OpenVINO)", nncf_openvino(model, make_loader(calib, 1), torch.zeros(1, 3, 240, 240)), t)
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.json, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
