"""`qdet <verb>`: each subcommand parses arguments into a config and calls one api/job function.

Examples:
    qdet list
    qdet quantize resnet56                       # bundled CIFAR-10 weights and test images
    qdet quantize resnet50 --weights r50.pth --data /data/imagenette/val --threads 2
    qdet eval resnet56 --qmodel runs/resnet56.qdet --json out.json
    qdet bench resnet50 --runtime onnxruntime --threads 2
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from qdet.config import (
    Format,
    Observer,
    PerChannel,
    PerTensor,
    QuantConfig,
    ResidualPolicy,
    default_activation_spec,
    default_weight_spec,
    parse_enum,
)
from qdet.errors import QdetError


def _add_quant_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--observer", default="histogram", help="activation observer: " + ", ".join(o.value for o in Observer) + " (default: histogram)")
    g.add_argument("--weight-granularity", default="per-channel", choices=["per-channel", "per-tensor"], help="weight scales (default: per-channel)")
    g.add_argument("--weight-bits", type=int, default=8, help="weight bit width (default: 8; <8 runs in simulation only)")
    g.add_argument("--residual", default="quantized_add", help="residual policy: quantized_add or fuse_conv_add (default: quantized_add)")
    g.add_argument("--format", default="int", help="int (default), fp16 or bf16")
    g.add_argument("--skip", nargs="*", default=[], metavar="LAYER", help="layer names or fnmatch patterns kept in float")
    g.add_argument("--silu", default="auto", choices=["auto", "fused", "decomposed"],
                   help="SiLU (YOLO): fused into the int8 conv, only its output quantized (OpenVINO runs it as one "
                        "kernel), or decomposed into x*sigmoid(x), both int8 (what onnxruntime and torch can run "
                        "int8). auto: fused when the runtime fuses it (default: auto)")
    g.add_argument("--calib-images", type=int, default=512, help="calibration images, a seeded subset (default: 512)")
    g.add_argument("--calib-batch", type=int, default=32, help="calibration batch size (default: 32)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name (see `qdet list`)")
    p.add_argument("--weights", help="float weights file (.pt/.pth/.safetensors); default: bundled or torchvision")
    p.add_argument("--data", help="evaluation/calibration data folder, or kitti:DIR / coco:DIR "
                   "(default: the model's bundled set)")
    p.add_argument("--num-classes", type=int, help="classes of the --weights checkpoint when they differ from the "
                   "model's default (e.g. a KITTI-trained detector)")
    p.add_argument("--eval-images", type=int, help="evaluate on a seeded subset of N images (default: all)")
    p.add_argument("--runtime", default="auto",
                   help="where float and int8 run: openvino, onnxruntime, torch, reference; auto = the fastest installed "
                        "(openvino, then onnxruntime) (default: auto)")
    p.add_argument("--threads", type=int, default=2, help="threads for every timed model (default: 2)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats after warm-up (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration/evaluation subsets (default: 0)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdet", description="Quantize CNN classifiers and detectors to int8 and measure what it costs and gains.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="models, observers and runtimes qdet knows")

    q = sub.add_parser("quantize", help="calibrate, convert, evaluate float vs int8, benchmark, save", description="Post-training quantization with a float vs int8 table (accuracy, size, latency, speed-up).")
    _add_common(q)
    _add_quant_options(q)
    q.add_argument("--out", help="where to save the quantized model (default: runs/<model>.qdet)")
    q.add_argument("--no-bench", action="store_true", help="skip latency measurement")

    e = sub.add_parser("eval", help="evaluate a saved quantized model against its float model", description="Accuracy of float vs a saved .qdet model on the same data and runtime.")
    _add_common(e)
    e.add_argument("--qmodel", required=True, help="a .qdet file written by `qdet quantize`")

    a = sub.add_parser("analyze", help="per-layer error analysis: tables, activation maps, hexbins, HTML report",
                       description="Quantize (or load --qmodel), evaluate float vs int8, then capture float and int8 "
                                   "activations on the same images and write one self-contained HTML report.")
    _add_common(a)
    _add_quant_options(a)
    a.add_argument("--qmodel", help="a .qdet file (default: quantize now)")
    a.add_argument("--batches", type=int, default=2, help="evaluation batches captured for the analysis (default: 2)")
    a.add_argument("--batch-size", type=int, default=16, help="images per analysed batch (default: 16)")
    a.add_argument("--out", help="report folder (default: runs/<model>/analysis)")
    a.add_argument("--sensitivity", choices=["off", "only", "skip"], default="off",
                   help="one-at-a-time ranking by output SQNR: quantize only layer i, or keep only layer i float")
    a.add_argument("--no-eval", action="store_true", help="skip the float vs int8 metric table")

    b = sub.add_parser("bench", help="size and latency, float vs int8, in one run", description="Size on disk and median latency of float and int8 on the same inputs and thread count.")
    _add_common(b)
    _add_quant_options(b)
    b.add_argument("--qmodel", help="a .qdet file (default: quantize now)")
    b.add_argument("--batch", type=int, default=1, help="batch size for timing (default: 1)")
    return parser


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    from qdet.runtimes.base import get_runtime

    observer = parse_enum(Observer, args.observer, "observer")
    fuse_silu = args.silu == "fused" or (args.silu == "auto" and get_runtime(args.runtime).fuses_silu)
    granularity = PerChannel(0) if args.weight_granularity == "per-channel" else PerTensor()
    return QuantConfig(
        activations=default_activation_spec(observer),
        weights=default_weight_spec(granularity, bits=args.weight_bits),
        residual=parse_enum(ResidualPolicy, args.residual, "residual policy"),
        format=parse_enum(Format, args.format, "format"),
        skip=tuple(args.skip),
        fuse_silu=fuse_silu,
    )


def build_model(adapter: Any, args: argparse.Namespace) -> Any:
    """The float model for `--weights`, with `--num-classes` passed on when given."""
    from qdet.jobs import build_model as build

    return build(adapter, args.weights, args.num_classes)


def _job_options(args: argparse.Namespace, **extra: Any):
    from qdet.jobs import JobOptions

    return JobOptions(
        calib_images=getattr(args, "calib_images", 512), calib_batch=getattr(args, "calib_batch", 32),
        eval_images=args.eval_images, seed=args.seed, runtime=args.runtime, threads=args.threads,
        repeats=args.repeats, data=args.data, progress=not args.no_progress, **extra,
    )


def _emit(result: Any, args: argparse.Namespace) -> None:
    print(result.title)
    print(result.table())
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.as_dict(), indent=2, default=str))
        print(f"results written to {path}")


def cmd_list(_: argparse.Namespace) -> None:
    from qdet.models import REGISTRY
    from qdet.quant.observers import observer_names
    from qdet.runtimes.base import get_runtime, runtime_names

    print("models:    " + ", ".join(REGISTRY.names()))
    print("observers: " + ", ".join(observer_names()))
    for name in runtime_names():
        rt = get_runtime(name)
        status = "available" if rt.is_available() else "not installed"
        print(f"runtime {name:12s} {status:14s} {rt.description}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from qdet import api
    from qdet.jobs import compare_job

    adapter = api.get_adapter(args.model)
    model = build_model(adapter, args)
    cfg = config_from_args(args)
    result, qm = compare_job(adapter, model, cfg, _job_options(args, bench=not args.no_bench))
    out = Path(args.out or f"runs/{args.model}.qdet")
    api.save(qm, out)
    _emit(result, args)
    print(f"quantized model saved to {out} ({out.stat().st_size / 1e6:.2f} MB)")


def cmd_eval(args: argparse.Namespace) -> None:
    from qdet import api
    from qdet.jobs import compare_job

    adapter = api.get_adapter(args.model)
    model = build_model(adapter, args)
    qm = api.load(args.qmodel, build_model(adapter, args))
    result, _ = compare_job(adapter, model, qm.config, _job_options(args, bench=False), qmodel=qm)
    _emit(result, args)


def cmd_bench(args: argparse.Namespace) -> None:
    from qdet.bench.compare import bench_job

    _emit(bench_job(args, config_from_args(args)), args)


def cmd_analyze(args: argparse.Namespace) -> None:
    from qdet import api
    from qdet.analysis.report import analyze
    from qdet.analysis.sensitivity import layer_sensitivity
    from qdet.jobs import calibration_loader, compare_job

    adapter = api.get_adapter(args.model)
    model = build_model(adapter, args)
    opts = _job_options(args, bench=False)
    qm = api.load(args.qmodel, build_model(adapter, args)) if args.qmodel else api.quantize(
        model, calibration_loader(adapter, opts), config_from_args(args), adapter=adapter, progress=opts.progress)
    metric_rows = None
    if not args.no_eval:
        result, _ = compare_job(adapter, model, qm.config, opts, qmodel=qm)
        _emit(result, argparse.Namespace(json=None))
        metric_rows = result.rows
    from dataclasses import replace

    batches = list(itertools.islice(calibration_loader(adapter, replace(opts, calib_batch=args.batch_size, seed=opts.seed + 7)), args.batches))
    transform = adapter.transform_fn(model)
    tables = {}
    if args.sensitivity != "off":
        sens = layer_sensitivity(qm, None, batches, transform_fn=transform, mode=args.sensitivity, progress=opts.progress)
        print(sens.table(15))
        tables[f"Sensitivity ({args.sensitivity}), output SQNR"] = sens.as_rows()
    out = Path(args.out or f"runs/{args.model}/analysis")
    rep = analyze(qm, batches, transform, out, metric_rows=metric_rows, tables=tables,
                  title=f"qdet analysis: {args.model}", progress=opts.progress)
    print(rep.table(10))
    print(f"report: {rep.html.resolve()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"layers": list(rep.rows), "metrics": metric_rows}, indent=2, default=str))


COMMANDS = {"list": cmd_list, "quantize": cmd_quantize, "eval": cmd_eval, "bench": cmd_bench, "analyze": cmd_analyze}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "runtime", None):
            from qdet.runtimes.base import resolve_runtime

            args.runtime = resolve_runtime(args.runtime)
        COMMANDS[args.command](args)
    except QdetError as exc:
        print(f"qdet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
