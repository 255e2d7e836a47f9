"""Where PTQ breaks and QAT recovers: CIFAR-10 ResNet with low-bit per-channel weights.

Split (seeded): the 10,000 CIFAR-10 test images are permuted with --seed; the first --train-images
(default 5,000) are the fine-tune/calibration half, the rest the evaluation half (never seen by
calibration or training). Activations stay uint8 per tensor in every row. PTQ: histogram
activation ranges from 512 fine-tune images. QAT: initial EMA ranges from the same images, then
--steps Adam steps of batch --batch on the fine-tune half (random crop + flip), BN statistics frozen
after --freeze-bn steps, observers after --freeze-observers. Top-1 is the fake-quant reference
(4/6-bit weights have no int8 runtime kernel; 8-bit rows could run on any runtime).

    python benchmarks/qat_cifar.py --model resnet20 --bits 4 --steps 300 --freeze-bn 1 --lr 1e-4
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import qdet
from qdet import api
from qdet.config import LayerOverride, QATConfig, QuantConfig, default_weight_spec
from qdet.data.folders import seeded_split
from qdet.fileio import write_text_atomically
from qdet.report.table import format_table
from qdet.train import ShuffledBatches, classification_loss, stack_dataset, train_qat


def top1(fn, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    with torch.no_grad():
        hits = sum(int((fn(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return 100.0 * hits / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--freeze-bn", type=int, default=1, help="1: BN folded with running statistics from the start (measured best for a short fine-tune)")
    ap.add_argument("--freeze-observers", type=int, default=250)
    ap.add_argument("--train-images", type=int, default=5000)
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N of the held-out half")
    ap.add_argument("--keep-ends-8bit", action="store_true", help="first conv and last linear keep 8-bit weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    adapter = api.get_adapter(args.model)
    model = adapter.build()
    train_set, eval_set = seeded_split(adapter.eval_dataset(), args.train_images, seed=args.seed)
    x_tr, y_tr = stack_dataset(train_set)
    x_ev, y_ev = stack_dataset(eval_set)
    if args.eval_images:
        x_ev, y_ev = x_ev[: args.eval_images], y_ev[: args.eval_images]
    calib = [(x_tr[i:i + 64], y_tr[i:i + 64]) for i in range(0, args.calib_images, 64)]
    f_top1 = top1(model, x_ev, y_ev)
    rows = [{"weights": "float", "method": "-", "top1": f_top1, "drop": 0.0, "recovered_pct": None}]
    print(rows[-1], flush=True)
    for bits in args.bits:
        spec = default_weight_spec(bits=bits)
        ends = (LayerOverride("conv1", weights=default_weight_spec(bits=8)),
                LayerOverride("linear", weights=default_weight_spec(bits=8))) if args.keep_ends_8bit else ()
        cfg = QuantConfig(weights=spec, overrides=ends)
        label = f"int{bits}" + (" (ends int8)" if args.keep_ends_8bit else "")
        ptq = api.quantize(model, calib, cfg, adapter=adapter, progress=False)
        p_top1 = top1(ptq, x_ev, y_ev)
        rows.append({"weights": label, "method": "PTQ", "top1": p_top1, "drop": f_top1 - p_top1, "recovered_pct": None})
        print(rows[-1], flush=True)

        qat_cfg = QATConfig(freeze_bn_after=args.freeze_bn, freeze_observers_after=args.freeze_observers,
                            calibration_batches=len(calib))
        qm = qdet.prepare_qat(model, calib, cfg, qat=qat_cfg, adapter=adapter, progress=False)
        batches = ShuffledBatches(x_tr, y_tr, batch_size=args.batch, seed=args.seed, augment=True)
        t0 = time.perf_counter()
        log = train_qat(qm, batches, classification_loss, steps=args.steps, lr=args.lr)
        converted = qdet.convert(qm)
        q_top1 = top1(converted, x_ev, y_ev)
        drop = f_top1 - p_top1
        rows.append({"weights": label, "method": f"QAT {args.steps} steps", "top1": q_top1, "drop": f_top1 - q_top1,
                     "recovered_pct": 100.0 * (q_top1 - p_top1) / drop if drop > 0 else None,
                     "train_s": time.perf_counter() - t0, "first_loss": log.losses[0],
                     "last_loss": sum(log.losses[-20:]) / len(log.losses[-20:]), "events": log.events})
        print(rows[-1], flush=True)
    print(f"\n{args.model}, CIFAR-10 test split seed {args.seed}: fine-tune/calibrate on {args.train_images} images, "
          f"top-1 on {len(x_ev)} held-out images; activations uint8; QAT: batch {args.batch}, Adam lr {args.lr}, "
          f"BN frozen after {args.freeze_bn}, observers after {args.freeze_observers} steps; "
          "recovered_pct = share of the PTQ drop that QAT wins back")
    print(format_table(rows, ["weights", "method", "top1", "drop", "recovered_pct"]))
    if args.json:
        write_text_atomically(args.json, json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
