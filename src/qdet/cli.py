"""`qdet <verb>`: each subcommand parses arguments into a config and calls one api/job function.

Examples:
    qdet list
    qdet quantize resnet56                       # bundled CIFAR-10 weights and test images
    qdet quantize resnet50 --weights r50.pth --data /data/imagenette/val --threads 2
    qdet quantize --model-file my_model.py:build --input-size 3,224,224 --data images/ --preprocess imagenet
    qdet quantize darknet --cfg yolov4.cfg --weights yolov4.weights --data coco-dir
    qdet eval resnet56 --qmodel runs/resnet56.qdet --json out.json
    qdet bench resnet50 --runtime onnxruntime --threads 2
    qdet qat resnet20 --weight-bits 4 --steps 300  # fine-tune on 5,000 CIFAR test images, evaluate on the rest
    qdet qat yolov5n --steps 40 --threads 1        # fine-tune on COCO train2017, mAP on val2017
    qdet export-int resnet56 --qmodel runs/resnet56.qdet --out runs/resnet56_int.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from qdet.config import (
    Format,
    Observer,
    OverflowFix,
    PerChannel,
    PerTensor,
    QuantConfig,
    ResidualPolicy,
    default_activation_spec,
    default_weight_spec,
    parse_enum,
)
from qdet.errors import ConfigError, QdetError
from qdet.fileio import check_writable, write_text_atomically
from qdet.ptq_cli import add_ptq_options, print_layer_table, ptq_from_args


def _int_at_least(lo: int, hi: int | None = None):
    """An argparse type: an integer in lo..hi; argparse names the option in its error (exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"within {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _finite_float(lo: float, *, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a finite float > lo (>= lo when `inclusive`); the error names the bound."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (value == lo and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {lo:g}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


_positive_float = _finite_float(0.0, inclusive=False)
_nonnegative_float = _finite_float(0.0, inclusive=True)


MAX_COUNT = 10**9  # every count option has an upper bound: a typo must not start a job that never ends
POSITIVE = _int_at_least(1, MAX_COUNT)
NON_NEGATIVE = _int_at_least(0, MAX_COUNT)
THREADS = _int_at_least(1, 1024)
BATCH = _int_at_least(1, 65536)
SEED = _int_at_least(0, 2**32 - 1)
IMG_SIZE = _int_at_least(32, 4096)
BITS = _int_at_least(2, 8)


def _runtime_help() -> str:
    from qdet.runtimes.base import _AUTO_ORDER, runtime_names

    return (f"where float and int8 run: {', '.join(runtime_names())}; auto = the fastest installed "
            f"({', then '.join(_AUTO_ORDER)}) (default: auto)")


def _add_batch_size(p: Any, default: int | None, help: str) -> None:
    """`--batch-size`, the one name for a batch option (bench keeps `--batch` as a hidden alias)."""
    p.add_argument("--batch-size", type=BATCH, default=default, help=help)


def _add_quant_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--observer", default="histogram", help="activation observer: " + ", ".join(o.value for o in Observer) + " (default: histogram)")
    g.add_argument("--weight-granularity", default="per-channel", choices=["per-channel", "per-tensor"], help="weight scales (default: per-channel)")
    g.add_argument("--weight-bits", type=BITS, default=8,
                   help="weight bit width (default: 8; narrower signed codes run as int8 on the runtimes)")
    g.add_argument("--overflow-fix", default="auto", choices=[f.value for f in OverflowFix],
                   help="7-bit weights against the int16 saturation of int8 kernels on x86 CPUs without VNNI "
                        "(onnxruntime, OpenVINO, torch): all layers, first_layer only, or none. auto: all when "
                        "this CPU saturates, else none (default: auto)")
    g.add_argument("--residual", default="quantized_add", help="residual policy: quantized_add or fuse_conv_add (default: quantized_add)")
    g.add_argument("--format", default="int", help="int (default), fp16 or bf16")
    g.add_argument("--skip", nargs="*", default=[], metavar="LAYER", help="layer names or fnmatch patterns kept in float")
    g.add_argument("--silu", default="auto", choices=["auto", "fused", "decomposed"],
                   help="SiLU (YOLO): fused into the int8 conv, only its output quantized (OpenVINO runs it as one "
                        "kernel), or decomposed into x*sigmoid(x), both int8 (what onnxruntime and torch can run "
                        "int8). auto: fused when the runtime fuses it (default: auto)")
    g.add_argument("--leaky-mish", default="auto", choices=["auto", "fused", "separate"],
                   help="LeakyReLU/Mish (Darknet): fused into the int8 conv, only its output quantized (OpenVINO runs "
                        "conv + activation + requantize as one kernel), or separate, conv output and activation "
                        "output both int8 (what onnxruntime runs int8). auto: fused when the runtime fuses them "
                        "(default: auto)")
    g.add_argument("--calib-images", type=POSITIVE, default=512, help="calibration images, a seeded subset (default: 512)")
    g.add_argument("--calib-batch-size", "--calib-batch", type=BATCH, dest="calib_batch",
                   help="calibration batch size (default: 32)")


DEFAULT_CALIB_BATCH = 32

WEIGHTS_HELP = ("float weights file (.pt/.pth/.safetensors), or 'random' for an explicit random initialisation "
                "(default: the model's bundled weights; see `qdet list`)")


def _add_common(p: argparse.ArgumentParser, *, model_file: bool = False) -> None:
    if model_file:
        p.add_argument("model", nargs="?", help="model name (see `qdet list`); omit it with --model-file")
    else:
        p.add_argument("model", help="model name (see `qdet list`)")
    p.add_argument("--weights", metavar="PATH", help=WEIGHTS_HELP)
    p.add_argument("--data", help="evaluation/calibration data folder, or kitti:DIR / coco:DIR "
                   "(default: the model's bundled set)")
    _add_cfg(p)
    p.add_argument("--num-classes", type=POSITIVE, help="classes of the --weights checkpoint when they differ from the "
                   "model's default (e.g. a KITTI-trained detector)")
    p.add_argument("--eval-images", type=POSITIVE, help="evaluate on a seeded subset of N images (default: all)")
    p.add_argument("--runtime", default="auto", help=_runtime_help())
    p.add_argument("--threads", type=THREADS, default=2,
                   help="torch and runtime threads for calibration, evaluation and timing (default: 2)")
    p.add_argument("--repeats", type=POSITIVE, default=20, help="timed repeats after warm-up (default: 20)")
    p.add_argument("--seed", type=SEED, default=0, help="seed for calibration/evaluation subsets, 0..2**32-1 (default: 0)")
    _add_json_progress(p)


def _add_cfg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg", metavar="PATH", help="Darknet models: the network's .cfg file (model `darknet` needs it; "
                   "for darknet-yolov3 etc. it replaces the bundled cfg)")


def _add_json_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_reference(p: argparse.ArgumentParser) -> None:
    p.add_argument("--with-reference", action="store_true",
                   help="classifiers: also evaluate the fake-quant reference simulation (slow; default: off)")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), exit 2: every bad option reads like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from qdet import __version__

    parser = _Parser(prog="qdet", description="Quantize CNN classifiers and detectors to int8 and measure what it costs and gains.")
    parser.add_argument("--version", action="version", version=f"qdet {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="models (with bundled weights or not), observers and runtimes qdet knows")
    ls.add_argument("--json", metavar="PATH", help="also write the lists as JSON to PATH")

    q = sub.add_parser("quantize", help="calibrate, convert, evaluate float vs int8, benchmark, save", description="Post-training quantization with a float vs int8 table (accuracy, size, latency, speed-up).")
    _add_common(q, model_file=True)
    _add_quant_options(q)
    add_ptq_options(q)
    _add_model_file_options(q)
    q.add_argument("--out", metavar="FILE.qdet", help="the quantized model file to write (default: runs/<model>.qdet, "
                                 "runs/<file>_<function>.qdet with --model-file)")
    q.add_argument("--no-bench", action="store_true", help="skip latency measurement")
    q.add_argument("--scope", choices=["detector", "backbone"], default=None,
                   help="SSD models: int8 for the whole network (detector, default) or the backbone only")
    _add_reference(q)
    from qdet.parallel.cli import add_ray_options

    add_ray_options(q, evaluation=True)

    e = sub.add_parser("eval", help="evaluate a saved quantized model against its float model", description="Accuracy of float vs a saved .qdet model on the same data and runtime.")
    _add_common(e)
    e.add_argument("--qmodel", required=True, help="a .qdet file written by `qdet quantize`")
    e.add_argument("--bench", action="store_true", help="also time float and int8 (latency columns; default: off)")
    _add_reference(e)
    add_ray_options(e, evaluation=True)

    a = sub.add_parser("analyze", help="per-layer error analysis: tables, activation maps, hexbins, HTML report",
                       description="Quantize (or load --qmodel), evaluate float vs int8, then capture float and int8 "
                                   "activations on the same images and write one self-contained HTML report.")
    _add_common(a)
    _add_quant_options(a)
    a.add_argument("--qmodel", help="a .qdet file (default: quantize now)")
    _add_reference(a)
    a.add_argument("--batches", type=POSITIVE, default=2, help="evaluation batches captured for the analysis (default: 2)")
    _add_batch_size(a, 16, "images per analysed batch (default: 16)")
    a.add_argument("--report-dir", dest="out", metavar="DIR",
                   help="folder the report is written to: report.html, its plots, frames.gif/.mp4 (created; "
                        "default: runs/<model>/analysis). analyze saves no model file")
    a.add_argument("--out", dest="out", help=argparse.SUPPRESS)  # old spelling of --report-dir
    a.add_argument("--sensitivity", choices=["off", "only", "skip"], default="off",
                   help="one-at-a-time ranking: quantize only layer i, or keep only layer i float (default: off)")
    a.add_argument("--metric", choices=["task", "sqnr"], default="task",
                   help="what ranks layers: the task metric (top-1 / COCO mAP, in points) or output SQNR only "
                        "(default: task)")
    a.add_argument("--metric-top", type=NON_NEGATIVE, default=12, metavar="K",
                   help="measure the task metric for the K layers output SQNR ranks most sensitive; 0 = every "
                        "layer (default: 12)")
    a.add_argument("--max-drop", type=_nonnegative_float, metavar="PTS",
                   help="mixed precision: keep the fewest layers float (in sensitivity order) until the task metric "
                        "is within PTS points of float (e.g. 0.3); implies --sensitivity skip when off")
    a.add_argument("--search-runtime", metavar="RUNTIME",
                   help="measure the sensitivity metric and the mixed-precision search on this runtime (each step "
                        "exports and compiles the model: slower, but it is what you deploy; default: the "
                        "fake-quant reference)")
    a.add_argument("--search-on", choices=["eval", "calibration"], default="eval",
                   help="images the sensitivity metric and the search are measured on: the evaluation set, or the "
                        "labeled calibration images (detectors), which keeps the evaluation set held out for "
                        "checking the chosen layers (default: eval)")
    a.add_argument("--max-float-layers", type=NON_NEGATIVE, help="mixed precision: keep at most this many layers float")
    a.add_argument("--refine", action="store_true",
                   help="mixed precision: afterwards try each kept layer in int8 again and drop it if the budget holds")
    a.add_argument("--no-eval", action="store_true", help="skip the float vs int8 metric table")
    a.add_argument("--frames", nargs="+", metavar="IMAGE",
                   help="detectors: image files or a folder (e.g. KITTI image_2); one PNG per image with float vs "
                        "int8 boxes and a layer's maps beneath, plus frames.gif (and frames.mp4 with imageio-ffmpeg)")
    a.add_argument("--frame-layer", help="layer whose maps the frames show (default: the most sensitive one "
                                         "when --sensitivity ran, else a layer half-way through the model)")
    a.add_argument("--overlay", action="store_true",
                   help="draw the activation maps semi-transparent over the input image instead of beside it")
    from qdet.parallel.cli import add_ray_options

    add_ray_options(a)

    b = sub.add_parser("bench", help="size and latency, float vs int8, in one run", description="Size on disk and median latency of float and int8 on the same inputs and thread count.")
    _add_common(b)
    _add_quant_options(b)
    b.add_argument("--qmodel", help="a .qdet file (default: quantize now)")
    _add_batch_size(b, 1, "batch size for timing (default: 1)")
    b.add_argument("--batch", type=BATCH, dest="batch_size", help=argparse.SUPPRESS)  # old spelling
    from qdet.bench.pipeline_job import add_pipeline_options  # --mode, --whole-graph, --profile (issue 18)

    add_pipeline_options(b)
    _add_qat_parser(sub)
    from qdet.track_job import add_track_parser  # `qdet track` (issue 17)

    add_track_parser(sub)

    x = sub.add_parser("export-int", help="per-layer integer parameters (M0, n, int32 bias, zero points) as JSON",
                       description="Lower a quantized model to the integer-only runtime and write, per layer, the "
                                   "integer parameters it runs with (M0 · 2^-n multipliers, int32 biases, scales, "
                                   "zero points) as JSON for hardware implementations.")
    x.add_argument("model", help="model name (see `qdet list`)")
    x.add_argument("--weights", metavar="PATH", help=WEIGHTS_HELP)
    _add_cfg(x)
    x.add_argument("--data", help="calibration data folder (default: the model's bundled set)")
    x.add_argument("--qmodel", help="a .qdet file (default: quantize now)")
    x.add_argument("--out", metavar="FILE.json", help="the integer-parameter file to write, JSON (default: "
                                                      "runs/<model>_integer.json)")
    x.add_argument("--seed", type=SEED, default=0, help="seed for the calibration subset (default: 0)")
    _add_json_progress(x)
    _add_quant_options(x)
    return parser


def _add_model_file_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("your own model (instead of a model name)")
    g.add_argument("--model-file", metavar="FILE.py:FUNCTION",
                   help="FILE.py:FUNCTION (FUNCTION() returns an nn.Module), a torch.export program (.pt2); "
                        "quantized with no adapter; --data: an image folder (labeled when root/<class>/<image>), "
                        "default: seeded synthetic images (agreement with float, no accuracy)")
    g.add_argument("--input-size", metavar="C,H,W", help="input image size, C,H,W or H,W (default: 3,224,224; "
                                                         "a .pt2 file: its exported shape)")
    g.add_argument("--preprocess", metavar="SPEC",
                   help="applied to each (C,H,W) image in [0,1]: imagenet, \"mean=M1,M2,M3;std=S1,S2,S3\", or "
                        "FILE.py:FUNCTION (image tensor -> tensor) (default: none, the image in [0,1])")


def _add_qat_parser(sub: Any) -> None:
    t = sub.add_parser(
        "qat", help="quantization-aware fine-tuning: float vs PTQ vs QAT on held-out images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Calibrate, fine-tune with fake-quant (BN folded, EMA activation ranges), convert to the same "
                    "int8 model PTQ gives, and evaluate float, PTQ and QAT side by side; saves the QAT model.\n\n"
                    "Data split:\n"
                    "  classifiers  a seeded --train-images part of the image folder calibrates and fine-tunes "
                    "(for the\n"
                    "               CIFAR ResNets: 5,000 of the 10,000 CIFAR-10 test images); top-1 on the "
                    "disjoint rest\n"
                    "  YOLOv5       the COCO train2017 images (bundled: 160) calibrate and fine-tune, with qdet's "
                    "YOLOv5\n"
                    "               box/objectness/class loss; COCO mAP on the val2017 images (bundled: 158)\n"
                    "  Faster R-CNN no CLI recipe: qdet.prepare_qat + a loop over torchvision's losses + "
                    "qdet.convert\n\n"
                    "PTQ and the QAT initial ranges calibrate on a seeded --calib-images subset of the same "
                    "training images.\n"
                    "Training defaults depend on the task (classifier / detector): --steps 300 / 200, "
                    "--batch-size 64 / 8,\n"
                    "--lr 1e-4 / 1e-5, --freeze-observers 250 / 100.",
        epilog="examples:\n"
               "  qdet qat resnet20 --weight-bits 4 --steps 300 --threads 1\n"
               "  qdet qat yolov5n --steps 40 --runtime openvino --threads 1")
    _add_common(t)
    _add_quant_options(t)
    g = t.add_argument_group("training")
    g.add_argument("--steps", type=POSITIVE, help="optimiser steps (default: 300 classifiers, 200 detectors)")
    _add_batch_size(g, None, "training batch size (default: 64 classifiers, 8 detectors)")
    g.add_argument("--lr", type=_positive_float, help="Adam learning rate (default: 1e-4 classifiers, 1e-5 detectors)")
    g.add_argument("--train-images", type=POSITIVE, default=5000,
                   help="classifiers: images of the seeded split used for calibration and fine-tuning; the rest "
                        "evaluate (default: 5000). Detectors always use all train2017 images")
    g.add_argument("--img-size", type=IMG_SIZE, help="detectors: letterbox size for calibration, fine-tuning and "
                                               "evaluation (default: the model's, 640 for YOLOv5)")
    g.add_argument("--freeze-bn", type=NON_NEGATIVE, default=1,
                   help="freeze BN statistics after N steps (default: 1, i.e. fold running statistics after the "
                        "first step, as qdet.QATConfig does: on ResNet20 4-bit it recovered 69 %% of the PTQ drop, "
                        "freezing at 200 only 10 %%; detector batches of 8 give noisy statistics too)")
    g.add_argument("--freeze-observers", type=NON_NEGATIVE,
                   help="freeze activation ranges after N steps (default: 250 classifiers, 100 detectors)")
    g.add_argument("--device", default="cpu", help="fine-tuning device, e.g. cuda (evaluation runs on the CPU; "
                                                   "default: cpu)")
    t.add_argument("--out", metavar="FILE.qdet", help="the QAT-converted model file to write (default: runs/<model>-qat.qdet)")


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    from qdet.runtimes.base import get_runtime

    observer = parse_enum(Observer, args.observer, "observer")
    runtime = get_runtime(args.runtime)
    fuse_silu = args.silu == "fused" or (args.silu == "auto" and runtime.fuses_silu)
    fuse_leaky_mish = args.leaky_mish == "fused" or (args.leaky_mish == "auto" and runtime.fuses_leaky_mish)
    granularity = PerChannel(0) if args.weight_granularity == "per-channel" else PerTensor()
    return QuantConfig(
        activations=default_activation_spec(observer),
        weights=default_weight_spec(granularity, bits=args.weight_bits),
        residual=parse_enum(ResidualPolicy, args.residual, "residual policy"),
        format=parse_enum(Format, args.format, "format"),
        skip=tuple(args.skip),
        fuse_silu=fuse_silu,
        fuse_leaky_mish=fuse_leaky_mish,
        ptq=ptq_from_args(args),
        overflow_fix=parse_enum(OverflowFix, args.overflow_fix, "--overflow-fix"),
    )


def has_bundled_weights(adapter: Any) -> bool:
    """Whether `adapter.build(None)` finds pretrained weights of its own (a bundled file)."""
    bundled = getattr(adapter, "bundled_weights", None)
    return bundled is not None and Path(bundled()).is_file()


def check_weights(adapter: Any, weights: str | None) -> None:
    """No silent random initialisation: without bundled weights the user passes --weights."""
    if weights is None and not has_bundled_weights(adapter):
        kind = getattr(adapter, "weights_kind", "a state-dict file")
        raise ConfigError(f"model {adapter.name!r} has no bundled weights; pass --weights PATH ({kind}), "
                          f"or --weights random for an explicit random initialisation")


def check_args(adapter: Any, args: argparse.Namespace) -> None:
    """Every option that depends on the model, checked before anything is built or calibrated."""
    from qdet.models.base import Task

    check_weights(adapter, getattr(args, "weights", None))
    if hasattr(args, "calib_batch") and args.calib_batch is None:  # the model's default recipe
        args.calib_batch = getattr(adapter, "calib_batch_size", DEFAULT_CALIB_BATCH)
    if getattr(args, "eval_images", None) is not None and adapter.task is not Task.CLASSIFICATION:
        raise ConfigError("--eval-images is supported for classifiers only; detectors evaluate the whole set")
    if getattr(args, "with_reference", False) and adapter.task is not Task.CLASSIFICATION:
        raise ConfigError("--with-reference is supported for classifiers only")


def resolve_adapter(args: argparse.Namespace) -> Any:
    """The model's adapter, on the `--cfg` file when given (Darknet models only), with every
    model-dependent option checked (`check_args`)."""
    from qdet import api

    adapter = api.get_adapter(args.model)
    cfg = getattr(args, "cfg", None)
    if cfg is not None:
        if not hasattr(adapter, "with_cfg"):
            raise ConfigError(f"--cfg is only for Darknet models (darknet, darknet-yolov4, ...), not {args.model!r}")
        adapter = adapter.with_cfg(cfg)
    elif getattr(adapter, "needs_cfg", False):
        raise ConfigError(f"model {args.model!r} needs --cfg PATH (a Darknet .cfg file; or use a bundled cfg: "
                          "darknet-yolov3, darknet-yolov4-tiny, ...)")
    scope = getattr(args, "scope", None)
    if scope is not None:
        if not hasattr(adapter, "with_scope"):
            raise ConfigError(f"--scope is for SSD models; {args.model!r} has no scopes")
        adapter = adapter.with_scope(scope)
    check_args(adapter, args)
    return adapter


def build_model(adapter: Any, args: argparse.Namespace) -> Any:
    """The float model for `--weights`, with `--num-classes` passed on when given."""
    from qdet.jobs import build_model as build

    return build(adapter, args.weights, args.num_classes)


def _job_options(args: argparse.Namespace, **extra: Any):
    from qdet.jobs import JobOptions

    return JobOptions(
        calib_images=getattr(args, "calib_images", 512), calib_batch=getattr(args, "calib_batch", None) or DEFAULT_CALIB_BATCH,
        eval_images=args.eval_images, seed=args.seed, runtime=args.runtime, threads=args.threads,
        repeats=args.repeats, data=args.data, progress=not args.no_progress,
        with_reference=getattr(args, "with_reference", False), **extra,
    )


def _ray(args: argparse.Namespace) -> dict[str, Any]:
    return {"ray": args.ray, "ray_workers": args.ray_workers}


def check_sharded_evaluation(args: argparse.Namespace, adapter: Any) -> None:
    """`--ray` on eval/quantize: Ray installed, options consistent, the adapter's evaluation shardable."""
    from qdet.models.base import Task
    from qdet.parallel.cli import check_ray_options

    check_ray_options(args)
    if args.ray and adapter.task is not Task.CLASSIFICATION and not callable(getattr(adapter, "predict", None)):
        raise ConfigError(f"--ray: model {adapter.name!r} has no evaluation that splits into image shards "
                          "(predict/score); evaluate it without --ray")


def _emit(result: Any, args: argparse.Namespace) -> None:
    print(result.title)
    print(result.table())
    _write_json(args, result.as_dict())


def _write_json(args: argparse.Namespace, payload: Any) -> None:
    """`--json PATH`: the verb's results as JSON, written atomically."""
    if args.json:
        print(f"results written to {write_text_atomically(args.json, json.dumps(payload, indent=2, default=str))}")


def cmd_list(args: argparse.Namespace) -> None:
    from qdet.models import REGISTRY
    from qdet.quant.observers import observer_names
    from qdet.runtimes.base import get_runtime, resolve_runtime, runtime_names

    models = [{"model": n, "bundled_weights": has_bundled_weights(REGISTRY.get(n))} for n in REGISTRY.names()]
    print("models (* = bundled weights; the others need --weights PATH, or --weights random):")
    print("  " + ", ".join(m["model"] + ("*" if m["bundled_weights"] else "") for m in models))
    print("observers: " + ", ".join(observer_names()))
    runtimes = []
    for name in runtime_names():
        rt = get_runtime(name)
        status = "available" if rt.is_available() else "not installed"
        runtimes.append({"runtime": name, "available": rt.is_available(), "description": rt.description})
        print(f"runtime {name:12s} {status:14s} {rt.description}")
    print(f"runtime auto = {resolve_runtime('auto')} here")
    _write_json(args, {"models": models, "observers": list(observer_names()), "runtimes": runtimes,
                       "auto": resolve_runtime("auto")})


def cmd_quantize(args: argparse.Namespace) -> None:
    from qdet import api
    from qdet.jobs import compare_job

    if args.model_file is not None:
        return cmd_quantize_model_file(args)
    if args.model is None:
        raise ConfigError("quantize needs a model name (see `qdet list`) or --model-file FILE.py:FUNCTION")
    for option in ("input_size", "preprocess"):
        if getattr(args, option) is not None:
            raise ConfigError(f"--{option.replace('_', '-')} is for --model-file models only")
    adapter = resolve_adapter(args)
    check_sharded_evaluation(args, adapter)
    model = build_model(adapter, args)
    cfg = config_from_args(args)
    result, qm = compare_job(adapter, model, cfg, _job_options(args, bench=not args.no_bench, **_ray(args)))
    out = Path(args.out or f"runs/{args.model}.qdet")
    api.save(qm, out)
    _emit(result, args)
    print_layer_table(qm)
    print(f"quantized model saved to {out} ({out.stat().st_size / 1e6:.2f} MB)")


def cmd_quantize_model_file(args: argparse.Namespace) -> None:
    """`qdet quantize --model-file FILE.py:FUNCTION | model.pt2`: the generic path, no adapter."""
    from qdet import api
    from qdet.user_job import user_quantize_job
    from qdet.user_model import parse_model_file

    if args.model is not None:
        raise ConfigError(f"give either a model name ({args.model!r}) or --model-file, not both")
    if args.ray:
        raise ConfigError("--ray is for named models: a --model-file model would have to be importable in every "
                          "Ray worker; evaluate it without --ray")
    for option in ("weights", "num_classes"):
        if getattr(args, option) is not None:
            raise ConfigError(f"--{option.replace('_', '-')} is not used with --model-file (build the model, "
                              f"weights included, in your function)")
    if args.with_reference:
        raise ConfigError("--with-reference is not supported with --model-file (use --runtime reference)")
    spec = parse_model_file(args.model_file)
    result, qm = user_quantize_job(spec, config_from_args(args), _job_options(args, bench=not args.no_bench),
                                   input_size=args.input_size, preprocess=args.preprocess)
    out = Path(args.out or f"runs/{spec.run_name}.qdet")
    api.save(qm, out)
    _emit(result, args)
    print_layer_table(qm)
    print(f"quantized model saved to {out} ({out.stat().st_size / 1e6:.2f} MB)")


def cmd_eval(args: argparse.Namespace) -> None:
    from qdet import api
    from qdet.jobs import compare_job

    adapter = resolve_adapter(args)
    check_sharded_evaluation(args, adapter)
    model = build_model(adapter, args)
    qm = api.load(args.qmodel, build_model(adapter, args))
    stored = dict(qm.metrics)
    result, _ = compare_job(adapter, model, qm.config, _job_options(args, bench=args.bench, **_ray(args)), qmodel=qm)
    result.notes.append(stored_comparison(stored, result))
    _emit(result, args)


def stored_comparison(stored: dict[str, Any], result: Any) -> str:
    """One line: the int8 number `qdet quantize` stored in the .qdet against the one measured now, when
    both are for the same runtime, evaluation images and seed (else what differs)."""
    meta = result.meta
    label = f"int8 ({meta['runtime']})"
    key = next(k for k in result.rows[0] if k not in ("model", "runtime"))
    old = next((r for r in stored.get("rows", []) if r.get("model") == label and key in r), None)
    same = {k: stored.get(k) for k in ("runtime", "eval_images", "seed")} == {k: meta[k] for k in ("runtime", "eval_images", "seed")}
    if old is None or not same:
        return (f"stored in the file: {', '.join(f'{k} {stored.get(k)}' for k in ('runtime', 'eval_images', 'seed'))} "
                f"(now {meta['runtime']}, {meta['eval_images']} images, seed {meta['seed']}): not the same measurement")
    now = next(r[key] for r in result.rows if r["model"] == label)
    verdict = "reproduced" if now == old[key] else f"DIFFERS by {now - old[key]:+.4g}"
    return f"{label} {key}: {now:.2f} now, {old[key]:.2f} stored by `qdet quantize` (same runtime, images, seed): {verdict}"


def cmd_bench(args: argparse.Namespace) -> None:
    from qdet.bench.compare import bench_job
    from qdet.bench.pipeline_job import pipeline_bench_job, wants_pipeline

    job = pipeline_bench_job if wants_pipeline(args) else bench_job  # end to end, NMS included (issue 18)
    _emit(job(args, config_from_args(args), adapter=resolve_adapter(args)), args)


def cmd_analyze(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from qdet import api
    from qdet.analysis.report import analyze
    from qdet.analysis.task_metric import check_metric_images
    from qdet.jobs import calibration_loader, compare_job
    from qdet.runtimes.base import get_runtime

    if args.ray and args.sensitivity == "off" and args.max_drop is None:
        raise ConfigError("--ray distributes the sensitivity sweep and the mixed-precision search: add "
                          "--sensitivity only|skip or --max-drop")
    adapter = resolve_adapter(args)
    check_metric_images(adapter, args.search_on)
    if args.search_runtime:
        get_runtime(args.search_runtime)  # an unknown name fails now, not after calibration
    model = build_model(adapter, args)
    opts = _job_options(args, bench=False)
    from qdet.bench.latency import torch_threads

    with torch_threads(opts.threads):  # calibrated like `qdet quantize` (thread count changes float sums)
        qm = _analysis_model(args, adapter, model) if args.qmodel else api.quantize(
            model, calibration_loader(adapter, opts), config_from_args(args), adapter=adapter, progress=opts.progress)
    metric_rows = None
    if not args.no_eval:
        result, _ = compare_job(adapter, model, qm.config, opts, qmodel=qm)
        _emit(result, argparse.Namespace(json=None))
        metric_rows = result.rows
    batches = list(itertools.islice(calibration_loader(adapter, replace(opts, calib_batch=args.batch_size, seed=opts.seed + 7)), args.batches))
    transform = adapter.transform_fn(model)
    tables: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if args.max_drop is not None and args.sensitivity == "off":
        args.sensitivity = "skip"
    out = Path(args.out or f"runs/{args.model}/analysis")
    if args.sensitivity != "off":
        from qdet.parallel.cli import backend_from_args

        with backend_from_args(args, threads=args.threads) as backend:  # --ray: Ray tasks, else serial
            extra = _sensitivity_and_mixed_precision(args, adapter, model, qm, batches, transform, tables, backend,
                                                     out / "tasks.jsonl")
    images = _frames(args, adapter, qm, out, extra) if args.frames else []
    rep = analyze(qm, batches, transform, out, metric_rows=metric_rows, tables=tables, images=images,
                  title=f"qdet analysis: {args.model}", overlay=args.overlay, progress=opts.progress)
    shown = min(10, len(rep.rows))
    print(f"\nper-layer error, float vs int8 activations (fake-quant reference) on {len(batches)} batch(es) of "
          f"{args.batch_size} images: the {shown} of {len(rep.rows)} layers with the lowest SQNR (all in the report)")
    print(rep.table(10))
    print(f"report: {rep.html.resolve()}")
    if args.json:
        write_text_atomically(args.json, json.dumps({"layers": list(rep.rows), "metrics": metric_rows, **extra},
                                                    indent=2, default=str))


def _analysis_model(args: argparse.Namespace, adapter: Any, model: Any) -> Any:
    """The --qmodel file on the float model's weights (quantizers off = the float model), so analysis
    compares float with int8 and not the file's int8 weights with activations float; a file made from
    other float weights (or fine-tuned by QAT) is analysed as loaded, and the output says so."""
    from qdet import api
    from qdet.qmodel import with_float_weights

    loaded = api.load(args.qmodel, build_model(adapter, args))
    try:
        return with_float_weights(loaded, model, {r.path: r.leaf_modules for r in adapter.regions(model)})
    except ConfigError as exc:
        print(f"note: {exc}; analysing the file as loaded: its 'float' views keep the int8 weights (activations float)")
        return loaded


def _frames(args: argparse.Namespace, adapter: Any, qm: Any, out: Path, extra: dict[str, Any]) -> list[Path]:
    """`--frames`: float vs int8 boxes + maps per image, a GIF (and MP4 when imageio-ffmpeg is installed)."""
    from qdet.analysis.frames import detection_frames, plot_detection_frame, write_gif, write_mp4
    from qdet.analysis.points import quant_points

    if not hasattr(adapter, "frame_input"):
        raise ConfigError(f"--frames: model {args.model!r} is not a detector with frame support")
    paths: list[Path] = []
    for item in map(Path, args.frames):
        paths += sorted(p for p in item.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"}) if item.is_dir() else [item]
    layer = args.frame_layer
    if layer is None:
        ranked = extra.get("sensitivity", {}).get("rows", [])
        names = [p.name for p in quant_points(qm) if p.activation is not None and p.kind != "input"]
        layer = ranked[0]["name"] if ranked else names[len(names) // 2]
    frames = detection_frames(qm, [adapter.frame_input(p) for p in paths], layer, adapter.boxes)
    names = getattr(qm.model, "names", None)
    pngs = [plot_detection_frame(f, out / "frames" / f"{p.stem}.png", names=names, title=p.name)
            for f, p in zip(frames, paths)]
    written = [write_gif(pngs, out / "frames.gif")]
    try:
        written.append(write_mp4(pngs, out / "frames.mp4"))
    except ConfigError as exc:
        print(f"frames: {exc}")
    for path in written:
        print(f"frames: {path.resolve()}")
    return [pngs[0], written[0]]


def _sensitivity_and_mixed_precision(args: argparse.Namespace, adapter: Any, model: Any, qm: Any, batches: list[Any],
                                     transform: Any, tables: dict[str, Any], backend: Any,
                                     tasks_file: Path) -> dict[str, Any]:
    """`--sensitivity` / `--max-drop`: rank layers (task metric over the top SQNR candidates), then the
    mixed-precision search; adds report tables and prints them. The metric runs in the fake-quant
    reference or, with --search-runtime, on that runtime; on --search-on's images. Every measurement is
    a task of `backend`, checkpointed to `tasks_file` (a rerun with the same model and options resumes)."""
    from qdet.analysis.costs import kept_float_rows, layer_costs
    from qdet.analysis.sensitivity import layer_sensitivity, mixed_precision_search, to_config
    from qdet.analysis.task_metric import runtime_metric, task_metric

    metric = None
    if args.metric == "task":
        metric = task_metric(adapter, data=args.data, eval_images=args.eval_images, seed=args.seed + 1,
                             on=args.search_on, progress=not args.no_progress)
        if args.search_runtime:
            metric = runtime_metric(metric, args.search_runtime, threads=backend.threads or args.threads)
    elif args.max_drop is not None:
        raise ConfigError("--max-drop needs the task metric (--metric task), not --metric sqnr")
    elif args.search_runtime or args.search_on != "eval":
        raise ConfigError("--search-runtime and --search-on need the task metric (--metric task), not --metric sqnr")
    name = metric.name if metric is not None else "output SQNR (dB)"
    where = (f"{args.search_runtime or 'fake-quant reference'}, {args.search_on} images" if metric is not None
             else "fake-quant reference, analysis batches")
    from qdet.parallel.cli import open_checkpoint

    ckpt = open_checkpoint(args, tasks_file, qm, name, where, backend)
    sens = layer_sensitivity(qm, metric, batches, transform_fn=transform, mode=args.sensitivity,
                             metric_top=args.metric_top or None, progress=not args.no_progress, backend=backend,
                             checkpoint=ckpt)
    refs = ("" if sens.float_metric is None else
            f": every layer float (the BN-folded graph) {sens.float_metric:.2f}, every layer int8 {sens.int8_metric:.2f}")
    print(f"\nsensitivity ({args.sensitivity}), ranked by {name}, measured on {where}{refs}")
    print(sens.table(max(15, args.metric_top or 0)))
    tables[f"Sensitivity ({args.sensitivity}): metric = {name} ({where})"] = sens.as_rows()
    extra: dict[str, Any] = {"sensitivity": {"mode": args.sensitivity, "metric": name, "measured_on": where,
                                             "float": sens.float_metric, "int8": sens.int8_metric,
                                             "rows": sens.as_rows()}}
    if args.max_drop is None or metric is None or sens.float_metric is None:
        return extra
    ranked = [r.name for r in sens.rows if r.metric is not None] or sens.ranking()
    mp = mixed_precision_search(qm, metric, sens.float_metric, args.max_drop, ranked,
                                max_float_layers=args.max_float_layers, refine=args.refine,
                                progress=not args.no_progress, backend=backend, checkpoint=ckpt)
    x = batches[0][0] if isinstance(batches[0], (tuple, list)) else batches[0]
    kept = kept_float_rows(mp, layer_costs(model, x[:1]))
    gap = mp.float_metric - mp.int8_metric
    closed = (mp.metric - mp.int8_metric) / gap if gap > 0 else float("nan")
    summary = [{"model": "float", name: mp.float_metric, "float_layers": "all"},
               {"model": "int8", name: mp.int8_metric, "float_layers": 0},
               {"model": "mixed", name: mp.metric, "float_layers": len(mp.kept_float),
                "gap_closed_pct": 100 * closed, "budget_met": mp.met}]
    from qdet.report.table import format_table

    print(f"mixed precision (max drop {args.max_drop} pts, target {mp.target:.2f}): "
          f"{'met' if mp.met else 'NOT met'} with {len(mp.kept_float)} layer(s) float")
    print(format_table(summary))
    print("layers kept float, their gain and cost:")
    print(format_table(kept))
    skip = to_config(mp, qm.config).skip
    print("run it on a runtime: qdet quantize " + args.model + " --skip " + " ".join(skip))
    tables[f"Mixed precision (max drop {args.max_drop} pts), {where}"] = summary
    tables["Layers kept float: gain and cost (extra weight MB, share of MACs)"] = kept
    extra["mixed_precision"] = {"summary": summary, "kept": kept, "skip": list(skip), "max_drop": args.max_drop}
    return extra


def qat_options(args: argparse.Namespace, task: Any) -> Any:
    """`qdet qat` arguments → QATOptions; unset training options take the task's defaults."""
    from dataclasses import replace

    from qdet.config import QATConfig
    from qdet.models.base import Task
    from qdet.qat_jobs import DETECTION_DEFAULTS, QATOptions

    base = QATOptions() if task is Task.CLASSIFICATION else DETECTION_DEFAULTS
    observers_default = 250 if task is Task.CLASSIFICATION else base.schedule.freeze_observers_after
    schedule = QATConfig(freeze_bn_after=args.freeze_bn,
                         freeze_observers_after=_given(args.freeze_observers, observers_default))
    return replace(base, steps=_given(args.steps, base.steps), batch_size=_given(args.batch_size, base.batch_size),
                   lr=_given(args.lr, base.lr), train_images=args.train_images, schedule=schedule,
                   img_size=args.img_size, device=args.device)


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def cmd_qat(args: argparse.Namespace) -> None:
    from qdet import api
    from qdet.models.base import Task
    from qdet.qat_jobs import classification_qat_job, detection_qat_job

    adapter = resolve_adapter(args)
    job = classification_qat_job if adapter.task is Task.CLASSIFICATION else detection_qat_job
    if job is classification_qat_job and args.img_size is not None:
        raise ConfigError("--img-size is for detectors; classifiers take the folder's images as they are")
    if job is detection_qat_job:
        from qdet.qat_jobs import detection_recipe

        detection_recipe(adapter)  # no recipe: fail before building or calibrating anything
    model = build_model(adapter, args)
    result, qm = job(adapter, model, config_from_args(args), _job_options(args, bench=False), qat_options(args, adapter.task))
    out = Path(args.out or f"runs/{args.model}-qat.qdet")
    api.save(qm, out)  # atomic: a temporary file renamed into place
    _emit(result, args)
    print(f"QAT model saved to {out} ({out.stat().st_size / 1e6:.2f} MB)")


def cmd_export_int(args: argparse.Namespace) -> None:
    from qdet import api
    from qdet.jobs import JobOptions, calibration_loader
    from qdet.runtimes.integer_export import export_integer_params

    adapter = resolve_adapter(args)
    if args.qmodel:
        qm = api.load(args.qmodel, adapter.build(args.weights))
    else:
        args.runtime = "integer"  # config_from_args reads it (SiLU: decomposed, the integer runtime has no SiLU)
        opts = JobOptions(calib_images=args.calib_images, calib_batch=args.calib_batch, seed=args.seed,
                          data=args.data, progress=not args.no_progress)
        qm = api.quantize(adapter.build(args.weights), calibration_loader(adapter, opts), config_from_args(args),
                          adapter=adapter, progress=opts.progress)
    out = export_integer_params(qm, args.out or f"runs/{args.model}_integer.json")
    print(f"integer parameters of {len(qm.layers)} layers written to {out}")
    _write_json(args, {"model": args.model, "layers": len(qm.layers), "out": str(out)})


def cmd_track(args: argparse.Namespace) -> None:
    from qdet.track_job import cmd_track as run  # ByteTrack, float vs int8 (issue 17)

    run(args)


COMMANDS = {"qat": cmd_qat, "export-int": cmd_export_int, "list": cmd_list, "quantize": cmd_quantize, "eval": cmd_eval, "bench": cmd_bench, "analyze": cmd_analyze, "track": cmd_track}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "runtime", None):
            from qdet.runtimes.base import resolve_runtime

            args.runtime = resolve_runtime(args.runtime)
        check_writable(getattr(args, "json", None), "--json")
        if args.command in ("quantize", "qat", "export-int"):
            check_writable(getattr(args, "out", None), "--out")
        if getattr(args, "qmodel", None):
            from qdet.artifact import verify

            verify(args.qmodel)  # a damaged .qdet fails before any model is built
        COMMANDS[args.command](args)
    except QdetError as exc:
        print(f"qdet: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `qdet list | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as exc:  # a bug, not a user mistake
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        print(f"qdet: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
              f"(please report; rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
