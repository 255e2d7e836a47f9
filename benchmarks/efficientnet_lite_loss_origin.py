"""Where EfficientNet-Lite1's 10-point int8 loss was born: the int32-bias fit, measured layer by layer.

A BN-folded depthwise channel whose weights are ~0 gets the minimum weight scale, while its folded
bias stays O(1): round(b / (s_x·s_w)) then overflows int32. qdet used to make such biases fit by
widening the conv's per-tensor *input* grid (every channel of the layer coarsens); it now raises
that one channel's *weight* scale (its weights are ~0: nothing that matters changes). This script
quantizes Lite1 once with qdet's defaults, rebuilds the pre-fix variant from it (the same
calibration; raised weight scales put back, input grids widened as the old rule did), and prints,
for both, top-1 on OpenVINO over half B of Imagenette val and the per-layer SQNR (qdet.analysis)
of the layers whose grids differ — the first rows of that table are where the loss is born.

    python benchmarks/efficientnet_lite_loss_origin.py --calib-images 300 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import platform

import torch
from torch.utils.data import Subset

import qdet
from qdet.analysis.errors import layer_errors
from qdet.data.folders import make_loader
from qdet.paths import assets_dir
from qdet.quant.calibrate import INT32_MAX, _grid_source
from qdet.quant.qparams import compute_qparams
from qdet.quant.quantizer import QuantConv2d, QuantLinear, make_weight_quantizer
from qdet.report.table import format_table

from efficientnet_lite_ptq import imagenette_halves, pretrained_lite1, top1  # benchmarks/ is on sys.path


def pre_fix_variant(qm: qdet.QuantizedModel) -> tuple[qdet.QuantizedModel, list[str]]:
    """The same calibrated model with the old bias fit: weight scales back to the weights' own,
    the per-tensor input grid widened until every bias fits int32 (with 2x headroom)."""
    old = copy.deepcopy(qm)
    widened: list[str] = []
    for gm in (m for m in old.modules() if isinstance(m, torch.fx.GraphModule)):
        for node in gm.graph.nodes:
            mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if not isinstance(mod, (QuantConv2d, QuantLinear)) or mod.bias is None:
                continue
            wq, q = mod.weight_quant, _grid_source(gm, node.args[0])
            own = make_weight_quantizer(mod.weight, wq.spec, wq.layer_name)
            if q is None or not bool((wq.scale > own.scale).any()):
                continue
            wq.set_qparams(own.scale, own.zero_point)
            needed_x = float((mod.bias.detach().abs().double() / (own.scale.double() * INT32_MAX / 2)).max())
            if needed_x > float(q.scale):
                grow = needed_x / float(q.scale)
                lo = float(q.scale) * (q.spec.qmin - int(q.zero_point)) * grow
                hi = float(q.scale) * (q.spec.qmax - int(q.zero_point)) * grow
                q.set_qparams(*compute_qparams(torch.tensor(lo), torch.tensor(hi), q.spec.qmin, q.spec.qmax,
                                               symmetric=q.spec.symmetric))
                widened.append(f"{q.layer_name} (x{grow:.0f}, for {wq.layer_name.removesuffix('.weight')})")
    return old, widened


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(assets_dir() / "weights" / "efficientnet_lite1_imagenet.pth"))
    ap.add_argument("--calib-images", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=15, help="layers shown in the per-layer table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = pretrained_lite1(args.weights)
    data, half_a, half_b = imagenette_halves(args.seed)
    calib = make_loader(Subset(data, half_a[: args.calib_images]), 32)
    evaluation = make_loader(Subset(data, half_b), 64)
    print(f"calibration: {args.calib_images} images of half A; evaluation: all {len(half_b)} of half B; seed "
          f"{args.seed}; {args.threads} threads; {platform.processor() or platform.machine()}")

    qm = qdet.quantize(model, calib)  # qdet's defaults, no adapter
    old, widened = pre_fix_variant(qm)
    print(f"the old rule widens {len(widened)} conv input grids: " + "; ".join(widened))

    probe = [next(iter(make_loader(Subset(data, half_b[:32]), 32)))]
    new_err = {e.name: e for e in layer_errors(qm, probe)}
    old_err = {e.name: e for e in layer_errors(old, probe)}
    rows = [{"layer": name, "sqnr_now_db": round(new_err[name].sqnr_db, 1), "sqnr_old_rule_db": round(e.sqnr_db, 1),
             "d_db": round(e.sqnr_db - new_err[name].sqnr_db, 1)} for name, e in old_err.items() if name in new_err]
    first_drop = next((i for i, r in enumerate(rows) if r["d_db"] < -1.0), None)
    print(f"per-layer SQNR on 32 half-B images (graph order; first layer more than 1 dB worse: "
          f"{rows[first_drop]['layer'] if first_drop is not None else 'none'})")
    worst = sorted(rows, key=lambda r: r["d_db"])[: args.rows]
    print(format_table(worst))
    print(f"output SQNR: now {rows[-1]['sqnr_now_db']} dB, old rule {rows[-1]['sqnr_old_rule_db']} dB")

    table = [{"model": "float (PyTorch)", "top1": round(top1(model, evaluation), 2)}]
    for name, q in (("qdet int8 now (OpenVINO)", qm), ("qdet int8, old bias fit (OpenVINO)", old)):
        table.append({"model": name, "top1": round(top1(qdet.lower(q, "openvino", threads=args.threads), evaluation), 2)})
    for r in table:
        r["d_top1"] = round(r["top1"] - table[0]["top1"], 2)
    print(format_table(table))


if __name__ == "__main__":
    main()
